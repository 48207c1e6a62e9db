"""Declaring a job key once: a dataclass field carries its check in ``field(metadata=...)``.

A section of a job is a frozen dataclass; each field is written
``per_rank: int = field(default=256, metadata=integer(minimum=1))``, the helpers here
(``integer``, ``number``, ``choice``, ``flag``, ``text``, ...) describing how its YAML key is
checked. :meth:`Spec.parse` walks the fields, reads each key with its check (unknown keys, types
and ranges, as one-line ``JobError``), builds the section, then applies :meth:`Spec.check_fields`,
the rules that span several of its fields. :func:`to_plain` walks the same fields the other way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from functools import partial
from typing import Any, TypeVar

import torch

from ngd_dist.service.jobs.checks import Section

Read = Callable[[Section, str, Any], Any]
"""How one key is read: ``read(section, key, default)`` returns the checked value or raises JobError."""

Metadata = dict[str, Any]
"""What a field's ``metadata`` holds: ``"read"`` (a :data:`Read`), and ``"key"`` when the YAML key
differs from the field name, or ``"inline"`` for a dataclass whose fields sit beside the section's."""

_S = TypeVar("_S", bound="Spec")


def checked(read: Read, *, key: str | None = None) -> Metadata:
    """A key read by ``read``; ``key`` is its YAML name when the field's name cannot be (``global``)."""
    return {"read": read} if key is None else {"read": read, "key": key}


def integer(*, minimum: int = 0, maximum: int | None = None, expected: str = "") -> Metadata:
    """An int (bools and floats rejected) in ``[minimum, maximum]``."""
    return checked(partial(Section.integer, minimum=minimum, maximum=maximum, expected=expected))


def optional_integer(*, minimum: int = 1, key: str | None = None) -> Metadata:
    """An int >= ``minimum``, or null."""
    return checked(partial(Section.optional_integer, minimum=minimum), key=key)


def number(
    *, low: float = -math.inf, high: float = math.inf, open_low: bool = False, open_high: bool = False
) -> Metadata:
    """A finite number from ``low`` to ``high`` (each end open or closed), read as a float."""
    return checked(partial(Section.number, low=low, high=high, open_low=open_low, open_high=open_high))


def choice(choices: Sequence[str], aliases: Mapping[str, str] | None = None) -> Metadata:
    """One of ``choices``, with "did you mean"; an alias is stored as the name it stands for."""
    return checked(partial(Section.choice, choices=choices, aliases=aliases))


def flag() -> Metadata:
    """A YAML boolean."""
    return checked(Section.flag)


def text(*, pattern: str | None = None, expected: str = "") -> Metadata:
    """A non-empty string, matching the regular expression ``pattern`` when given."""
    return checked(partial(Section.text, pattern=pattern, expected=expected))


def optional_text() -> Metadata:
    """A non-empty string, or null."""
    return checked(Section.optional_text)


def _read_mapping(s: Section, key: str, default: object) -> dict[str, Any]:
    return s.mapping(key)


def mapping() -> Metadata:
    """A mapping of plain YAML values (keyword arguments of a factory); null reads as empty."""
    return checked(_read_mapping)


def _read_section(s: Section, key: str, default: Spec) -> Spec:
    return type(default).parse(s.data.get(key), s.where(key))


SECTION: Metadata = checked(_read_section)
"""A nested section (the field's default a :class:`Spec`), read by its own ``parse`` at its key path."""

INLINE: Metadata = {"inline": True}
"""A dataclass (the field's ``default_factory``) whose fields sit, in YAML, beside the section's
own keys; the section's ``parse`` reads them."""


def key_of(f: dataclasses.Field[Any]) -> str:
    """The YAML key of a field (``global_`` is written ``global``)."""
    return str(f.metadata.get("key", f.name))


def yaml_keys(cls: type) -> list[str]:
    """Every YAML key of a section dataclass, those of its inline fields included."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("inline") and isinstance(f.default_factory, type):
            keys.extend(yaml_keys(f.default_factory))
        else:
            keys.append(key_of(f))
    return keys


def read_fields(cls: type, s: Section) -> dict[str, Any]:
    """The value of every field of ``cls`` that carries a check, read from ``s`` in field order."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        read = f.metadata.get("read")
        if read is not None:
            default = f.default_factory() if callable(f.default_factory) else f.default
            values[f.name] = read(s, key_of(f), default)
    return values


class Spec:
    """Base of the job sections: reading a section from its fields' declarations."""

    @classmethod
    def parse(cls: type[_S], data: object, path: str) -> _S:
        """Check the section at ``path`` of a job (``data``: its mapping, or None for every default)."""
        s = Section(data, path, yaml_keys(cls))
        spec = cls(**read_fields(cls, s))
        spec.check_fields(s)
        return spec

    def check_fields(self, s: Section) -> None:
        """Rules that span several fields of the section (none unless a section says otherwise)."""


def to_plain(value: object) -> Any:
    """``value`` as plain YAML types.

    Sections and other dataclasses become mappings by YAML key (inline fields merged in), enums
    their values, dtypes their names (``"bfloat16"``), tuples lists.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = to_plain(getattr(value, f.name))
            if f.metadata.get("inline"):
                out.update(item)
            else:
                out[key_of(f)] = item
        return out
    if isinstance(value, Enum):
        return to_plain(value.value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value

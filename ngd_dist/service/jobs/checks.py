"""Reading one mapping of a job description: unknown keys, types and ranges, as ``JobError``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from ngd_dist.service.jobs.errors import JobError, suggestion

PLAIN = "a plain YAML value (number, string, boolean, null, list or mapping with string keys)"


def join(path: str, key: object) -> str:
    """``"a.b"`` from ``"a"`` and ``"b"``; just the key at the top level."""
    return f"{path}.{key}" if path else str(key)


def is_number(value: object) -> TypeGuard[int | float]:
    """True for ints and floats (not bools)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plain(value: object, path: str) -> Any:
    """A deep copy of ``value`` made of YAML types only (tuples become lists); JobError otherwise."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise JobError.invalid(path, value, "a number, not nan")
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise JobError.invalid(path, k, "string keys")
            out[k] = plain(v, join(path, k))
        return out
    raise JobError.invalid(path, value, PLAIN)


def interval(low: float, high: float, open_low: bool, open_high: bool) -> str:
    """``"in [0, 1)"`` / ``"> 0"`` / ``">= 0"``: how a range is written in messages."""
    fmt = "{:g}".format
    if math.isinf(high):
        return f"{'>' if open_low else '>='} {fmt(low)}"
    return f"in {'(' if open_low else '['}{fmt(low)}, {fmt(high)}{')' if open_high else ']'}"


class Section:
    """One mapping of the job (``None`` reads as empty); rejects keys not in ``keys``."""

    def __init__(self, data: object, path: str, keys: Sequence[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise JobError.invalid(path, data, f"a mapping with keys from: {', '.join(keys)}")
        for key in data:
            if key not in keys:
                raise JobError.unknown(key, path, keys)
        self.data: Mapping[str, Any] = data
        self.path = path

    def where(self, key: str) -> str:
        """The dotted path of ``key`` in this section."""
        return join(self.path, key)

    def has(self, key: str) -> bool:
        """Whether the job gives ``key`` explicitly."""
        return key in self.data

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None, expected: str = ""
    ) -> int:
        """An int (bools and floats rejected) in ``[minimum, maximum]``."""
        value = self.data.get(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if ok and maximum is not None:
            ok = value <= maximum
        if not ok:
            if not expected:
                expected = (
                    f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
                )
            raise JobError.invalid(self.where(key), value, expected)
        return int(value)

    def optional_integer(self, key: str, default: int | None, *, minimum: int = 1) -> int | None:
        """Like :meth:`integer`, or None (YAML ``null``)."""
        if self.data.get(key, default) is None:
            return None
        return self.integer(key, default or 0, minimum=minimum, expected=f"an integer >= {minimum} or null")

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float = -math.inf,
        high: float = math.inf,
        open_low: bool = False,
        open_high: bool = False,
    ) -> float:
        """A finite int or float (bools, strings and nan rejected) in the given range, as float."""
        return check_number(self.where(key), self.data.get(key, default), low, high, open_low, open_high)

    def flag(self, key: str, default: bool) -> bool:
        """A YAML boolean."""
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise JobError.invalid(self.where(key), value, "true or false")
        return value

    def choice(
        self, key: str, default: str, choices: Sequence[str], aliases: Mapping[str, str] | None = None
    ) -> str:
        """One of ``choices`` (or an alias of one, returned as the canonical name)."""
        value = self.data.get(key, default)
        aliases = aliases or {}
        if isinstance(value, str) and value in aliases:
            return aliases[value]
        if not isinstance(value, str) or value not in choices:
            raise JobError.invalid(self.where(key), value, one_of(value, choices))
        return value

    def text(self, key: str, default: str, *, pattern: str | None = None, expected: str = "") -> str:
        """A non-empty string, matching ``pattern`` (a regular expression) when given."""
        value = self.data.get(key, default)
        ok = isinstance(value, str) and bool(value.strip())
        if ok and pattern is not None:
            ok = re.fullmatch(pattern, value) is not None
        if not ok:
            raise JobError.invalid(self.where(key), value, expected or "a non-empty string")
        return value

    def optional_text(self, key: str, default: str | None) -> str | None:
        """A non-empty string or None."""
        if self.data.get(key, default) is None:
            return None
        return self.text(key, default or "", expected="a non-empty string or null")

    def mapping(self, key: str) -> dict[str, Any]:
        """A mapping of plain YAML values (deep-copied); ``null`` reads as empty."""
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise JobError.invalid(self.where(key), value, "a mapping of keyword arguments")
        return plain(value, self.where(key))


def check_number(path: str, value: object, low: float, high: float, open_low: bool, open_high: bool) -> float:
    """``value`` as a float if it is a finite number in the range; JobError naming ``path`` otherwise."""
    if is_number(value) and math.isfinite(value):
        v = float(value)
        if (v > low if open_low else v >= low) and (v < high if open_high else v <= high):
            return v
    raise JobError.invalid(path, value, f"a finite number {interval(low, high, open_low, open_high)}")


def one_of(value: object, choices: Sequence[str]) -> str:
    """``"one of a, b, c"``, with ``"; did you mean 'b'?"`` when ``value`` is a near miss."""
    text = f"one of {', '.join(choices)}"
    if isinstance(value, str):
        guess = suggestion(value, choices)
        if guess is not None:
            text += f"; did you mean {guess!r}?"
    return text

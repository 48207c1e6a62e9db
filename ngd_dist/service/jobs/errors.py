"""The one error a job description raises, with a one-line message naming the key path."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

_MAX_REPR = 100
_MAX_MESSAGE = 2000
"""Longest message a JobError keeps (a backstop: its parts are shortened before they are joined)."""


class _Clip:
    """Text written piece by piece up to ``limit`` characters; what comes past it is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.cut = False
        """Whether anything was dropped."""

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def write(self, text: str) -> None:
        if len(text) > self.limit - self.size:
            self.cut = True
            text = text[: self.limit - self.size]
        self.parts.append(text)
        self.size += len(text)


def _next_item(out: _Clip, index: int) -> bool:
    """Write the separator before item ``index`` of a container; False (nothing written) when full."""
    if out.full:
        out.cut = True
        return False
    if index:
        out.write(", ")
    return True


def _write(value: object, out: _Clip, held: set[int]) -> None:
    """Write ``repr(value)`` to ``out`` until it is full: containers are walked item by item (each
    value held once: a self-reference is written ``[...]``), strings and ints cut before ``repr``.
    """
    if out.full:
        out.cut = True
        return
    if isinstance(value, (str, bytes)):
        out.write(repr(value[: out.limit]))
        if len(value) > out.limit:
            out.cut = True
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * out.limit:
        out.write(f"<int of {value.bit_length()} bits>")  # its repr would cost quadratic time
    elif isinstance(value, (Mapping, list, tuple, set, frozenset)):
        opening, closing = "[]" if isinstance(value, list) else "()" if isinstance(value, tuple) else "{}"
        if id(value) in held:
            out.write(f"{opening}...{closing}")
            return
        held.add(id(value))
        out.write(opening)
        if isinstance(value, Mapping):
            for i, (key, item) in enumerate(value.items()):
                if not _next_item(out, i):
                    break
                _write(key, out, held)
                out.write(": ")
                _write(item, out, held)
        else:
            for i, item in enumerate(value):
                if not _next_item(out, i):
                    break
                _write(item, out, held)
        out.write("," + closing if isinstance(value, tuple) and len(value) == 1 else closing)
        held.discard(id(value))
    else:
        out.write(repr(value))


def show(value: object, limit: int = _MAX_REPR) -> str:
    """``repr(value)`` on one line, shortened to at most ``limit`` characters (about 100).

    Only what is shown is formatted: a huge string, a huge int, or a huge, deeply nested or
    self-referencing container (an expanded YAML alias bomb) costs no more than a small one.
    """
    out = _Clip(limit + 1)
    _write(value, out, set())
    text = re.sub(r"\s+", " ", "".join(out.parts))
    return text[: limit - 3] + "..." if out.cut or len(text) > limit else text


def clip(text: str, limit: int = _MAX_REPR) -> str:
    """``text`` shortened to at most ``limit`` characters, ``...`` marking the cut (no quotes added)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SYNONYMS = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "batch_size": "per_rank",
    "warmup": "warmup_steps",
    "iterations": "steps",
    "max_steps": "steps",
    "precision": "dtype",
}


def suggestion(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` was probably meant to be, or None when nothing is close.

    difflib's closest match first; failing that a known synonym (``learning_rate`` -> ``lr``), a
    case-insensitive match, or a candidate that is a ``_``-separated part of ``word`` or has it as
    one (``lr_rate`` -> ``lr``).
    """
    names = list(candidates)
    if len(word) > _MAX_REPR:  # no key or name is that long: nothing to compare it with
        return None
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    lower = word.lower()
    if _SYNONYMS.get(lower) in names:
        return _SYNONYMS[lower]
    for name in names:
        if name.lower() == lower:
            return name
    parts = set(lower.split("_"))
    for name in names:
        if len(name) >= 2 and (name.lower() in parts or lower in name.lower().split("_")):
            return name
    return None


class JobError(ValueError):
    """A job description that cannot be run; ``str(err)`` is one line, fit to print as is.

    ``path`` is the dotted key path at fault (``"optimizer.lr"``; ``""`` for the whole file) and
    ``source`` the file (or ``"<dict>"``) it came from. The message reads
    ``"<source>: <path>: got <value>; expected <allowed>"``.
    """

    def __init__(self, message: str, *, path: str = "", source: str | None = None) -> None:
        self.detail = clip(re.sub(r"\s*[\r\n]\s*", " ", message[: _MAX_MESSAGE + 1]).strip(), _MAX_MESSAGE)
        self.path = path
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        return f"{self.source}: {self.detail}" if self.source else self.detail

    def with_source(self, source: str) -> JobError:
        """This error with ``source`` as its file name (kept if it already has one)."""
        if self.source is None:
            self.source = source
            self.args = (self._render(),)
        return self

    def with_note(self, note: str) -> JobError:
        """This error with `` (note)`` appended to its message."""
        note = re.sub(r"\s+", " ", note[: _MAX_MESSAGE + 1]).strip()
        self.detail = clip(f"{self.detail} ({note})", _MAX_MESSAGE)
        self.args = (self._render(),)
        return self

    def __str__(self) -> str:
        return self._render()

    @classmethod
    def invalid(cls, path: str, value: object, expected: str) -> JobError:
        """``path: got <value>; expected <expected>``."""
        return cls(f"{path or 'top level'}: got {show(value)}; expected {expected}", path=path)

    @classmethod
    def unknown(cls, key: object, path: str, allowed: Iterable[str]) -> JobError:
        """``unknown key 'k' in <path>; did you mean 'x'?`` (or the list of allowed keys)."""
        allowed = list(allowed)
        where = f"in {path}" if path else "at the top level"
        full = f"{path}.{key}" if path else str(key)
        guess = suggestion(str(key), allowed)
        hint = f"did you mean {guess!r}?" if guess else f"allowed keys: {', '.join(allowed)}"
        return cls(f"unknown key {show(key)} {where}; {hint}", path=full)

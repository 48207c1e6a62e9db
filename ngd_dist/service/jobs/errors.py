"""The one error a job description raises, with a one-line message naming the key path."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_MAX_REPR = 100


def show(value: object) -> str:
    """``repr(value)`` on one line, shortened to about 100 characters."""
    text = re.sub(r"\s+", " ", repr(value))
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


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
        self.detail = re.sub(r"\s*[\r\n]\s*", " ", message).strip()
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
        note = re.sub(r"\s+", " ", note).strip()
        self.detail = f"{self.detail} ({note})"
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

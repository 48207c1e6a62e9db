"""Crash-safe checkpoints for the training worker: atomic writes, checksums, safe loading.

Every rank writes its own file per step, ``step-{step:08d}.rank{rank}-of{world}.pt``, in one
directory. A file is the ``torch.save`` payload followed by a small trailer::

    [torch.save payload][footer JSON][footer length: 8 bytes, big-endian][b"NGDCKPT1"]

The footer records the format version, the step, the rank and world size, the payload's size and
its SHA-256. A file is written to a temporary name in the same directory, flushed and fsynced,
renamed over its final name with :func:`os.replace` and the directory is fsynced, so a final name
only ever holds a complete file: a crash at any point leaves either the previous checkpoints alone
or the new one complete. The rename is the single commit point, so re-saving an existing step is
also atomic. On load the trailer, the size and the checksum are verified *before* anything is
unpickled, and the payload is then read with ``torch.load(weights_only=True)``: a file truncated
or damaged on disk, a file without the trailer (e.g. a plain ``torch.save``) and a payload that
would unpickle arbitrary objects are all refused with :class:`CheckpointError`, and
:meth:`CheckpointStore.latest_valid` falls back to the newest older step that verifies.

What a state may contain (checked by :meth:`CheckpointStore.save` before anything is written, so
a state that could not be loaded back is refused with the path of the offending entry rather than
discovered at resume time): ``dict`` / ``OrderedDict`` (keys of the same scalar types), ``list``,
``tuple``, ``set``, ``str``, ``bytes``, ``int``, ``float``, ``complex``, ``bool``, ``None``,
``torch.Tensor`` and ``nn.Parameter`` (any device; loaded on the CPU), ``torch.Size``,
``torch.dtype`` and ``torch.device``. That covers ``nn.Module.state_dict()``, the ``state_dict()``
of ``torch.optim`` optimizers and LR schedulers, ``KFACPreconditioner.state_dict()``,
``torch.Generator.get_state()`` and :func:`capture_rng_state`. NumPy values, dataclasses,
functions and other objects are not allowed: convert them (``float(x)``, ``torch.from_numpy``,
``dataclasses.asdict``) first.

Resuming on several ranks: each rank finds the newest step that verifies *for itself*, and
:func:`agree_on_step` (or :meth:`CheckpointStore.latest_agreed`) turns those into the newest step
that verifies on *every* rank, with a MIN all-reduce supplied by the caller. A preemption signal
is caught by :class:`PreemptionHandler`, whose flag the worker polls once per step to save and exit.

One writer per (directory, rank, world size): two processes saving as the same rank into one
directory are not supported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CheckpointWriteError",
    "agree_on_step",
    "list_checkpoints",
    "parse_name",
]

log = logging.getLogger(__name__)

FORMAT = "ngd_dist-checkpoint"
FORMAT_VERSION = 1
MAGIC = b"NGDCKPT1"
_LEN_BYTES = 8
_TRAILER = _LEN_BYTES + len(MAGIC)
_MAX_FOOTER = 1 << 16
_CHUNK = 1 << 22

_NAME = re.compile(r"^step-(\d+)\.rank(\d+)-of(\d+)\.pt$")
_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, is missing, damaged or unsafe to load (names file and problem)."""


class CheckpointWriteError(CheckpointError):
    """The directory refused a checkpoint (disk full, read-only, missing): one line naming the
    directory and the OS error. The checkpoints already there are left as they were.
    """


# ----------------------------------------------------------------------------------- state checks


def _check_safe(value: Any, where: str) -> None:
    """Raise CheckpointError when ``value`` holds anything ``torch.load(weights_only=True)`` refuses."""
    kind = type(value)
    if kind in _SCALARS or kind in _TENSORS or kind is torch.Size:
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _SCALARS:
                raise CheckpointError(
                    f"checkpoint state: key {key!r} of {where} is a {type_name(key)}; expected str, int, "
                    "float, bool or None keys"
                )
            _check_safe(item, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, item in enumerate(value):
            _check_safe(item, f"{where}[{i}]" if kind is not set else f"{where}{{...}}")
        return
    raise CheckpointError(
        f"checkpoint state: {where} is a {type_name(value)}, which weights_only loading refuses; "
        "expected tensors, dicts, lists, tuples, sets, str, bytes, int, float, complex, bool, None, "
        "torch.Size, torch.dtype or torch.device (convert it, e.g. float(x), torch.from_numpy(a), "
        "dataclasses.asdict(obj))"
    )


def type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# ------------------------------------------------------------------------------------- file helpers


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it.

    The first OSError of a write is kept in :attr:`error`: ``torch.save`` reports a failed write
    as its own ``unexpected pos`` error, which does not say that the disk was full.
    """

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        try:
            self.file.write(view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.file.flush()


class _Window(io.RawIOBase):
    """Read-only view of the first ``size`` bytes of an open file (the payload, without the trailer)."""

    def __init__(self, file: io.BufferedReader, size: int) -> None:
        super().__init__()
        self.file = file
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"seek to a negative position ({base + offset})")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(view.nbytes, self.size - self.pos))
        if n == 0:
            return 0
        self.file.seek(self.pos)
        got = self.file.readinto(view[:n])
        self.pos += got
        return got


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_footer(file: io.BufferedReader, path: Path) -> tuple[dict[str, Any], int]:
    """The footer of an open checkpoint file and the payload size; CheckpointError when malformed."""
    total = os.fstat(file.fileno()).st_size
    if total < _TRAILER:
        raise CheckpointError(
            f"checkpoint {path}: only {total} bytes, too short for the trailer (truncated, or not written "
            "by CheckpointStore)"
        )
    file.seek(total - _TRAILER)
    trailer = file.read(_TRAILER)
    if trailer[_LEN_BYTES:] != MAGIC:
        raise CheckpointError(
            f"checkpoint {path}: no checksum trailer at the end of the file (truncated, or not written "
            "by CheckpointStore, e.g. a plain torch.save file)"
        )
    footer_len = int.from_bytes(trailer[:_LEN_BYTES], "big")
    if footer_len > min(_MAX_FOOTER, total - _TRAILER):
        raise CheckpointError(
            f"checkpoint {path}: footer length {footer_len} does not fit the file (damaged)"
        )
    file.seek(total - _TRAILER - footer_len)
    try:
        footer = json.loads(file.read(footer_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: footer is not valid JSON (damaged): {exc}") from None
    if not isinstance(footer, dict) or footer.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: footer does not describe an {FORMAT} file (damaged)")
    if footer.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {footer.get('version')!r}; this ngd_dist reads version "
            f"{FORMAT_VERSION}"
        )
    for key, kind in (("step", int), ("rank", int), ("world_size", int), ("size", int), ("sha256", str)):
        if not isinstance(footer.get(key), kind) or isinstance(footer.get(key), bool):
            raise CheckpointError(
                f"checkpoint {path}: footer field {key!r} is missing or malformed (damaged)"
            )
    payload = total - _TRAILER - footer_len
    if footer["size"] != payload:
        raise CheckpointError(
            f"checkpoint {path}: payload is {payload} bytes, the footer recorded {footer['size']} "
            "(truncated or damaged)"
        )
    return footer, payload


# ------------------------------------------------------------------------------------------- lookup


def parse_name(name: str) -> tuple[int, int, int] | None:
    """``(step, rank, world_size)`` from a checkpoint file's name (``step-00000040.rank1-of2.pt``);
    None for any other name.
    """
    match = _NAME.match(name)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def list_checkpoints(directory: str | Path) -> dict[tuple[int, int], frozenset[int]]:
    """The checkpoint files in ``directory`` by ``(step, world_size)``: the ranks that have one there.

    Only the names are read (nothing is verified, nothing created); a directory that is missing or
    cannot be listed holds none. What resuming needs to check first: is a step there for a world size.
    """
    found: dict[tuple[int, int], set[int]] = {}
    try:
        names = [entry.name for entry in Path(directory).iterdir()]
    except OSError:
        return {}
    for name in names:
        parsed = parse_name(name)
        if parsed is not None and parsed[1] < parsed[2]:
            step, rank, world_size = parsed
            found.setdefault((step, world_size), set()).add(rank)
    return {key: frozenset(ranks) for key, ranks in found.items()}


# ---------------------------------------------------------------------------------------- the store


class CheckpointStore:
    """This rank's checkpoints in one directory: atomic saves, verified loads, newest-valid resume.

    ``keep`` is how many of the newest complete steps of this rank survive a save; older ones (and
    damaged files or leftover temporary files of this rank) are deleted only after the new file is
    complete. With several ranks, prefer ``save(..., prune=False)``, confirm that every rank saved
    (e.g. an all-reduce of a success flag) and then call :meth:`prune`, so that no rank deletes the
    last step the others also hold; ``keep >= 2`` leaves a common step even if one save is lost.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, rank: int = 0, world_size: int = 1) -> None:
        for name, value, low in (("keep", keep, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"CheckpointStore: {name}={value!r}; expected an int >= {low}")
        if rank >= world_size:
            raise ValueError(
                f"CheckpointStore: rank={rank} with world_size={world_size}; expected rank < world_size"
            )
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"checkpoint directory {self.directory}: cannot create it: {exc}") from exc
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory}: exists and is not a directory")

    # ---- names

    def path_for(self, step: int) -> Path:
        """The final path of this rank's file for ``step``."""
        return self.directory / f"step-{step:08d}.rank{self.rank}-of{self.world_size}.pt"

    def steps(self) -> list[int]:
        """Steps (ascending) that have a file of this rank and world size on disk, verified or not."""
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match and (int(match[2]), int(match[3])) == (self.rank, self.world_size):
                found.append(int(match[1]))
        return sorted(found)

    # ---- writing

    def _write_error(self, step: int, exc: BaseException) -> CheckpointWriteError:
        """One line naming the file (so the directory), and the OS error behind ``exc``."""
        cause = exc if isinstance(exc, OSError) else None
        if cause is not None and cause.errno is not None:
            why = f"[Errno {cause.errno}] {cause.strerror}"
        else:
            lines = str(exc).strip().splitlines()
            why = lines[0] if lines else type(exc).__name__
        return CheckpointWriteError(
            f"checkpoint {self.path_for(step)}: could not be written: {why} (the previous checkpoints "
            "are unchanged)"
        )

    def check_writable(self) -> None:
        """Raise CheckpointWriteError unless a file can be created, written, synced and removed in
        the directory (a start-up check: better than finding out at the first save).
        """
        try:
            fd, name = tempfile.mkstemp(dir=self.directory, prefix=".write-test.", suffix=".tmp")
        except OSError as exc:
            raise CheckpointWriteError(f"checkpoint directory {self.directory}: not writable: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(MAGIC)
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise CheckpointWriteError(f"checkpoint directory {self.directory}: not writable: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def save(self, step: int, state: Mapping[str, Any], *, prune: bool = True) -> Path:
        """Write ``state`` as this rank's checkpoint for ``step`` atomically and return its path.

        The state is checked first (see the module docstring for what it may contain); then it is
        written to a temporary file, fsynced, renamed over the final name and the directory is
        fsynced. Any failure raises CheckpointError (CheckpointWriteError when the directory refused
        the file: disk full, read-only, gone) and leaves the existing checkpoints as they were. With
        ``prune`` (the default) older steps beyond ``keep`` are deleted afterwards.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"checkpoint save: step={step!r}; expected an int >= 0")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint save: state is a {type_name(state)}; expected a mapping")
        plain = dict(state)
        _check_safe(plain, "state")
        final = self.path_for(step)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{final.name}.", suffix=".tmp")
        except OSError as exc:
            raise self._write_error(step, exc) from exc
        tmp = Path(tmp_name)
        writer: _HashingWriter | None = None
        try:
            with os.fdopen(fd, "wb") as file:
                writer = _HashingWriter(file)
                torch.save(plain, writer)  # type: ignore[arg-type]
                footer = {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "step": step,
                    "rank": self.rank,
                    "world_size": self.world_size,
                    "size": writer.size,
                    "sha256": writer.sha256.hexdigest(),
                    "torch": torch.__version__,
                }
                encoded = json.dumps(footer, sort_keys=True).encode("utf-8")
                file.write(encoded + len(encoded).to_bytes(_LEN_BYTES, "big") + MAGIC)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
                cause = writer.error if writer is not None and writer.error is not None else exc
                raise self._write_error(step, cause) from exc
            raise
        _fsync_directory(self.directory)
        log.info("checkpoint: saved step %d to %s (%d bytes)", step, final, final.stat().st_size)
        if prune:
            self.prune()
        return final

    def prune(self) -> list[Path]:
        """Delete this rank's files older than its ``keep`` newest complete steps; return what went.

        Complete means the trailer is present and the sizes match (a cheap check: the checksum is
        only verified on load). Damaged files older than the newest complete step and leftover
        temporary files of this rank are deleted too. Files of other ranks are never touched.
        """
        complete = [s for s in self.steps() if self._looks_complete(self.path_for(s))]
        if not complete:
            return []
        kept = set(complete[-self.keep :])
        oldest_kept, newest = min(kept), max(kept)
        removed = []
        for step in self.steps():
            if step in kept:
                continue
            if step < oldest_kept or (step < newest and step not in complete):
                path = self.path_for(step)
                path.unlink(missing_ok=True)
                removed.append(path)
        suffix = f".rank{self.rank}-of{self.world_size}.pt."
        for entry in self.directory.iterdir():
            if entry.name.startswith(".step-") and suffix in entry.name and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
                removed.append(entry)
        if removed:
            _fsync_directory(self.directory)
            log.info("checkpoint: pruned %s", ", ".join(p.name for p in removed))
        return removed

    @staticmethod
    def _looks_complete(path: Path) -> bool:
        try:
            with open(path, "rb") as file:
                _read_footer(file, path)
        except (OSError, CheckpointError):
            return False
        return True

    # ---- reading

    def verify(self, path: str | Path) -> dict[str, Any]:
        """Check the trailer, size and SHA-256 of a file without unpickling it; return its footer."""
        path = Path(path)
        with self._open(path) as file:
            return self._verify_open(file, path)[0]

    def load(self, path: str | Path) -> dict[str, Any]:
        """Verify the file, then load it with ``torch.load(weights_only=True)`` onto the CPU.

        Raises CheckpointError naming the file when it is missing, unreadable, truncated, damaged,
        named for a different step / rank / world size than its footer records, or holds objects
        that weights_only loading refuses (nothing is executed in that case).
        """
        path = Path(path)
        with self._open(path) as file:
            _, size = self._verify_open(file, path)
            try:
                window = io.BufferedReader(_Window(file, size), buffer_size=1 << 20)
                state = torch.load(window, weights_only=True, map_location="cpu")
            except MemoryError:
                raise
            except Exception as exc:  # UnpicklingError for refused globals, RuntimeError for bad zips, ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(
                    f"checkpoint {path}: cannot be unpickled safely (weights_only; nothing was "
                    f"executed): {first}"
                ) from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path}: holds a {type_name(state)}; expected a dict")
        return state

    @staticmethod
    def _open(path: Path) -> io.BufferedReader:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path}: no such file") from None
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: cannot be opened: {exc}") from exc

    @staticmethod
    def _verify_open(file: io.BufferedReader, path: Path) -> tuple[dict[str, Any], int]:
        try:
            footer, size = _read_footer(file, path)
            digest = hashlib.sha256()
            file.seek(0)
            left = size
            while left:
                chunk = file.read(min(_CHUNK, left))
                if not chunk:
                    raise CheckpointError(
                        f"checkpoint {path}: ended early while reading the payload (truncated)"
                    )
                digest.update(chunk)
                left -= len(chunk)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path}: cannot be read: {exc}") from exc
        if digest.hexdigest() != footer["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: SHA-256 of the payload does not match the one recorded when it was "
                "written (damaged on disk)"
            )
        match = _NAME.match(path.name)
        if match:
            named = (int(match[1]), int(match[2]), int(match[3]))
            recorded = (footer["step"], footer["rank"], footer["world_size"])
            if named != recorded:
                raise CheckpointError(
                    f"checkpoint {path}: holds step {recorded[0]} of rank {recorded[1]} of {recorded[2]}, "
                    f"but is named for step {named[0]} of rank {named[1]} of {named[2]} (renamed or copied?)"
                )
        return footer, size

    def _try_load(self, step: int) -> dict[str, Any] | None:
        try:
            return self.load(self.path_for(step))
        except CheckpointError as exc:
            log.warning("checkpoint: skipping step %d: %s", step, exc)
            return None

    def latest_valid(self) -> tuple[int, dict[str, Any]] | None:
        """The newest step whose file for this rank verifies and loads, with its state; None if none.

        Invalid files are skipped with a warning on the ``logging`` module, falling back to older
        steps. On several ranks, use :meth:`latest_agreed` so that all ranks resume from one step.
        """
        for step in reversed(self.steps()):
            state = self._try_load(step)
            if state is not None:
                return step, state
        return None

    def latest_agreed(self, all_reduce_min: Callable[[int], int]) -> tuple[int, dict[str, Any]] | None:
        """The newest step that loads on every rank, with this rank's state; None if there is none.

        Collective: every rank must call it, with a function doing a MIN all-reduce of one int
        across the job (see :func:`agree_on_step`). Each rank loads its candidates newest first,
        so only one state is held at a time; all ranks return the same step, or all return None.
        """
        steps = self.steps()
        known: dict[int, bool] = {}
        held: dict[int, dict[str, Any]] = {}

        def newest_at_most(bound: int | None) -> int | None:
            for step in reversed(steps):
                if bound is not None and step > bound:
                    continue
                if step not in known:
                    state = self._try_load(step)
                    known[step] = state is not None
                    if state is not None:
                        held.clear()
                        held[step] = state
                if known[step]:
                    return step
            return None

        step = agree_on_step(newest_at_most, all_reduce_min)
        if step is None:
            return None
        state = held.pop(step, None)
        if state is None:  # loaded earlier and dropped for a newer candidate: load it again
            state = self.load(self.path_for(step))
        return step, state


# ------------------------------------------------------------------------------------ rank agreement


def agree_on_step(
    local: Iterable[int] | Callable[[int | None], int | None],
    all_reduce_min: Callable[[int], int],
) -> int | None:
    """The newest step valid on every rank, or None when no step is; collective over all ranks.

    ``local`` is this rank's valid steps: either an iterable of them, or a function mapping a bound
    (None: no bound) to the newest valid step ``<= bound`` (None when none), which lets the caller
    verify files lazily. ``all_reduce_min`` must return the minimum of the ints that all ranks pass
    it (-1 stands for "none"), e.g. with torch.distributed::

        def all_reduce_min(value: int) -> int:
            t = torch.tensor([value], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return int(t.item())

    Taking the minimum of each rank's newest step once is not enough (one rank may lack that step
    while holding older ones), so this iterates: each round every rank offers its newest valid step
    at or below the last agreed bound, until the minimum stops moving. Every rank runs the same
    number of rounds, two when all ranks hold the same newest step.
    """
    if callable(local):
        newest_at_most = local
    else:
        valid = sorted(set(local))
        for s in valid:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise ValueError(f"agree_on_step: step {s!r}; expected ints >= 0")

        def newest_at_most(bound: int | None) -> int | None:
            below = [s for s in valid if bound is None or s <= bound]
            return below[-1] if below else None

    bound: int | None = None
    while True:
        mine = newest_at_most(bound)
        offer = -1 if mine is None else mine
        agreed = int(all_reduce_min(offer))
        if agreed > offer or agreed < -1:
            raise ValueError(
                f"agree_on_step: all_reduce_min({offer}) returned {agreed}; expected the MIN over ranks "
                f"(at most {offer}, at least -1)"
            )
        if agreed < 0:
            return None
        if agreed == bound:
            return agreed
        bound = agreed

"""How one worker's failure reaches ``ngd-dist launch``: a small status record per failed rank.

``ngd-dist launch`` makes a private directory for each launch and hands it to every worker in the
environment variable ``NGD_DIST_STATUS_DIR``. A worker that fails (or is preempted) writes one JSON
record there, :class:`Failure`: its rank, exit code, one-line message, the time and the launcher's
restart attempt; then it exits at once, without waiting for the other ranks (they may be blocked in
a different collective). The launcher tears the other workers down; ``ngd-dist launch`` then reads
the records and reports the root cause (:func:`root_cause`) as its one line and exit code.

The records also tell a worker whose collective broke because a peer left whether another rank
failed first (:func:`failed_before`): that rank's line is the one that matters, so this one stays
short. The directory is per node: on several nodes each ``ngd-dist launch`` sees its own workers.
Without the variable (``ngd-dist train`` alone, or a launcher started by hand) nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ngd_dist.service.exit_codes import ExitCode

STATUS_DIR_ENV = "NGD_DIST_STATUS_DIR"
"""The environment variable naming the directory of one launch's status records."""

_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
_WORLD_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_MAX_LENGTH = 1000


@dataclass(frozen=True, kw_only=True)
class Failure:
    """Why one worker stopped: what ``ngd-dist launch`` reports when it is the root cause."""

    rank: int
    world_size: int
    code: int
    """The worker's exit code (an :class:`~ngd_dist.service.exit_codes.ExitCode`)."""
    message: str
    """One line, as the worker printed it (without the ``ngd-dist train:`` prefix)."""
    time: float
    """Seconds since the epoch when the record was written (ranks of one node share the clock)."""
    attempt: int = 0
    """torchrun's restart count (``TORCHELASTIC_RESTART_COUNT``); 0 for other launchers."""

    @property
    def preempted(self) -> bool:
        """Whether the worker stopped for a preemption signal (after checkpointing), not an error."""
        return self.code == ExitCode.PREEMPTED

    def describe(self) -> str:
        """The record as one line: who failed, with which exit code, and why."""
        try:
            name = f", {ExitCode(self.code).name.lower().replace('_', ' ')}"
        except ValueError:
            name = ""
        return f"rank {self.rank} of {self.world_size} failed (exit {self.code}{name}): {self.message}"


def _first_int(environ: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        with contextlib.suppress(KeyError, ValueError):
            return int(environ[name])
    return default


def worker_place(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This worker's rank and world size: torch.distributed's once initialised, else the launcher's
    variables (torchrun / DeepSpeed, Open MPI, PMI), else ``(0, 1)``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ if environ is None else environ
    return _first_int(env, _RANK_VARIABLES, 0), _first_int(env, _WORLD_VARIABLES, 1)


def status_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The directory of this launch's status records, or None outside ``ngd-dist launch``."""
    value = (os.environ if environ is None else environ).get(STATUS_DIR_ENV)
    return Path(value) if value else None


def _attempt(environ: Mapping[str, str]) -> int:
    return _first_int(environ, ("TORCHELASTIC_RESTART_COUNT",), 0)


def record_failure(
    code: int, message: str, *, rank: int, world_size: int, environ: Mapping[str, str] | None = None
) -> Failure | None:
    """Write this worker's record into the launch's status directory; None when there is none.

    Written to a temporary name and renamed, so a reader never sees half a record. Never raises:
    a worker on its way out must not fail again because the directory went away.
    """
    env = os.environ if environ is None else environ
    directory = status_dir(env)
    failure = Failure(
        rank=rank,
        world_size=world_size,
        code=int(code),
        message=" ".join(message.split())[:_MAX_LENGTH],
        time=time.time(),
        attempt=_attempt(env),
    )
    if directory is None:
        return None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".record.", suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            json.dump(asdict(failure), file)
        os.replace(tmp, directory / f"rank{rank}.attempt{failure.attempt}.pid{os.getpid()}.json")
    except OSError:
        return None
    return failure


def read_failures(directory: Path) -> list[Failure]:
    """Every well-formed record in ``directory`` (malformed or unreadable files are skipped)."""
    found = []
    for path in sorted(directory.glob("rank*.json")):
        try:
            data = json.loads(path.read_text())
            found.append(
                Failure(
                    rank=int(data["rank"]),
                    world_size=int(data["world_size"]),
                    code=int(data["code"]),
                    message=str(data["message"]),
                    time=float(data["time"]),
                    attempt=int(data.get("attempt", 0)),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def root_cause(failures: list[Failure]) -> Failure | None:
    """The failure to report for a launch: of the last restart attempt, the earliest error; the
    earliest preemption when every record is one; None without records.
    """
    if not failures:
        return None
    last = max(f.attempt for f in failures)
    current = sorted((f for f in failures if f.attempt == last), key=lambda f: f.time)
    errors = [f for f in current if not f.preempted]
    return (errors or current)[0]


def failed_before(rank: int, environ: Mapping[str, str] | None = None) -> Failure | None:
    """The earliest error another rank of this attempt has recorded, if any (a worker whose peer
    vanished asks this to tell a consequence from a cause).
    """
    env = os.environ if environ is None else environ
    directory = status_dir(env)
    if directory is None:
        return None
    attempt = _attempt(env)
    others = [
        f for f in read_failures(directory) if f.rank != rank and f.attempt == attempt and not f.preempted
    ]
    return min(others, key=lambda f: f.time) if others else None

"""Helpers shared by the test modules: the ``ngd-dist`` command, the processes it starts, HTTP, and
the checkpoints it writes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the CLI runs from here: configs/ and launch/ are relative to it)."""
CLI = str(Path(sys.executable).with_name("ngd-dist"))
QUICK = str(ROOT / "configs" / "quickstart.yaml")
FIXTURES = ROOT / "tests" / "fixtures"
"""User factory modules (``user_model:make_model``, ...) for jobs that name their own model or data."""

_JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables of an enclosing distributed job, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}
    env.update(extra)
    return env


def run_process(
    argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (in ``cwd``, with ``env`` or :func:`cli_env`) in a session of its own; on timeout
    kill the whole group and fail the test with the output's tail.

    The group is killed on return too, so a worker that outlived its launcher does not linger.
    """
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=env if env is not None else cli_env(), text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv)} ran past {timeout:.0f} s\n{out[-2000:]}\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``ngd-dist *args`` from the repository root (see :func:`run_process`)."""
    return run_process([CLI, *args], timeout=timeout, env=env)


def start_cli(
    *args: str, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``ngd-dist *args`` started from the repository root in a session of its own (stop it with
    :func:`kill_tree`); pipes for its output unless files are given."""
    return subprocess.Popen(
        [CLI, *args], cwd=ROOT, env=env if env is not None else cli_env(), text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
    )  # fmt: skip


def sets(*pairs: str) -> list[str]:
    """``--set`` before each ``key=value``."""
    return [word for pair in pairs for word in ("--set", pair)]


# -- processes ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it (torchrun puts workers in their own groups)."""
    for victim in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    proc: subprocess.Popen[Any] | None = None,
    details: Callable[[], str] = lambda: "",
    interval: float = 0.2,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something true, and return that; fail the test when
    ``timeout`` seconds pass or ``proc`` exits first (``details()`` is added to the message).

    An exception of a type in ``ignore`` counts as "not yet" (a server still starting, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) while waiting for {what}\n{details()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(interval)


# -- HTTP ----------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status and body of a GET (HTTP errors included); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def try_http_get(url: str, timeout: float = 2.0) -> tuple[int, str] | None:
    """:func:`http_get`, or None while nothing answers (a server still starting, or gone)."""
    try:
        return http_get(url, timeout)
    except OSError:
        return None


# -- what a job leaves behind ------------------------------------------------------------------


def summary_of(stdout: str) -> tuple[str, float, float]:
    """The worker's ``done:`` line and the first and last loss it reports."""
    summary = [line for line in stdout.splitlines() if line.startswith("done:")][-1]
    first, last = summary.split("loss ")[1].split(" wall")[0].split(" -> ")
    return summary, float(first), float(last)


def checkpoint_params(directory: Path, step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """The model parameters one rank saved at ``step``."""
    from ngd_dist.service.checkpoint import CheckpointStore

    store = CheckpointStore(directory, rank=rank, world_size=world_size)
    return dict(store.load(store.path_for(step))["model"])


def assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    """The same parameter names, bit for bit the same values."""
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=f"{what}: {name}")


class FakeClock:
    """A time source that moves only when told to (for clocks injected into the code under test)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

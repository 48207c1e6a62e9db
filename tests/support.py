"""Helpers shared by the test modules: the ``ngd-dist`` command, the processes it starts, HTTP, and
the checkpoints it writes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# -- ngd-dist commands forked from one process -------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """How one ``ngd-dist`` run ended and what it cost."""

    returncode: int
    stdout: str
    stderr: str
    cpu_s: float
    """User + system CPU seconds of the child (from wait4: this child alone)."""
    peak_mb: float
    """Peak resident memory of the child (VmHWM, as last sampled)."""


def _memory_mb(pid: int) -> tuple[float, float]:
    """Resident memory of a live process now, and its peak (VmHWM); zeros once it is gone.
    (wait4's ru_maxrss would not do: it counts the parent's memory at fork.)"""
    kib = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in kib:
                kib[name] = int(value.split()[0])
    except OSError:
        pass
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024


_FORK_SERVER = """
import json, os, sys, traceback
import torch._dynamo  # what building an optimizer imports first (seconds)
import ngd_dist.service.trainer
from ngd_dist.cli import main
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: the console script's work, output to the files asked for
        code = 1
        try:
            os.setsid()
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                    (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(path, flags), fd)
            sys.argv = ["ngd-dist", *request["args"]]
            code = main(request["args"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status, usage = os.wait4(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
"""


def _kill_child(pid: int) -> None:
    """SIGKILL a child of the fork server and its session (which it may not have made yet)."""
    for kill in (os.kill, os.killpg):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)


class CommandServer:
    """Runs ``ngd-dist`` commands in children forked from one process that imported ``ngd_dist.cli``.

    Each child runs the console script's entry point (``ngd_dist.cli:main``) in a session of its own,
    with its output in files: what a fresh ``ngd-dist`` process does, less the seconds of importing
    torch, the trainer and ``torch._dynamo`` (which building an optimizer imports). For commands that end quickly (a refused input, ``validate``);
    the child's CPU time and peak memory come with its outcome. The server's environment is
    :func:`cli_env`'s when it starts (the ``commands`` fixture of tests/conftest.py starts one per session).
    """

    def __init__(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER], cwd=ROOT, env=cli_env(), start_new_session=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.server.stdin is not None
        assert self.server.stdout is not None
        self.requests, self.replies = self.server.stdin, self.server.stdout.fileno()
        self.pending = b""

    def _answered(self, timeout: float) -> bool:
        """Whether a whole reply line has come, waiting at most ``timeout`` seconds for more output."""
        if b"\n" not in self.pending and select.select([self.replies], [], [], timeout)[0]:
            chunk = os.read(self.replies, 65536)
            if not chunk:
                pytest.fail(f"the fork server exited ({self.server.poll()})")
            self.pending += chunk
        return b"\n" in self.pending

    def _reply(self, timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while not self._answered(max(0.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the fork server did not answer within {timeout:.0f} s")
        line, self.pending = self.pending.split(b"\n", 1)
        reply: dict[str, float] = json.loads(line)
        return reply

    def run(self, args: list[str], tmp: Path, *, rss_cap_mb: float | None = None, timeout: float = 90.0) -> Measured:
        """``ngd-dist *args`` with its CPU time and peak memory; killed (and the test failed) past
        ``timeout`` seconds or ``rss_cap_mb`` of resident memory (sampled every 20 ms). Its output goes
        to ``stdout.txt`` and ``stderr.txt`` in the folder ``tmp`` (made if missing)."""
        tmp.mkdir(parents=True, exist_ok=True)
        out_path, err_path = tmp / "stdout.txt", tmp / "stderr.txt"
        out_path.write_text("")
        err_path.write_text("")
        request = {"args": args, "stdout": str(out_path), "stderr": str(err_path)}
        self.requests.write(json.dumps(request).encode() + b"\n")
        self.requests.flush()
        pid = int(self._reply(30)["pid"])
        deadline = time.monotonic() + timeout
        killed, peak = "", 0.0
        try:
            while not self._answered(0.02):
                rss, high = _memory_mb(pid)
                peak = max(peak, high)
                if not killed and rss_cap_mb is not None and rss > rss_cap_mb:
                    killed = f"grew past {rss_cap_mb:.0f} MB of memory ({rss:.0f} MB)"
                elif not killed and time.monotonic() > deadline:
                    killed = f"ran past {timeout:.0f} s"
                if killed:
                    _kill_child(pid)
        finally:
            _kill_child(pid)
        ended = self._reply(30)
        stdout, stderr = out_path.read_text(), err_path.read_text()
        if killed:
            pytest.fail(f"ngd-dist {' '.join(a[:80] for a in args[:4])} ... {killed}\n{stderr[-2000:]}")
        return Measured(int(ended["code"]), stdout, stderr, ended["cpu"], peak)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGKILL)
        self.server.communicate()


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


def refused_in_process(capsys: Any, *argv: str, quiet_stdout: bool = False) -> str:
    """``ngd-dist *argv`` run in this process refused its input: exit 2 and one line on stderr (no
    traceback), which is returned; ``quiet_stdout``: nothing printed on stdout either."""
    from ngd_dist.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    if quiet_stdout:
        assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]

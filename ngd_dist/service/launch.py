"""``ngd-dist launch``: the command line each launcher needs to start ``ngd-dist train`` workers,
and a launch that ends fast, with one line and the root cause's exit code, when any worker fails.

- torchrun: ``python -m ngd_dist.service.torchrun --nproc-per-node N [--nnodes M --node-rank R
  --master-addr A --master-port P] [--max-restarts K] -m ngd_dist.cli train CONFIG ...``: torchrun's
  own launcher (same arguments) without its failure traceback (:mod:`ngd_dist.service.torchrun`).
- mpirun (Open MPI): ``mpirun -np N [--hostfile F] [--allow-run-as-root] -x PATH -x PYTHONPATH
  [-x OMP_NUM_THREADS] python -m ngd_dist.cli train CONFIG ...``; ranks and the rendezvous come
  from MPI, so no ``MASTER_ADDR`` is needed. ``--allow-run-as-root`` is added when running as
  root (containers).
- deepspeed: ``deepspeed --num_gpus N [--hostfile F --num_nodes M --no_ssh --node_rank R]
  --master_addr A --master_port P --module ngd_dist.cli train CONFIG --deepspeed ...``, the
  ``deepspeed`` script next to this Python. ``--num_gpus`` is the number of workers per node (CPU
  ranks where there is no GPU); the launcher adds ``--local_rank=N``, which the CLI accepts and
  ignores. Several nodes need a hostfile (``host slots=N`` lines) and, like torchrun, one launch per
  node with its ``--node-rank`` (DeepSpeed's ``--no_ssh`` mode: no pdsh or ssh between nodes).
  ``--deepspeed`` makes the worker step through DeepSpeed's engine
  (:mod:`ngd_dist.service.deepspeed_engine`); :func:`launch_env` sets ``TORCH_EXTENSIONS_DIR``.

:func:`run_launch` runs the launcher in a private directory of its own, removed when it ends: its
``tmp/`` is the job's ``TMPDIR`` (torchrun's ``torchelastic_*`` folders, Open MPI's session
directory) and its ``status/`` is where a failing worker leaves its one-line record
(:mod:`ngd_dist.service.failure`) before it exits at once. When any worker fails the launcher
stops the others (torchrun at once, SIGKILL after its 30 s shutdown timeout; mpirun and deepspeed
at once), and ``ngd-dist launch`` prints the earliest failure as one line and exits with that
worker's code (:class:`~ngd_dist.service.exit_codes.ExitCode`); Open MPI's framed failure reports
are kept out of the output unless no worker said why. SIGTERM/SIGINT is handed to the launcher
once (it runs in a session of its own, so a terminal's Ctrl-C does not reach it twice), the
workers checkpoint, and the launch exits with ``ExitCode.PREEMPTED``. DeepSpeed's shared-memory
all-reduce buffers of this launch (``/dev/shm/deepspeed_allreduce_buffer_*``, 69 MB per rank,
which DeepSpeed never unlinks) are removed after it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ngd_dist.service.failure import Failure

LAUNCHERS = ("torchrun", "mpirun", "deepspeed")


@dataclass(kw_only=True)
class LaunchSpec:
    """How to start the workers of one job."""

    config: str
    launcher: str
    nproc: int
    overrides: list[str] = field(default_factory=list)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_restarts: int = 0
    hostfile: str | None = None


def build_command(spec: LaunchSpec) -> list[str]:
    """The argv that starts ``spec.nproc`` workers per node with ``spec.launcher``."""
    if spec.launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: got {spec.launcher!r}; expected one of {', '.join(LAUNCHERS)}")
    if spec.nproc < 1:
        raise ValueError(f"--nproc: got {spec.nproc}; expected an integer >= 1")
    worker = ["-m", "ngd_dist.cli", "train", spec.config]
    for override in spec.overrides:
        worker += ["--set", override]
    if spec.launcher == "deepspeed":
        return _deepspeed_command(spec) + worker[1:] + ["--deepspeed"]  # --module: no "-m"
    if spec.launcher == "torchrun":
        cmd = [sys.executable, "-m", "ngd_dist.service.torchrun", "--nproc-per-node", str(spec.nproc)]
        if spec.nnodes > 1:
            cmd += [
                "--nnodes",
                str(spec.nnodes),
                "--node-rank",
                str(spec.node_rank),
                "--master-addr",
                spec.master_addr,
                "--master-port",
                str(spec.master_port),
            ]
        else:
            cmd += ["--standalone"]
        if spec.max_restarts:
            cmd += ["--max-restarts", str(spec.max_restarts)]
        return cmd + worker
    mpirun = shutil.which("mpirun") or "mpirun"
    cmd = [mpirun, "-np", str(spec.nproc * spec.nnodes)]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["--allow-run-as-root"]
    cmd += ["--oversubscribe"]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV"):
        if name in os.environ:
            cmd += ["-x", name]
    if spec.nproc > 1:
        cmd += ["-x", "OMP_NUM_THREADS"]  # set by launch_env unless the user set it
    return [*cmd, sys.executable, *worker]


def _deepspeed_command(spec: LaunchSpec) -> list[str]:
    """DeepSpeed's launcher, up to the module it runs (``--module``: ``python -m``)."""
    beside = Path(sys.executable).with_name("deepspeed")
    exe = str(beside) if beside.exists() else shutil.which("deepspeed") or "deepspeed"
    cmd = [exe, "--num_gpus", str(spec.nproc)]
    if spec.nnodes > 1:
        if not spec.hostfile:
            raise ValueError("--hostfile: deepspeed over several nodes needs a hostfile")
        cmd += [
            "--hostfile",
            spec.hostfile,
            "--num_nodes",
            str(spec.nnodes),
            "--no_ssh",
            "--node_rank",
            str(spec.node_rank),
        ]
    cmd += ["--master_addr", spec.master_addr, "--master_port", str(spec.master_port), "--module"]
    return cmd


def launch_env(spec: LaunchSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start ``spec``'s launcher in.

    ``environ`` (default ``os.environ``), plus, when they are unset: for DeepSpeed
    ``TORCH_EXTENSIONS_DIR`` (see :mod:`ngd_dist.service.deepspeed_engine`), and for every launcher
    with several workers per node ``OMP_NUM_THREADS=1`` (without it the ranks' thread pools compete
    for the cores: the quickstart runs 2-3x slower on 2 cores; torchrun would set it too, with a
    banner saying so; mpirun forwards it with ``-x``).
    """
    env = dict(os.environ if environ is None else environ)
    if spec.launcher == "deepspeed":
        from ngd_dist.service.deepspeed_engine import ensure_extensions_dir

        ensure_extensions_dir(env)
    if spec.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def format_command(argv: list[str]) -> str:
    """The argv as one shell-quoted line (what ``--dry-run`` prints)."""
    return shlex.join(argv)


@dataclass(frozen=True)
class LaunchOutcome:
    """How a launch ended: what ``ngd-dist launch`` exits with and the line it prints."""

    code: int
    """0, or the root-cause worker's exit code (:class:`~ngd_dist.service.exit_codes.ExitCode`)."""
    message: str | None = None
    """One line saying why the launch did not succeed (None when it did)."""
    report: str = ""
    """The launcher's own failure report, kept aside; worth showing only when no worker said why."""


def run_launch(spec: LaunchSpec, argv: list[str], env: dict[str, str]) -> LaunchOutcome:
    """Run the launcher ``argv`` for ``spec`` in ``env`` to its end (see the module docstring).

    The launcher gets a private directory (``ngd-dist-launch-*`` in the caller's temporary
    directory) holding the job's ``TMPDIR`` and the workers' status records; it is removed when
    the launch ends, whatever the outcome, and so are DeepSpeed's shared-memory buffers.
    """
    from ngd_dist.service.failure import STATUS_DIR_ENV, read_failures

    scratch = Path(tempfile.mkdtemp(prefix="ngd-dist-launch-"))
    try:
        status, tmp = scratch / "status", scratch / "tmp"
        status.mkdir()
        tmp.mkdir()
        env = {**env, STATUS_DIR_ENV: str(status), "TMPDIR": str(tmp)}
        reports = ReportFilter(MPIRUN_REPORTS) if spec.launcher == "mpirun" else None
        with SignalForwarder() as forwarder:
            code = forwarder.run(argv, env=env, stderr_filter=reports)
            stop_stragglers(env[STATUS_DIR_ENV], grace_s=STRAGGLER_GRACE_S)
        failures = read_failures(status)
        signum = forwarder.received[0] if forwarder.received else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for buffer in deepspeed_shm_buffers(spec):
            with contextlib.suppress(OSError):
                buffer.unlink(missing_ok=True)
    return launch_outcome(spec.launcher, code, signum, failures, reports.captured if reports else "")


STRAGGLER_GRACE_S = 60.0
"""How long workers that outlive their launcher may take to finish (e.g. a checkpoint) before SIGKILL."""


def launch_processes(marker: str) -> list[int]:
    """The live processes of this user started for one launch, from /proc (none without /proc).

    They are those whose environment holds ``NGD_DIST_STATUS_DIR=marker``: the launch's workers.
    """
    from ngd_dist.service.failure import STATUS_DIR_ENV

    needle = f"{STATUS_DIR_ENV}={marker}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:  # gone, or another user's
                continue
            if needle in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


def stop_stragglers(marker: str, *, grace_s: float) -> None:
    """Wait up to ``grace_s`` for workers of this launch that outlived their launcher, then SIGKILL them.

    A launcher interrupted while stopping its workers (a second signal) can exit before they do;
    they may still be writing their preemption checkpoint and status record, and nothing of the
    job may stay behind once ``ngd-dist launch`` returns.
    """
    deadline = time.monotonic() + grace_s
    while (left := launch_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def launch_outcome(
    launcher: str, code: int, signum: int | None, failures: list[Failure], report: str = ""
) -> LaunchOutcome:
    """What a launch that ended with ``code`` exits with, given the workers' records.

    The launcher exited 0: success. Else the root cause among the records
    (:func:`~ngd_dist.service.failure.root_cause`): its code and line, or ``PREEMPTED`` when
    every record is a preemption. No record but ``ngd-dist launch`` was signalled (``signum``):
    ``PREEMPTED`` (nothing started training yet, or nothing could say so). Else the launcher's
    own code, with its report (``report``) for whoever reads on.
    """
    from ngd_dist.service.exit_codes import ExitCode
    from ngd_dist.service.failure import root_cause

    if code == 0:
        return LaunchOutcome(0)
    cause = root_cause(failures)
    if cause is not None and cause.preempted:
        stopped = {f.rank for f in failures if f.preempted and f.attempt == cause.attempt}
        return LaunchOutcome(
            ExitCode.PREEMPTED,
            f"preempted ({len(stopped)} of {cause.world_size} ranks): {cause.message}; "
            "launch again to resume",
        )
    if cause is not None:
        return LaunchOutcome(cause.code, f"{cause.describe()} (the first failure: the others were stopped)")
    if signum is not None:
        return LaunchOutcome(
            ExitCode.PREEMPTED,
            f"stopped by {signal.Signals(signum).name} before any worker checkpointed; "
            "launch again to resume from the last checkpoint",
        )
    why = f" (a worker or the launcher was killed by {_signal_name(code - 128)})" if code > 128 else ""
    return LaunchOutcome(
        code if 0 < code < 256 else ExitCode.INTERNAL,
        f"{launcher} exited with code {code}{why} and no worker said why: see the output above",
        report,
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def deepspeed_shm_buffers(spec: LaunchSpec) -> list[Path]:
    """The shared-memory files DeepSpeed's CPU all-reduce makes for ``spec``'s ranks on this node.

    DeepSpeed's shm communication op (``csrc/cpu/comm/shm.cpp``) creates one 69 MB segment per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``, when every
    rank is on one node, and never unlinks it. The names are this user's, this launch's address
    and port: no other job's buffers match (another job cannot hold the same port at once).
    """
    if spec.launcher != "deepspeed" or spec.nnodes != 1 or not hasattr(os, "getuid"):
        return []
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{spec.master_addr}_{spec.master_port}"
    return [Path("/dev/shm") / f"{prefix}_{rank}" for rank in range(spec.nproc)]


MPIRUN_REPORTS = (
    b"Primary job",
    b"mpirun detected that one or more processes exited with non-zero status",
    b"mpirun noticed that process rank",
    b"mpirun has exited due to process rank",
)
"""First lines of Open MPI's framed reports about a failed or killed process (help-orterun.txt)."""

_RULE = re.compile(rb"-{40,}\r?\n")
_RULE_START = re.compile(rb"-*")
_MAX_BOX_LINES = 40


class ReportFilter:
    """Passes a launcher's error stream on as it comes, but keeps aside its framed failure reports.

    Open MPI writes each report as a box: a line of dashes, the text, a line of dashes. A box whose
    first text line starts with one of ``firsts`` is dropped from the stream and kept in
    :attr:`captured`; everything else (the workers' output, progress bars without a newline) is
    passed on at once, except a line of dashes, held until its box is known.
    """

    def __init__(self, firsts: tuple[bytes, ...]) -> None:
        self.firsts = firsts
        self.pending = bytearray()
        self.box: list[bytes] | None = None
        self.mid_line = False
        self.captured = ""
        """The reports kept aside, as text."""

    def feed(self, data: bytes) -> bytes:
        """Take the next chunk of the stream; return what to pass on now."""
        out = bytearray()
        self.pending += data
        while (end := self.pending.find(b"\n")) >= 0:
            line = bytes(self.pending[: end + 1])
            del self.pending[: end + 1]
            if self.box is None:
                # a carriage return (a progress bar redrawn) starts the line afresh
                cut = line.rfind(b"\r", 0, len(line) - 1) + 1
                if self.mid_line and not cut:  # the rest of a line already passed on
                    self.mid_line = False
                    out += line
                    continue
                out += line[:cut]
                line = line[cut:]
                self.mid_line = False
            out += self._line(line)
        if self.pending and self.box is None:
            cut = self.pending.rfind(b"\r") + 1
            if (cut or not self.mid_line) and _RULE_START.fullmatch(self.pending, cut):
                out += self.pending[:cut]  # hold what may open a box
                del self.pending[:cut]
                self.mid_line = False
            else:
                out += self.pending
                self.pending.clear()
                self.mid_line = True
        return bytes(out)

    def close(self) -> bytes:
        """The end of the stream: return whatever is still held."""
        held = b"".join(self.box or []) + bytes(self.pending)
        self.box, self.pending = None, bytearray()
        return held

    def _line(self, line: bytes) -> bytes:
        rule = _RULE.fullmatch(line) is not None
        if self.box is None:
            if rule:
                self.box = [line]
                return b""
            return line
        self.box.append(line)
        if rule and len(self.box) == 2:  # two rules in a row: the first was not an opening
            first, self.box = self.box[0], [line]
            return first
        if rule:
            box, self.box = self.box, None
            text = [part.strip() for part in box[1:-1] if part.strip()]
            if text and text[0].startswith(self.firsts):
                self.captured += b"".join(box).decode(errors="replace")
                return b""
            return b"".join(box)
        if len(self.box) > _MAX_BOX_LINES:  # not a report after all
            box, self.box = self.box, None
            return b"".join(box)
        return b""


class SignalForwarder:
    """While its ``with`` block runs, SIGTERM/SIGINT to this process go on to the launcher.

    A scheduler or ``docker stop`` signals ``ngd-dist launch``, not the launcher under it: each
    signal is recorded (:attr:`received`) and handed to the launcher's process group (the launcher
    runs in a session of its own, so a terminal's Ctrl-C reaches it once, through here; DeepSpeed's
    runner passes nothing on, its ``deepspeed.launcher.launch`` child does), and this process waits
    for the workers to checkpoint and stop instead of dying first and orphaning the job. Every
    signal is passed on, never turned into a kill. A signal before the launcher starts means it
    is not started at all.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._passed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        self._pass_on(signum)

    def _pass_on(self, signum: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self._passed = True
        try:
            os.killpg(proc.pid, signum)
        except OSError:  # the group is gone already, or killpg is not allowed: the launcher alone
            with contextlib.suppress(OSError):
                proc.send_signal(signum)

    def run(
        self, argv: list[str], *, env: dict[str, str] | None = None, stderr_filter: ReportFilter | None = None
    ) -> int:
        """Run the launcher ``argv`` to its end and return its exit status (``128 + N`` when signal
        N killed it, or stopped it before it started). With ``stderr_filter`` the launcher's stderr
        goes through it to this process's stderr.
        """
        if self.received:
            return 128 + self.received[0]
        stderr = subprocess.PIPE if stderr_filter is not None else None
        self.proc = proc = subprocess.Popen(argv, env=env, start_new_session=True, stderr=stderr)
        if self.received and not self._passed:  # came while the launcher was being started
            self._pass_on(self.received[0])
        pump = None
        if stderr_filter is not None and proc.stderr is not None:
            pump = threading.Thread(target=_pump, args=(proc.stderr, stderr_filter), daemon=True)
            pump.start()
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # a handler replaced behind our back: keep waiting
                self._handle(signal.SIGINT, None)
        if pump is not None:
            pump.join()
        return 128 - code if code < 0 else code


def _pump(stream: IO[bytes], stderr_filter: ReportFilter) -> None:
    """Copy ``stream`` to this process's stderr through ``stderr_filter``, chunk by chunk."""
    fd = stream.fileno()
    while chunk := os.read(fd, 1 << 16):
        _write_stderr(stderr_filter.feed(chunk))
    _write_stderr(stderr_filter.close())
    stream.close()


def _write_stderr(data: bytes) -> None:
    if not data:
        return
    sys.stderr.flush()
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        sys.stderr.write(data.decode(errors="replace"))
        sys.stderr.flush()

"""One rank's error ends the whole job fast and says why; preemption, a full disk and leftovers.

Each test runs the real CLI: ``ngd-dist launch`` of the 2-rank quickstart (a few steps, metrics off)
through a real launcher, bounded in time, with a private TMPDIR that must be empty afterwards and
no new entry of this launch's left in /dev/shm (:func:`_launch`). The data factories that fail on
one rank only are in ``tests/fixtures/failing_data.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ngd_dist.service.exit_codes import ExitCode
from ngd_dist.service.failure import Failure, root_cause
from ngd_dist.service.launch import MPIRUN_REPORTS, ReportFilter, launch_outcome
from ngd_dist.testing.distributed import free_port, free_ports
from tests.support import (
    CLI,
    QUICK,
    ROOT,
    alive,
    cli_env,
    descendants,
    kill_tree,
    sets,
    try_http_get,
    wait_until,
)

FAILING = "tests.fixtures.failing_data"
TINY = sets("metrics.port=0", "train.steps=5", "train.log_every=5", "distributed.timeout_s=300")
"""A few steps, no metrics server, and the default collective timeout made explicit: a hang shows."""
BOUND_S = 30.0
"""The documented bound from one rank's failure to the end of the launch."""


@dataclass
class Ended:
    """What a launch printed and how it ended."""

    code: int
    out: str
    err: str
    after_failure_s: float | None
    """Seconds from the first ``ngd-dist train: rank N:`` line to the exit (None: no such line)."""

    @property
    def last_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _job_processes(private_tmp: Path) -> list[int]:
    """Live processes whose TMPDIR lies under ``private_tmp`` (the launcher and its workers)."""
    needle = f"TMPDIR={private_tmp}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(v.startswith(needle) for v in (entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
    return [pid for pid in found if alive(pid)]


def _ours_in_shm(before: set[str], port: int | None) -> list[str]:
    """New /dev/shm entries that may be this launch's.

    Left out: DeepSpeed's buffers of other ports and Python multiprocessing's semaphores
    (``sem.mp-*``, which no launcher here uses): other test sessions on this machine make them.
    """
    new = set(os.listdir("/dev/shm")) - before
    others = {n for n in new if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" not in n}
    others |= {n for n in new if n.startswith("sem.mp-")}
    return sorted(new - others)


def _start(
    private_tmp: Path, argv: list[str], preexec: Callable[[], None] | None
) -> tuple[subprocess.Popen[str], Callable[[], Ended], Callable[[float], Ended]]:
    """Start ``argv`` with TMPDIR=``private_tmp``; return it, a function giving what it printed so
    far, and one waiting for its end (killing the tree and failing the test after the timeout)."""
    private_tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=cli_env(TMPDIR=str(private_tmp)), text=True, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec,
    )  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    first_failure: list[float] = []

    def read(stream: object, into: list[str], watch: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)
            # anywhere in the line: rank 0's progress bar may precede it without a newline
            if watch and not first_failure and "ngd-dist train: rank " in line:
                first_failure.append(time.monotonic())

    readers = [
        threading.Thread(target=read, args=(proc.stdout, out, False), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err, True), daemon=True),
    ]
    for reader in readers:
        reader.start()

    def so_far() -> Ended:
        return Ended(proc.returncode, "".join(out), "".join(err), None)

    def wait(timeout: float) -> Ended:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            for reader in readers:
                reader.join(5)
            pytest.fail(f"{' '.join(argv)} ran past {timeout:.0f} s\n{''.join(out)[-2000:]}\n{''.join(err)[-4000:]}")
        ended = time.monotonic()
        for reader in readers:
            reader.join(10)
        after = ended - first_failure[0] if first_failure else None
        return Ended(proc.returncode, "".join(out), "".join(err), after)

    return proc, so_far, wait


def _check_nothing_left(private_tmp: Path, shm_before: set[str], port: int | None, ended: Ended) -> None:
    wait_until(lambda: not _job_processes(private_tmp), 5, "every process of the launch to be gone")
    assert not list(private_tmp.iterdir()), f"left in TMPDIR: {sorted(private_tmp.iterdir())}\n{ended.err[-2000:]}"
    assert not _ours_in_shm(shm_before, port), f"left in /dev/shm: {_ours_in_shm(shm_before, port)}"


def _launch(
    tmp_path: Path, *overrides: str, launcher: str = "torchrun", timeout: float = 150,
    preexec: Callable[[], None] | None = None,
) -> Ended:  # fmt: skip
    """``ngd-dist launch`` of the quickstart on 2 ranks; checks that it leaves nothing behind."""
    port = free_port()
    argv = [CLI, "launch", QUICK, "--launcher", launcher, "--nproc", "2", "--master-port", str(port),
            *TINY, *sets(f"checkpoint.dir={tmp_path / 'ckpt'}"), *overrides]  # fmt: skip
    private_tmp = tmp_path / "tmp"
    shm_before = set(os.listdir("/dev/shm"))
    _, _, wait = _start(private_tmp, argv, preexec)
    ended = wait(timeout)
    _check_nothing_left(private_tmp, shm_before, port, ended)
    return ended


def _assert_one_line_failure(ended: Ended, code: int, *needles: str) -> None:
    """``ngd-dist launch`` exited ``code`` with the root cause as its last line, and no traceback
    unless the cause was unexpected (code 1: the failing rank's own traceback only)."""
    assert ended.code == code, ended.err[-4000:]
    line = ended.last_line
    assert line.startswith(f"ngd-dist launch: rank 1 of 2 failed (exit {code}"), ended.err[-4000:]
    for needle in needles:
        assert needle in line, line
    assert ended.err.count("Traceback") == (1 if code == ExitCode.INTERNAL else 0), ended.err[-4000:]
    assert "ChildFailedError" not in ended.err, ended.err[-4000:]  # torchrun's report
    assert "Primary job" not in ended.err, ended.err[-4000:]  # Open MPI's
    assert ended.after_failure_s is not None, ended.err[-4000:]
    assert ended.after_failure_s <= BOUND_S, ended.after_failure_s


# ------------------------------------------------------------------------ an error on one rank


@pytest.mark.parametrize(
    ("launcher", "data", "code", "needle"),
    [
        ("torchrun", "raise_on_rank", ExitCode.BAD_INPUT, "no data for rank 1"),
        ("torchrun", "empty_on_rank", ExitCode.BAD_INPUT, "non-zero first dimension"),
        ("torchrun", "bad_label_on_rank", ExitCode.BAD_INPUT, "Target 10 is out of bounds"),
        ("mpirun", "raise_on_rank", ExitCode.BAD_INPUT, "no data for rank 1"),
        pytest.param("deepspeed", "raise_on_rank", ExitCode.BAD_INPUT, "no data for rank 1",
                     marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_an_error_on_one_rank_ends_every_rank_within_the_bound_with_its_line_and_code(
    tmp_path: Path, launcher: str, data: str, code: int, needle: str
) -> None:
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    ended = _launch(tmp_path, *sets(f"data.name={FAILING}:{data}"), launcher=launcher)
    _assert_one_line_failure(ended, code, needle)


def test_a_missing_data_file_stops_the_launch_with_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus.txt"
    ended = _launch(tmp_path, *sets("data.name=text", f"data.args.path={missing}"))
    assert ended.code == ExitCode.BAD_INPUT, ended.err[-3000:]
    assert ended.last_line.startswith("ngd-dist launch: rank "), ended.err[-3000:]
    assert str(missing) in ended.last_line
    assert "Traceback" not in ended.err, ended.err[-3000:]


# --------------------------------------------------------------------------------- checkpoints


def _steps_saved(directory: Path, rank: int) -> list[int]:
    return sorted(int(p.name[5:13]) for p in directory.glob(f"step-*.rank{rank}-of2.pt"))


def _assert_save_failed_cleanly(ended: Ended, directory: Path, kept: int, oserror: str) -> None:
    assert ended.code == ExitCode.CHECKPOINT_FAILED, ended.err[-4000:]
    line = ended.last_line
    assert line.startswith("ngd-dist launch: rank "), ended.err[-4000:]
    assert f"checkpoint {directory}/step-00000020.rank" in line, line
    assert oserror in line, line
    assert "Traceback" not in ended.err, ended.err[-4000:]
    assert "enforce fail" not in ended.err, ended.err[-4000:]
    saved = {rank: _steps_saved(directory, rank) for rank in (0, 1)}
    assert all(kept in steps for steps in saved.values()), saved
    assert min(steps[-1] for steps in saved.values()) == kept, saved  # still the newest step of every rank
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: writes past ``limit`` fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_save_the_file_system_refuses_ends_with_one_line_and_exit_5_keeping_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    first = _launch(tmp_path, *sets("train.steps=10", "checkpoint.every=10"))
    assert first.code == 0, first.err[-3000:]
    # a checkpoint is ~400 KB per rank: with files capped at 200 KB the save of step 20 fails
    ended = _launch(tmp_path, *sets("train.steps=20", "checkpoint.every=10"), preexec=_file_size_limit(200_000))
    _assert_save_failed_cleanly(ended, tmp_path / "ckpt", 10, "File too large")


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` for the block (the test is skipped where mounting is not allowed)."""
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_during_a_save_ends_with_one_line_and_exit_5_keeping_the_last_checkpoint(tmp_path: Path) -> None:
    # 1.2 MB holds one step of both ranks (~0.8 MB), not two
    with _tmpfs(tmp_path / "disk", "size=1200k") as disk:
        ended = _launch(tmp_path, *sets("train.steps=20", "checkpoint.every=10", f"checkpoint.dir={disk}"))
        _assert_save_failed_cleanly(ended, disk, 10, "No space left on device")


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_a_checkpoint_dir_that_cannot_be_written_is_refused_at_start_up(tmp_path: Path, where: str) -> None:
    with contextlib.ExitStack() as stack:
        if where == "under a file":
            (tmp_path / "a-file").write_text("")
            directory = tmp_path / "a-file" / "ckpt"
        else:
            directory = stack.enter_context(_tmpfs(tmp_path / "ro", "ro,size=64k"))
        ended = _launch(tmp_path, *sets(f"checkpoint.dir={directory}"))
    assert ended.code == ExitCode.BAD_INPUT, ended.err[-3000:]
    assert ended.last_line.startswith("ngd-dist launch: rank "), ended.err[-3000:]
    assert f"checkpoint.dir: got '{directory}'" in ended.last_line, ended.last_line
    assert "Traceback" not in ended.err
    assert "steps=" not in ended.out  # refused before training


# ---------------------------------------------------------------------------------- preemption


def _preempt(
    tmp_path: Path, signum: int, target: str, launcher: str = "torchrun", *, overrides: Sequence[str] = (),
    ready: Callable[[], object] | None = None,
) -> tuple[Ended, Path]:  # fmt: skip
    """Start a long 2-rank launch, signal ``target`` once ``ready()`` (default: both ranks saved a
    checkpoint), and wait. ``overrides``: more ``--set`` words, after the defaults."""
    directory = tmp_path / "ckpt"
    port = free_port()
    argv = [CLI, "launch", QUICK, "--launcher", launcher, "--nproc", "2", "--master-port", str(port),
            *sets("metrics.port=0", "train.steps=100000", "checkpoint.every=5", "train.log_every=5",
                  f"checkpoint.dir={directory}"), *overrides]  # fmt: skip
    private_tmp = tmp_path / "tmp"
    shm_before = set(os.listdir("/dev/shm"))
    proc, so_far, wait = _start(private_tmp, argv, None)
    try:
        if ready is None:
            wait_until(lambda: _steps_saved(directory, 0) and _steps_saved(directory, 1), 120,
                       "both ranks to save a checkpoint", proc=proc, details=lambda: so_far().err[-3000:])  # fmt: skip
        else:
            wait_until(ready, 120, "the job to be ready", proc=proc, details=lambda: so_far().err[-3000:])
        launcher = [pid for pid in descendants(proc.pid) if b"ngd_dist.service.torchrun" in _cmdline(pid)]
        victims = {"launch": [proc.pid], "launcher": launcher, "every process": [proc.pid, *descendants(proc.pid)]}
        assert victims[target], "no launcher process found"
        for pid in victims[target]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
    except BaseException:
        kill_tree(proc.pid)
        raise
    ended = wait(120)
    _check_nothing_left(private_tmp, shm_before, port, ended)
    return ended, directory


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _assert_preempted(ended: Ended, directory: Path) -> int:
    """Exit 75 with one line and no traceback, both ranks' newest checkpoint at the same step; that step."""
    assert ended.code == ExitCode.PREEMPTED, ended.err[-4000:]
    assert ended.last_line.startswith("ngd-dist launch: preempted (2 of 2 ranks)"), ended.err[-4000:]
    assert "launch again to resume" in ended.last_line
    assert "Traceback" not in ended.err, ended.err[-4000:]
    assert "SignalException" not in ended.err, ended.err[-4000:]
    newest = {rank: _steps_saved(directory, rank)[-1] for rank in (0, 1)}
    assert newest[0] == newest[1], newest
    assert f"at step {newest[0]}" in ended.last_line, ended.last_line
    return newest[0]


@pytest.mark.parametrize(
    ("signum", "target"),
    [
        (signal.SIGINT, "launch"),  # Ctrl-C, once, to ngd-dist launch
        (signal.SIGTERM, "launcher"),  # what the Docker entry point does: the launcher alone
        (signal.SIGTERM, "every process"),  # Slurm's job-step signal, systemd: each process gets one
    ],
    ids=["SIGINT-launch", "SIGTERM-launcher", "SIGTERM-every-process"],
)
def test_preemption_checkpoints_every_rank_and_exits_75_without_a_traceback(
    tmp_path: Path, signum: int, target: str
) -> None:
    ended, directory = _preempt(tmp_path, signum, target)
    _assert_preempted(ended, directory)


@pytest.mark.slow
def test_a_preempted_deepspeed_launch_checkpoints_every_rank_and_exits_75(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")  # DeepSpeed's runner passes no signal on: its process group gets it
    ended, directory = _preempt(tmp_path, signal.SIGTERM, "launch", launcher="deepspeed")
    _assert_preempted(ended, directory)


def test_a_running_launch_serves_metrics_and_sigterm_to_it_preempts_and_the_next_launch_resumes(
    tmp_path: Path,
) -> None:
    """One 2-rank job: each rank serves /metrics and /healthz on its own port; a scheduler (or
    `docker stop`) signals `ngd-dist launch` alone: it hands SIGTERM to the launcher, the workers save a
    preemption checkpoint (no periodic one here) and stop, exit 75; the next launch resumes there."""
    base = free_ports(2)  # rank 0 and rank 1
    seen: dict[int, str] = {}

    def both_ranks_serve_and_rank_1_steps() -> bool:
        for rank in (0, 1):
            metrics = try_http_get(f"http://127.0.0.1:{base + rank}/metrics")
            health = try_http_get(f"http://127.0.0.1:{base + rank}/healthz")
            if metrics is None or health is None or (metrics[0], health[0]) != (200, 200):
                continue
            if f'ngd_steps_total{{rank="{rank}"}}' in metrics[1]:
                seen[rank] = metrics[1]
        reply = try_http_get(f"http://127.0.0.1:{base + 1}/healthz")  # "ok step N" once its loop runs
        return len(seen) == 2 and reply is not None and re.fullmatch(r"ok step [1-9]\d*\s*", reply[1]) is not None

    ended, directory = _preempt(
        tmp_path, signal.SIGTERM, "launch", overrides=sets(f"metrics.port={base}", "checkpoint.every=100000"),
        ready=both_ranks_serve_and_rank_1_steps,
    )  # fmt: skip
    for rank, text in seen.items():
        assert f'ngd_samples_per_second{{rank="{rank}"}}' in text
        assert 'ngd_communication_bytes_total{kind="factors"' in text
    step = _assert_preempted(ended, directory)
    assert "SIGTERM" in ended.err, ended.err[-3000:]
    again = _launch(tmp_path, *sets(f"train.steps={step + 5}", "checkpoint.every=5"))
    assert again.code == 0, again.err[-3000:]
    assert f"resumed_from={step}" in again.out, again.out + again.err[-3000:]


def test_ngd_dist_train_alone_exits_75_when_preempted(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    argv = [CLI, "train", QUICK, *sets("metrics.port=0", "train.steps=100000", "checkpoint.every=5",
                                       f"checkpoint.dir={directory}")]  # fmt: skip
    proc, so_far, wait = _start(tmp_path / "tmp", argv, None)
    try:
        wait_until(lambda: list(directory.glob("step-*.pt")), 120, "a checkpoint", proc=proc,
                   details=lambda: so_far().err[-3000:])  # fmt: skip
        proc.send_signal(signal.SIGTERM)
    except BaseException:
        kill_tree(proc.pid)
        raise
    ended = wait(60)
    assert ended.code == ExitCode.PREEMPTED, ended.err[-3000:]
    assert "Traceback" not in ended.err
    assert list(directory.glob("step-*.pt"))


# ------------------------------------------------------------------------------------ leftovers


@pytest.mark.slow
def test_a_deepspeed_launch_leaves_nothing_in_dev_shm_or_tmp(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    ended = _launch(tmp_path, launcher="deepspeed")  # _launch checks /dev/shm and TMPDIR
    assert ended.code == 0, ended.err[-3000:]


# ---------------------------------------------------------------- the parts, without processes


def _failure(rank: int, code: int, at: float, attempt: int = 0) -> Failure:
    return Failure(rank=rank, world_size=2, code=code, message=f"rank {rank} says why", time=at, attempt=attempt)


def test_the_root_cause_is_the_earliest_error_of_the_last_attempt_else_a_preemption() -> None:
    error, consequence = _failure(1, 2, at=10.0), _failure(0, 1, at=10.5)
    assert root_cause([consequence, error]) == error
    preempted = _failure(0, ExitCode.PREEMPTED, at=9.0)
    assert root_cause([preempted, consequence, error]) == error  # an error outranks an earlier preemption
    assert root_cause([preempted, _failure(1, ExitCode.PREEMPTED, at=9.5)]) == preempted
    assert root_cause([error, _failure(0, 5, at=20.0, attempt=1)]).attempt == 1  # a restart's own failure
    assert root_cause([]) is None


def test_the_launch_exits_with_the_root_cause_code_or_75_or_the_launcher_code() -> None:
    cause = _failure(1, ExitCode.BAD_INPUT, at=1.0)
    assert launch_outcome("torchrun", 0, None, [cause]).code == 0  # the launcher says it recovered
    outcome = launch_outcome("torchrun", 2, None, [_failure(0, 1, at=2.0), cause])
    assert (outcome.code, outcome.message) == (2, "rank 1 of 2 failed (exit 2, bad input): rank 1 says why "
                                                  "(the first failure: the others were stopped)")  # fmt: skip
    assert launch_outcome("mpirun", 143, signal.SIGTERM, []).code == ExitCode.PREEMPTED
    killed = launch_outcome("torchrun", 137, None, [], report="the launcher's box\n")
    assert (killed.code, killed.report) == (137, "the launcher's box\n")
    assert "SIGKILL" in (killed.message or "")


def _feed(chunks: list[bytes]) -> tuple[bytes, str]:
    filt = ReportFilter(MPIRUN_REPORTS)
    passed = b"".join(filt.feed(chunk) for chunk in chunks) + filt.close()
    return passed, filt.captured


RULE = b"-" * 74 + b"\n"


def test_open_mpi_failure_boxes_are_kept_aside_and_everything_else_passes_as_it_comes() -> None:
    box = RULE + b"Primary job  terminated normally, but 1 process returned\na non-zero exit code.\n" + RULE
    other = RULE + b"Some other Open MPI notice\n" + RULE
    worker = b"ngd-dist train: rank 1: bad\n"
    passed, captured = _feed([worker, box[:100], box[100:], other, b"  3%|1  | 3/100 [00:01<00:30]\r"])
    assert passed == worker + other + b"  3%|1  | 3/100 [00:01<00:30]\r"
    assert captured == box.decode()
    assert _feed([b" 7%|7  | 7/100\r", box]) == (b" 7%|7  | 7/100\r", box.decode())  # right after a bar
    assert _feed([b" 7%|7  | 7/100\r" + box]) == (b" 7%|7  | 7/100\r", box.decode())
    filt = ReportFilter(MPIRUN_REPORTS)
    assert filt.feed(b" 50%|#####  | 1/2\r") == b" 50%|#####  | 1/2\r"  # a progress bar is not held back
    assert filt.feed(b"---") == b""  # a line of dashes is, until its box is known
    assert filt.feed(b"-" * 50 + b"\nnot a report\n" + RULE) == b"-" * 53 + b"\nnot a report\n" + RULE


_SLOW_BUILD = """
import os, sys, time
import ngd_dist.service.checkpoint.preemption as preemption
import ngd_dist.service.trainer as trainer
preemption.SETUP_GRACE_S = float(os.environ["TEST_GRACE_S"])
real = trainer.build
def slow(*args, **kwargs):  # the real build, after a pause in which the test signals
    print("building the model", file=sys.stderr, flush=True)
    time.sleep(float(os.environ["TEST_PAUSE_S"]))
    return real(*args, **kwargs)
trainer.build = slow
from ngd_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _signal_during_set_up(tmp_path: Path, pause_s: float, grace_s: float) -> tuple[int, str, float]:
    """``ngd-dist train`` (one process) whose model build pauses ``pause_s``, SIGTERM during the pause
    with a set-up grace of ``grace_s``: exit code, stderr, seconds from the signal to the exit."""
    argv = [sys.executable, "-c", _SLOW_BUILD, "train", QUICK,
            *sets("metrics.port=0", "train.steps=50", f"checkpoint.dir={tmp_path / 'ckpt'}",
                  "checkpoint.resume=never")]  # fmt: skip
    env = cli_env(TEST_PAUSE_S=str(pause_s), TEST_GRACE_S=str(grace_s))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        stream = proc.stderr
        reader = threading.Thread(target=lambda: seen.extend(iter(stream.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: any("building the model" in line for line in seen), 60, "the set-up", proc=proc)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.monotonic() - signalled
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
    return code, "".join(seen), took


def test_a_signal_during_the_set_up_is_a_preemption_not_a_death(tmp_path: Path) -> None:
    """CI, session 8: ``docker stop``'s SIGTERM reached one rank still building its model while the
    other trained; it died of the default action and the job exited 1 instead of 75."""
    code, err, _ = _signal_during_set_up(tmp_path, pause_s=3, grace_s=60)
    assert code == ExitCode.PREEMPTED, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    assert "preemption: SIGTERM received" in err, err[-4000:]
    saved = [p.name for p in (tmp_path / "ckpt").glob("step-*.rank0-of1.pt")]
    assert saved == ["step-00000001.rank0-of1.pt"], err[-4000:]


def test_a_set_up_that_cannot_reach_the_loop_after_a_signal_exits_75_within_the_grace(tmp_path: Path) -> None:
    """A launcher's SIGTERM to the surviving ranks after one failed must still end a rank whose
    set-up keeps going (torchrun's agent waits 30 s, then SIGKILLs; the job then has no record)."""
    code, err, took = _signal_during_set_up(tmp_path, pause_s=600, grace_s=1)
    assert code == ExitCode.PREEMPTED, err[-4000:]
    assert took < 30, took
    assert "did not reach the training loop within 1 s" in err, err[-4000:]
    assert not list((tmp_path / "ckpt").glob("step-*")), err[-4000:]


def test_a_repeated_sigterm_is_the_same_preemption_request_however_late_its_handler_runs() -> None:
    """CI, stop 17: a worker blocked in a collective ran the handler for a copy of SIGTERM (Slurm's,
    the launcher's) after the window, died of it, and the job exited 1 instead of 75."""
    from ngd_dist.service.checkpoint import PreemptionHandler

    calls: list[int] = []
    lines: list[str] = []
    logger = logging.getLogger("ngd_dist.service.checkpoint.preemption")  # its own handler: another
    handler = logging.Handler(logging.INFO)  # test's configure_logging may stop ngd_dist propagating
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionHandler(repeat_window=0.2) as preempt:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(lambda: preempt.requested, 2, "the first SIGTERM")
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher passing on what the scheduler sent
            time.sleep(0.4)
            os.kill(os.getpid(), signal.SIGTERM)  # a copy whose handler ran late
            time.sleep(0.1)
            assert preempt.requested
            assert preempt.signal_name == "SIGTERM"
        assert calls == []
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == ["preemption: SIGTERM received; the worker will checkpoint and stop"] + [
        "preemption: SIGTERM again: the same request"
    ] * 2, lines


def test_under_deepspeed_no_repeat_stops_a_worker_at_once() -> None:
    """DeepSpeed's workers get each Ctrl-C twice (their launcher's process group, and DeepSpeed
    passing it on): a copy handled late must not read as a second Ctrl-C there."""
    from ngd_dist.service.checkpoint import worker_preemption

    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with worker_preemption(signals_arrive_twice=True) as preempt:
            preempt.repeat_window = 0.2
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: preempt.requested, 2, "the first SIGINT")
            time.sleep(0.4)
            os.kill(os.getpid(), signal.SIGINT)  # a copy whose handler ran late
            time.sleep(0.1)
            assert preempt.requested
        assert calls == []
        with worker_preemption(signals_arrive_twice=False) as preempt:  # torchrun, mpirun, one process
            preempt.repeat_window = 0.2
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: preempt.requested, 2, "the first SIGINT")
            time.sleep(0.4)
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C
            wait_until(lambda: calls == [signal.SIGINT], 2, "the second SIGINT to reach the old handler")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_stops_at_once_only_after_the_window() -> None:
    from ngd_dist.service.checkpoint import PreemptionHandler

    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionHandler(repeat_window=0.5) as preempt:
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: preempt.requested, 2, "the first SIGINT")
            os.kill(os.getpid(), signal.SIGINT)  # the launcher passing on the same Ctrl-C
            time.sleep(0.1)
            assert calls == []
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)  # later: a second Ctrl-C
            wait_until(lambda: calls == [signal.SIGINT], 2, "the second SIGINT to reach the old handler")
    finally:
        signal.signal(signal.SIGINT, previous)

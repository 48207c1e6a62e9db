"""Surviving crashes: kill -9 of a rank under torchrun with restarts, and a truncated checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from ngd_dist.testing.distributed import free_ports
from tests.support import (
    QUICK,
    alive,
    assert_same_params,
    checkpoint_params,
    descendants,
    kill_tree,
    run_cli,
    sets,
    start_cli,
    try_http_get,
    wait_until,
)


def _worker_of_rank(root: int, rank: int) -> int | None:
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"ngd_dist.cli" in cmdline:
            return pid
    return None


def _launch(directory: Path, steps: int, restarts: int) -> subprocess.Popen[str]:
    return start_cli(
        "launch", QUICK, "--launcher", "torchrun", "--nproc", "2", "--max-restarts", str(restarts),
        *sets(f"checkpoint.dir={directory}", f"train.steps={steps}", "checkpoint.every=25", "train.log_every=25"),
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out\n{out[-2000:]}\n{err[-3000:]}") from None


def test_kill_9_of_one_rank_restarts_from_the_checkpoint_and_ends_as_if_uninterrupted(tmp_path: Path) -> None:
    steps = 500  # long enough that the kill lands mid-run on a fast machine
    reference = _launch(tmp_path / "reference", steps, restarts=0)
    out, err = _finish(reference, 240)
    assert reference.returncode == 0, err[-3000:]

    crashed = _launch(tmp_path / "crashed", steps, restarts=1)
    try:
        victim = wait_until(
            lambda: list((tmp_path / "crashed").glob("step-*.rank1-of2.pt")) and _worker_of_rank(crashed.pid, 1),
            180, "rank 1 running after its first checkpoint", proc=crashed, interval=0.05,
        )  # fmt: skip
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        kill_tree(crashed.pid)
        crashed.communicate()
        raise
    out, err = _finish(crashed, 240)
    assert crashed.returncode == 0, err[-4000:]
    assert "resumed_from=" in out, out + err[-3000:]
    for rank in (0, 1):
        assert_same_params(
            checkpoint_params(tmp_path / "crashed", steps, rank, 2),
            checkpoint_params(tmp_path / "reference", steps, rank, 2),
            f"rank {rank}",
        )


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path: Path) -> None:
    common = sets(f"checkpoint.dir={tmp_path}", "checkpoint.every=10", "checkpoint.keep=5")
    first = run_cli("train", QUICK, *common, *sets("train.steps=30"), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "step-00000030.rank0-of1.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    again = run_cli("train", QUICK, *common, *sets("train.steps=40"), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed_from=20" in again.stdout, again.stdout + again.stderr[-2000:]
    assert "skipping step 30" in again.stderr


def test_every_rank_of_a_running_job_serves_metrics_and_health(tmp_path: Path) -> None:
    base = free_ports(2)  # rank 0 and rank 1
    proc = start_cli(
        "launch", QUICK, "--launcher", "torchrun", "--nproc", "2",
        *sets(f"checkpoint.dir={tmp_path}", "train.steps=100000", f"metrics.port={base}"),
    )  # fmt: skip
    seen: dict[int, str] = {}

    def both_ranks_serve() -> bool:
        for rank in (0, 1):
            metrics = try_http_get(f"http://127.0.0.1:{base + rank}/metrics")
            health = try_http_get(f"http://127.0.0.1:{base + rank}/healthz")
            if metrics is None or health is None or (metrics[0], health[0]) != (200, 200):
                continue
            if f'ngd_steps_total{{rank="{rank}"}}' in metrics[1]:
                seen[rank] = metrics[1]
        return len(seen) == 2

    try:
        wait_until(both_ranks_serve, 120, "metrics and health of both ranks", proc=proc,
                   details=lambda: proc.stderr.read()[-3000:] if proc.poll() is not None else "")  # fmt: skip
        for rank, text in seen.items():
            assert f'ngd_samples_per_second{{rank="{rank}"}}' in text
            assert 'ngd_communication_bytes_total{kind="factors"' in text
    finally:
        kill_tree(proc.pid)
        proc.communicate()


def test_sigterm_to_ngd_dist_launch_reaches_the_workers_which_checkpoint(tmp_path: Path) -> None:
    """A scheduler (or `docker stop`) signals `ngd-dist launch`: it hands SIGTERM to the launcher, the
    workers save a preemption checkpoint and stop, and nothing is left running."""
    base = free_ports(2)
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # output to files, not pipes: workers orphaned by a launch that died would hold pipes open
    with out_file.open("w") as out, err_file.open("w") as err_out:
        proc = start_cli(
            "launch", QUICK, "--launcher", "torchrun", "--nproc", "2",
            *sets(f"checkpoint.dir={tmp_path / 'ckpt'}", "train.steps=100000", "checkpoint.every=100000",
                  f"metrics.port={base}"),
            stdout=out, stderr=err_out,
        )  # fmt: skip

    def rank_1_stepping() -> bool:  # rank 1's health body: "ok step N" once its loop runs
        reply = try_http_get(f"http://127.0.0.1:{base + 1}/healthz")
        return reply is not None and re.fullmatch(r"ok step [1-9]\d*\s*", reply[1]) is not None

    launched: list[int] = []
    try:
        wait_until(rank_1_stepping, 120, "rank 1 to report a step", proc=proc)
        launched = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # the launch process only, as a scheduler would
        proc.wait(timeout=90)
        # the launcher may outlive the launch process by a moment; then nothing may be left
        wait_until(lambda: not any(alive(pid) for pid in launched), 30,
                   "the launcher and workers to exit after `ngd-dist launch` ended",
                   details=lambda: err_file.read_text()[-3000:])  # fmt: skip
    finally:
        kill_tree(proc.pid)
        for pid in descendants(proc.pid) + launched:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    err = err_file.read_text()
    saved = {rank: sorted((tmp_path / "ckpt").glob(f"step-*.rank{rank}-of2.pt")) for rank in (0, 1)}
    assert saved[0], err[-3000:]
    assert saved[1], err[-3000:]
    assert saved[0][-1].name.split(".")[0] == saved[1][-1].name.split(".")[0]  # the same step on both ranks
    assert "SIGTERM" in err, err[-3000:]

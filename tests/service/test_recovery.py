"""Surviving crashes: kill -9 of a rank under torchrun with restarts, and a truncated checkpoint.

(Metrics and health of every rank of a running job, and SIGTERM to ``ngd-dist launch``, are checked on
one job in tests/service/test_failures.py, with preemption.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.support import (
    QUICK,
    ROOT,
    assert_same_params,
    checkpoint_params,
    cli_env,
    descendants,
    kill_tree,
    run_cli,
    sets,
    start_cli,
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


def _launch(directory: Path, steps: int, restarts: int, release: Path) -> subprocess.Popen[str]:
    """A 2-rank launch whose model pauses inside step 13 until ``release`` exists (no pause if it does)."""
    model = {
        "name": "tests.fixtures.stall_model:make_model",
        "args": {"release_file": str(release), "pause_after": 12, "step_sleep": 0.0, "max_wait": 120},
    }
    return start_cli(
        "launch", QUICK, "--launcher", "torchrun", "--nproc", "2", "--max-restarts", str(restarts),
        *sets(f"model={json.dumps(model)}", "preconditioner.output_module=head", "train.eval_every=0",
              f"checkpoint.dir={directory}", f"train.steps={steps}", "checkpoint.every=10", "train.log_every=10",
              "metrics.port=0"),
        env=cli_env(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)),
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out\n{out[-2000:]}\n{err[-3000:]}") from None


def test_kill_9_of_one_rank_restarts_from_the_checkpoint_and_ends_as_if_uninterrupted(tmp_path: Path) -> None:
    """Both ranks' models block inside step 13, after the checkpoint of step 10, until the test creates
    the release file: the kill lands mid-run on a machine of any speed. The reference run never pauses."""
    steps, release = 30, tmp_path / "release"
    release.touch()
    reference = _launch(tmp_path / "reference", steps, restarts=0, release=release)
    out, err = _finish(reference, 240)
    assert reference.returncode == 0, err[-3000:]

    release.unlink()
    crashed = _launch(tmp_path / "crashed", steps, restarts=1, release=release)
    try:
        victim = wait_until(
            lambda: list((tmp_path / "crashed").glob("step-*.rank1-of2.pt")) and _worker_of_rank(crashed.pid, 1),
            180, "rank 1 running after its first checkpoint", proc=crashed, interval=0.05,
        )  # fmt: skip
        os.kill(victim, signal.SIGKILL)
        release.touch()  # the restarted ranks (and rank 0, which the launcher stops) run on
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
    common = sets(f"checkpoint.dir={tmp_path}", "checkpoint.every=2", "checkpoint.keep=5", "batch.per_rank=32",
                  "train.eval_every=0", "metrics.port=0")  # fmt: skip
    first = run_cli("train", QUICK, *common, *sets("train.steps=6"), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "step-00000006.rank0-of1.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    again = run_cli("train", QUICK, *common, *sets("train.steps=8"), timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed_from=4" in again.stdout, again.stdout + again.stderr[-2000:]
    assert "skipping step 6" in again.stderr

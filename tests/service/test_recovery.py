"""Surviving crashes: kill -9 of a rank under torchrun with restarts, and a truncated checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ngd_dist.service.checkpoint import CheckpointStore

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("ngd-dist"))
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}


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


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _worker_of_rank(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"ngd_dist.cli" in cmdline:
            return pid
    return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it (torchrun puts workers in their own groups)."""
    for victim in [*_descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _params(directory: Path, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    store = CheckpointStore(directory, rank=rank, world_size=world)
    return store.load(store.path_for(step))["model"]


def _launch(directory: Path, steps: int, restarts: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            CLI, "launch", QUICK, "--launcher", "torchrun", "--nproc", "2", "--max-restarts", str(restarts),
            "--set", f"checkpoint.dir={directory}", "--set", f"train.steps={steps}",
            "--set", "checkpoint.every=25", "--set", "train.log_every=25",
        ],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out\n{out[-2000:]}\n{err[-3000:]}") from None


def test_kill_9_of_one_rank_restarts_from_the_checkpoint_and_ends_as_if_uninterrupted(tmp_path: Path) -> None:
    steps = 500  # long enough that the kill lands mid-run on a fast machine
    reference = _launch(tmp_path / "reference", steps, restarts=0)
    out, err = _finish(reference, 240)
    assert reference.returncode == 0, err[-3000:]

    crashed = _launch(tmp_path / "crashed", steps, restarts=1)
    try:
        deadline = time.monotonic() + 180
        victim = None
        while time.monotonic() < deadline:
            if list((tmp_path / "crashed").glob("step-*.rank1-of2.pt")):
                victim = _worker_of_rank(crashed.pid, 1)
                if victim is not None:
                    break
            if crashed.poll() is not None:
                break
            time.sleep(0.05)
        assert victim is not None, "rank 1 was not found running after its first checkpoint"
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        _kill_tree(crashed.pid)
        crashed.communicate()
        raise
    out, err = _finish(crashed, 240)
    assert crashed.returncode == 0, err[-4000:]
    assert "resumed_from=" in out, out + err[-3000:]
    for rank in (0, 1):
        want, got = _params(tmp_path / "reference", steps, rank, 2), _params(tmp_path / "crashed", steps, rank, 2)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path: Path) -> None:
    common = ["--set", f"checkpoint.dir={tmp_path}", "--set", "checkpoint.every=10", "--set", "checkpoint.keep=5"]
    first = subprocess.run([CLI, "train", QUICK, *common, "--set", "train.steps=30"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    assert first.returncode == 0, first.stderr[-3000:]
    newest = tmp_path / "step-00000030.rank0-of1.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    again = subprocess.run([CLI, "train", QUICK, *common, "--set", "train.steps=40"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed_from=20" in again.stdout, again.stdout + again.stderr[-2000:]
    assert "skipping step 30" in again.stderr


def test_every_rank_of_a_running_job_serves_metrics_and_health(tmp_path: Path) -> None:
    import urllib.request

    from ngd_dist.testing.distributed import free_ports

    base = free_ports(2)  # rank 0 and rank 1
    proc = subprocess.Popen(
        [
            CLI, "launch", QUICK, "--launcher", "torchrun", "--nproc", "2",
            "--set", f"checkpoint.dir={tmp_path}", "--set", "train.steps=100000", "--set", f"metrics.port={base}",
        ],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline and proc.poll() is None:
            for rank in (0, 1):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{base + rank}/metrics", timeout=2) as r:
                        text = r.read().decode()
                    with urllib.request.urlopen(f"http://127.0.0.1:{base + rank}/healthz", timeout=2) as r:
                        health = r.status
                except OSError:
                    continue
                if f'ngd_steps_total{{rank="{rank}"}}' in text and health == 200:
                    seen[rank] = text
            time.sleep(0.2)
        assert set(seen) == {0, 1}, proc.stderr.read()[-3000:] if proc.poll() is not None else "no metrics"
        for rank, text in seen.items():
            assert f'ngd_samples_per_second{{rank="{rank}"}}' in text
            assert 'ngd_communication_bytes_total{kind="factors"' in text
    finally:
        _kill_tree(proc.pid)
        proc.communicate()


def test_sigterm_to_ngd_dist_launch_reaches_the_workers_which_checkpoint(tmp_path: Path) -> None:
    """A scheduler (or `docker stop`) signals `ngd-dist launch`: it hands SIGTERM to the launcher, the
    workers save a preemption checkpoint and stop, and nothing is left running."""
    import urllib.request

    from ngd_dist.testing.distributed import free_ports

    base = free_ports(2)
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # output to files, not pipes: workers orphaned by a launch that died would hold pipes open
    with out_file.open("w") as out, err_file.open("w") as err_out:
        proc = subprocess.Popen(
            [
                CLI, "launch", QUICK, "--launcher", "torchrun", "--nproc", "2",
                "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", "--set", "train.steps=100000",
                "--set", "checkpoint.every=100000", "--set", f"metrics.port={base}",
            ],
            cwd=ROOT, env=_env(), stdout=out, stderr=err_out, start_new_session=True,
        )
    descendants: list[int] = []
    try:
        deadline, stepping = time.monotonic() + 120, False
        while not stepping and time.monotonic() < deadline and proc.poll() is None:
            try:  # rank 1's health body: "ok step N" once its loop runs
                with urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/healthz", timeout=2) as r:
                    body = r.read().decode()
                stepping = body.startswith("ok step") and int(body.split()[-1]) > 0
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        assert stepping, "rank 1 never reported a step"
        descendants = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # the launch process only, as a scheduler would
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30  # the launcher may outlive the launch process by a moment
        while time.monotonic() < deadline and [pid for pid in descendants if _alive(pid)]:
            time.sleep(0.2)
        left = [pid for pid in descendants if _alive(pid)]
    finally:
        _kill_tree(proc.pid)
        for pid in _descendants(proc.pid) + descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    err = err_file.read_text()
    assert not left, "launcher or workers left running after `ngd-dist launch` ended"
    saved = {rank: sorted((tmp_path / "ckpt").glob(f"step-*.rank{rank}-of2.pt")) for rank in (0, 1)}
    assert saved[0] and saved[1], err[-3000:]
    assert saved[0][-1].name.split(".")[0] == saved[1][-1].name.split(".")[0]  # the same step on both ranks
    assert "SIGTERM" in err, err[-3000:]

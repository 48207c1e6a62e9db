"""The `ngd-dist` command line: validate, launch --dry-run, train, resume, and the 2-rank quickstart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ngd_dist.testing.distributed import free_ports

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("ngd-dist"))
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def ngd(*args: str, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_validate_prints_the_resolved_job() -> None:
    proc = ngd("validate", QUICK, "--set", "optimizer.lr=0.05")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.05" in proc.stdout
    assert "valid" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optimizer.lr_rate=1"], "did you mean 'lr'"),
        (["preconditioner.curvature=fisher"], "preconditioner.curvature"),
        (["train.steps=-3"], "train.steps"),
    ],
)
def test_bad_jobs_exit_2_with_one_line(overrides: list[str], needle: str) -> None:
    args = [x for o in overrides for x in ("--set", o)]
    for command in ("validate", "train"):
        proc = ngd(command, QUICK, *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1
        assert needle in lines[0]
        assert "Traceback" not in proc.stderr


def test_missing_file_and_bad_model_exit_2(tmp_path: Path) -> None:
    proc = ngd("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    proc = ngd("train", QUICK, "--set", "model.args.hiden=3", "--set", f"checkpoint.dir={tmp_path}")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "hiden" in proc.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_launch_dry_run_prints_the_launcher_command(launcher: str) -> None:
    proc = ngd("launch", QUICK, "--launcher", launcher, "--nproc", "2", "--dry-run", "--set", "train.steps=5")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "ngd_dist.cli train" in line
    assert "--set train.steps=5" in line
    assert ("--nproc-per-node 2" in line) if launcher == "torchrun" else ("-np 2" in line)


def _summary(stdout: str) -> tuple[str, float, float]:
    """The worker's summary line and the first and last loss it reports."""
    summary = [line for line in stdout.splitlines() if line.startswith("done:")][-1]
    first, last = summary.split("loss ")[1].split(" wall")[0].split(" -> ")
    return summary, float(first), float(last)


def _final_params(directory: Path, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    from ngd_dist.service.checkpoint import CheckpointStore

    store = CheckpointStore(directory, rank=rank, world_size=world)
    return store.load(store.path_for(step))["model"]


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    common = ["--set", "checkpoint.every=10", "--set", "train.log_every=10", "--set", "metrics.port=0"]
    full = ngd(
        "train", QUICK, *common, "--set", f"checkpoint.dir={tmp_path / 'full'}", "--set", "train.steps=30"
    )
    assert full.returncode == 0, full.stderr
    part = ngd(
        "train", QUICK, *common, "--set", f"checkpoint.dir={tmp_path / 'part'}", "--set", "train.steps=20"
    )
    assert part.returncode == 0, part.stderr
    rest = ngd(
        "train", QUICK, *common, "--set", f"checkpoint.dir={tmp_path / 'part'}", "--set", "train.steps=30"
    )
    assert rest.returncode == 0 and "resumed_from=20" in rest.stdout, rest.stdout + rest.stderr
    a, b = _final_params(tmp_path / "full", 30, 0, 1), _final_params(tmp_path / "part", 30, 0, 1)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_two_rank_quickstart_lowers_the_loss_with_identical_parameters(launcher: str, tmp_path: Path) -> None:
    proc = ngd(
        "launch",
        QUICK,
        "--launcher",
        launcher,
        "--nproc",
        "2",
        "--set",
        f"checkpoint.dir={tmp_path}",
        "--set",
        "train.steps=30",
        "--set",
        "checkpoint.every=30",
        "--set",
        f"metrics.port={free_ports(2)}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary, first, last = _summary(proc.stdout)
    assert last < 0.5 * first, summary
    assert "ranks=2" in summary
    p0, p1 = _final_params(tmp_path, 30, 0, 2), _final_params(tmp_path, 30, 1, 2)
    for name in p0:
        torch.testing.assert_close(p0[name], p1[name], rtol=0, atol=0, msg=name)


def test_malformed_jobs_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every malformed job of tests/test_jobs.py: exit code 2 and one line on stderr, no traceback."""
    from ngd_dist.cli import main
    from tests.service.test_jobs import BAD

    assert len(BAD) >= 20
    for case, text, _path, fragment in BAD:
        job = tmp_path / f"{case}.yaml"
        job.write_text(text)
        assert main(["validate", str(job)]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, (case, err)


def _sets(*pairs: str) -> list[str]:
    """``--set`` before each ``key=value``."""
    return [x for pair in pairs for x in ("--set", pair)]


def test_a_user_model_and_dataset_train_unmodified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    user = _sets(
        "model.name=tests.fixtures.user_model:make_model",
        "data.name=tests.fixtures.user_model:make_data",
        "data.args={}",
        "batch.per_rank=32",
    )
    proc = ngd(
        "train",
        QUICK,
        *user,
        *_sets(
            "model.args={hidden: 16}",
            "train.steps=20",
            "preconditioner.output_module='2'",
            f"checkpoint.dir={tmp_path}",
        ),
    )
    unnamed = ngd(
        "train",
        QUICK,
        *user,
        *_sets(
            "model.args={}",
            "preconditioner.output_module=null",
            f"checkpoint.dir={tmp_path / 'x'}",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, first, last = _summary(proc.stdout)
    assert last < first, summary
    # without the head named, iEF cannot find the logits: one line naming the key and the likely head
    assert (
        unnamed.returncode == 2
    )
    assert (
        "preconditioner.output_module" in unnamed.stderr
    )
    assert (
        "'2'" in unnamed.stderr
    )


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh"])
def test_launch_wrappers(script: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / script), QUICK, "2", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ngd_dist.cli train" in proc.stdout

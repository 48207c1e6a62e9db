"""The `ngd-dist` command line: validate, launch --dry-run, train, resume, and the 2-rank quickstart."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ngd_dist.testing.distributed import free_ports
from tests.support import (
    QUICK,
    ROOT,
    assert_same_params,
    checkpoint_params,
    cli_env,
    run_cli,
    run_process,
    sets,
    summary_of,
)


def test_validate_prints_the_resolved_job() -> None:
    proc = run_cli("validate", QUICK, "--set", "optimizer.lr=0.05")
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
        proc = run_cli(command, QUICK, *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1
        assert needle in lines[0]
        assert "Traceback" not in proc.stderr


def test_missing_file_and_bad_model_exit_2(tmp_path: Path) -> None:
    proc = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    proc = run_cli("train", QUICK, "--set", "model.args.hiden=3", "--set", f"checkpoint.dir={tmp_path}")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "hiden" in proc.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_launch_dry_run_prints_the_launcher_command(launcher: str) -> None:
    proc = run_cli("launch", QUICK, "--launcher", launcher, "--nproc", "2", "--dry-run", "--set", "train.steps=5")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "ngd_dist.cli train" in line
    assert "--set train.steps=5" in line
    assert ("--nproc-per-node 2" in line) if launcher == "torchrun" else ("-np 2" in line)


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost", "127.0.1.1", "::1"])
def test_a_multi_node_launch_with_a_loopback_master_is_refused_in_one_line(address: str) -> None:
    proc = run_cli("launch", QUICK, "--nproc", "2", "--nnodes", "2", "--node-rank", "0",
                   "--master-addr", address, "--dry-run")  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout  # no command printed that would hang the other nodes
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--master-addr" in lines[0]
    assert address in lines[0]


def test_a_multi_node_launch_with_a_reachable_master_prints_its_command() -> None:
    proc = run_cli("launch", QUICK, "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                   "--master-addr", "10.0.0.1", "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--master-addr 10.0.0.1" in proc.stdout or "--master_addr 10.0.0.1" in proc.stdout, proc.stdout


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    common = sets("checkpoint.every=10", "train.log_every=10", "metrics.port=0")
    full = run_cli("train", QUICK, *common, *sets(f"checkpoint.dir={tmp_path / 'full'}", "train.steps=30"))
    assert full.returncode == 0, full.stderr
    part = run_cli("train", QUICK, *common, *sets(f"checkpoint.dir={tmp_path / 'part'}", "train.steps=20"))
    assert part.returncode == 0, part.stderr
    rest = run_cli("train", QUICK, *common, *sets(f"checkpoint.dir={tmp_path / 'part'}", "train.steps=30"))
    assert rest.returncode == 0, rest.stderr
    assert "resumed_from=20" in rest.stdout, rest.stdout + rest.stderr
    assert_same_params(checkpoint_params(tmp_path / "part", 30, 0, 1), checkpoint_params(tmp_path / "full", 30, 0, 1))


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_two_rank_quickstart_lowers_the_loss_with_identical_parameters(launcher: str, tmp_path: Path) -> None:
    proc = run_cli(
        "launch", QUICK, "--launcher", launcher, "--nproc", "2",
        *sets(f"checkpoint.dir={tmp_path}", "train.steps=30", "checkpoint.every=30", f"metrics.port={free_ports(2)}"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary, first, last = summary_of(proc.stdout)
    assert last < 0.5 * first, summary
    assert "ranks=2" in summary
    assert_same_params(checkpoint_params(tmp_path, 30, 1, 2), checkpoint_params(tmp_path, 30, 0, 2), "rank 1 vs 0")


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
        assert len(err.splitlines()) == 1, (case, err)
        assert fragment in err, (case, err)
        assert "Traceback" not in err, (case, err)


def test_a_user_model_and_dataset_train_unmodified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    user = sets(
        "model.name=tests.fixtures.user_model:make_model",
        "data.name=tests.fixtures.user_model:make_data",
        "data.args={}",
        "batch.per_rank=32",
    )
    proc = run_cli(
        "train",
        QUICK,
        *user,
        *sets(
            "model.args={hidden: 16}",
            "train.steps=20",
            "preconditioner.output_module='2'",
            f"checkpoint.dir={tmp_path}",
        ),
    )
    unnamed = run_cli(
        "train",
        QUICK,
        *user,
        *sets(
            "model.args={}",
            "preconditioner.output_module=null",
            f"checkpoint.dir={tmp_path / 'x'}",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, first, last = summary_of(proc.stdout)
    assert last < first, summary
    # without the head named, iEF cannot find the logits: one line naming the key and the likely head
    assert unnamed.returncode == 2, unnamed.stderr
    assert "preconditioner.output_module" in unnamed.stderr
    assert "'2'" in unnamed.stderr


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh"])
def test_launch_wrappers(script: str) -> None:
    env = cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = run_process(["bash", str(ROOT / "launch" / script), QUICK, "2", "--dry-run"], timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ngd_dist.cli train" in proc.stdout

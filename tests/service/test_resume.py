"""Resuming: an explicit ``checkpoint.resume`` (a step, a directory or one of a run's files) on every
rank, checked by ``ngd-dist validate``; and a checkpoint whose job no longer fits the new one
(model, data, optimizer, world size, ...) refused in one line, exit 2, on one rank and on two."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ngd_dist.cli import main
from tests.support import (
    QUICK,
    CommandServer,
    assert_same_params,
    checkpoint_params,
    run_cli,
    sets,
)

TINY = sets("train.steps=6", "checkpoint.every=3", "train.log_every=3", "metrics.port=0")
"""Six steps, checkpoints at 3 and 6."""


def _launch(*extra: str) -> list[str]:
    """``ngd-dist launch`` of the tiny quickstart on 2 ranks under torchrun (gloo, CPU)."""
    return ["launch", QUICK, "--launcher", "torchrun", "--nproc", "2", *TINY, *extra]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints of a finished 2-rank run: steps 3 and 6 of ranks 0 and 1."""
    directory = tmp_path_factory.mktemp("two_rank") / "run"
    proc = run_cli(*_launch(*sets(f"checkpoint.dir={directory}")), timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(list(directory.glob("step-*.pt"))) == 4
    return directory


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "checkpoint.resume" in line]


# -- explicit resume on 2 ranks ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file", "step", "directory"])
def test_an_explicit_resume_works_on_every_rank(form: str, two_rank_run: Path, tmp_path: Path) -> None:
    """Each rank loads its own rank's file of the step named, and the run ends as the original did."""
    if form == "file":  # rank 0's file names the step: rank 1 must load its own file of that step
        where = sets(f"checkpoint.resume={two_rank_run / 'step-00000003.rank0-of2.pt'}",
                     f"checkpoint.dir={tmp_path / 'new'}")  # fmt: skip
        out, step = tmp_path / "new", 3
    elif form == "step":  # step 3 of checkpoint.dir, though step 6 is newer
        out, step = _copy(two_rank_run, tmp_path), 3
        where = sets("checkpoint.resume=3", f"checkpoint.dir={out}")
    else:  # the newest step of a directory of per-rank files, saving elsewhere
        out, step = tmp_path / "new", 6
        where = sets(f"checkpoint.resume={two_rank_run}", f"checkpoint.dir={out}", "train.steps=9")
    proc = run_cli(*_launch(*where), timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"resumed_from={step}" in proc.stdout, proc.stdout[-2000:]
    if form == "directory":
        assert_same_params(checkpoint_params(out, 9, 1, 2), checkpoint_params(out, 9, 0, 2), "rank 1 vs 0")
        return
    for rank in (0, 1):
        assert_same_params(checkpoint_params(out, 6, rank, 2), checkpoint_params(two_rank_run, 6, rank, 2), f"rank {rank}")


@pytest.mark.parametrize("problem", ["model-change", "damaged-on-one-rank"])
def test_a_resume_that_cannot_work_stops_every_rank_with_its_line(
    problem: str, two_rank_run: Path, tmp_path: Path
) -> None:
    copy = _copy(two_rank_run, tmp_path)
    if problem == "model-change":
        extra = sets(f"checkpoint.dir={copy}", "model.args.hidden=64")
        expected = f"the checkpoint at step 6 in {copy} was written by a different job: model.args.hidden 128 -> 64"
    else:  # rank 1's file of step 3 verifies on nobody's disk but its own: the others must not train on
        damaged = copy / "step-00000003.rank1-of2.pt"
        damaged.write_bytes(damaged.read_bytes()[:1000])
        extra = sets(f"checkpoint.dir={copy}", "checkpoint.resume=3")
        expected = str(damaged)
    proc = run_cli(*_launch(*extra), timeout=120)
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)
    assert any(expected in line for line in lines), proc.stderr[-4000:]
    assert "size mismatch" not in proc.stderr
    assert "done:" not in proc.stdout


# -- one process: the exit code ----------------------------------------------------------------------
# A run refused at start-up is forked from the `commands` server (tests/support.py: CommandServer), the
# console script's entry point without the seconds of a fresh interpreter importing torch.


def test_resume_after_a_model_change_is_refused_in_one_line_exit_2(
    tmp_path: Path, commands: CommandServer
) -> None:
    common = sets(f"checkpoint.dir={tmp_path}", "metrics.port=0", "train.log_every=2", "checkpoint.every=2")
    first = run_cli("train", QUICK, *common, *sets("train.steps=4"), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]

    changed = commands.run(
        ["train", QUICK, *common, *sets("train.steps=6", "model.args.hidden=64", "optimizer.name=adamw")],
        tmp_path.parent / f"{tmp_path.name}-out", timeout=120,
    )  # fmt: skip
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "Traceback" not in changed.stderr
    (line,) = _error_lines(changed.stderr)
    assert line.startswith(f"ngd-dist train: checkpoint.resume: the checkpoint at step 4 in {tmp_path} was "), line
    assert "model.args.hidden 128 -> 64; optimizer.name 'sgd' -> 'adamw'" in line, line
    assert "train.steps" not in line.split("(")[0], line  # allowed changes are not listed

    allowed = sets(
        "train.steps=6", "train.log_every=1", "train.eval_every=2", "checkpoint.every=3", "checkpoint.keep=5",
        "metrics.enabled=false", "name=renamed", "distributed.timeout_s=100",
    )  # fmt: skip
    again = run_cli("train", QUICK, *common, *allowed, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed_from=4" in again.stdout, again.stdout + again.stderr[-2000:]


_EDITED_MODEL = """from torch import nn


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, {hidden}), nn.ReLU(), nn.Linear({hidden}, 10))
"""


def test_a_model_whose_code_changed_under_the_same_job_is_refused_in_one_line(
    tmp_path: Path, commands: CommandServer
) -> None:
    """The job is the same, the user's factory (beside the job file) is not: what the job comparison
    cannot see is still one line, exit 2, when the state does not load."""
    job = tmp_path / "job.yaml"
    job.write_text(Path(QUICK).read_text())
    factory = tmp_path / "edited_model.py"
    common = sets(
        "model.name=edited_model:make_model", "model.args={}", "preconditioner.output_module='3'",
        f"checkpoint.dir={tmp_path / 'run'}", "metrics.port=0",
    )  # fmt: skip
    factory.write_text(_EDITED_MODEL.format(hidden=16))
    first = run_cli("train", str(job), *common, *sets("train.steps=2"), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    factory.write_text(_EDITED_MODEL.format(hidden=8))
    again = commands.run(["train", str(job), *common, *sets("train.steps=4")], tmp_path / "out", timeout=120)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    (line,) = _error_lines(again.stderr)
    assert f"the checkpoint at step 2 in {tmp_path / 'run'} does not fit this job: " in line, line
    assert "size mismatch for 1.weight" in line, line


@pytest.mark.parametrize("resume", ["auto", "6", "directory"])
def test_resume_with_another_world_size_is_refused(
    resume: str, two_rank_run: Path, tmp_path: Path, commands: CommandServer
) -> None:
    copy = _copy(two_rank_run, tmp_path)
    value = str(copy) if resume == "directory" else resume
    proc = commands.run(
        ["train", QUICK, *TINY, *sets(f"checkpoint.dir={copy}", f"checkpoint.resume={value}")], tmp_path / "out",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert f"the checkpoint at step 6 in {copy} was written by a different job: world size 2 -> 1" in line, line
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in two_rank_run.iterdir())


# -- validate -----------------------------------------------------------------------------------------


def _validate(capsys: pytest.CaptureFixture[str], *pairs: str) -> tuple[int, str]:
    code = main(["validate", QUICK, *sets(*pairs)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_validate_checks_an_explicit_resume(two_rank_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = two_rank_run
    (tmp_path / "empty").mkdir()
    renamed = tmp_path / "renamed.pt"
    shutil.copy(run / "step-00000003.rank0-of2.pt", renamed)
    good = [
        ("checkpoint.resume=3", f"checkpoint.dir={run}"),
        ("checkpoint.resume=6", f"checkpoint.dir={run}", "batch.global=512"),
        (f"checkpoint.resume={run}", "checkpoint.dir=null", "checkpoint.every=0"),
        (f"checkpoint.resume={run / 'step-00000006.rank1-of2.pt'}",),
        ("checkpoint.resume=never",),
        ("checkpoint.resume=auto", f"checkpoint.dir={tmp_path / 'not-yet'}"),
    ]
    for pairs in good:
        code, err = _validate(capsys, *pairs)
        assert code == 0, (pairs, err)
    bad = [
        (("checkpoint.resume=4", f"checkpoint.dir={run}"), f"no checkpoint of step 4 in {run} (steps there: 3, 6)"),
        (("checkpoint.resume=3", f"checkpoint.dir={run}", "batch.global=256"), "world size 2 -> 1"),
        (("checkpoint.resume=3", "checkpoint.dir=null", "checkpoint.every=0"), "needs checkpoint.dir"),
        ((f"checkpoint.resume={tmp_path / 'nope'}",), f"{tmp_path / 'nope'} does not exist"),
        ((f"checkpoint.resume={tmp_path / 'empty'}",), "holds no checkpoints"),
        ((f"checkpoint.resume={renamed}",), "step-NNNNNNNN.rankR-ofW.pt"),
        (("checkpoint.resume=[3]",), "auto, never"),
    ]
    for pairs, fragment in bad:
        code, err = _validate(capsys, *pairs)
        assert code == 2, (pairs, err)
        assert len(err.splitlines()) == 1, err
        assert err.startswith("ngd-dist validate: "), (pairs, err)
        assert "checkpoint.resume: " in err, (pairs, err)
        assert fragment in err, (pairs, err)
    copy = _copy(run, tmp_path)
    (copy / "step-00000003.rank1-of2.pt").unlink()
    code, err = _validate(capsys, "checkpoint.resume=3", f"checkpoint.dir={copy}")
    assert code == 2, err
    assert f"step 3 in {copy} lacks the file of rank 1 of 2" in err, err


def test_validate_through_the_command_line(two_rank_run: Path) -> None:
    proc = run_cli("validate", QUICK, *sets("checkpoint.resume=5", f"checkpoint.dir={two_rank_run}"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"ngd-dist validate: checkpoint.resume: no checkpoint of step 5 in {two_rank_run} (steps there: 3, 6)"
    )

"""A bad day through the real CLI and torchrun (2 ranks, gloo): NaN data, a diverging run, a factor
that cannot be decomposed, and the final checkpoint (issue 9, items 1, 3 and 12).

- A step whose loss or gradients are non-finite on any rank is skipped on every rank (no optimizer,
  factor or schedule step; it does not count towards ``train.steps``), counted by reason in the
  summary and ``ngd_skipped_steps_total``, and logged by rank 0.
- ``train.max_bad_steps`` such steps in a row stop the job: one line, exit code 3 (DIVERGED).
- No checkpoint ever holds a non-finite tensor: the save refuses (exit code 3).
- A factor that fails to decompose ``preconditioner.max_failed_decompositions`` times in a row stops
  the job: one line naming the layer and the remedies, exit code 4 (DECOMPOSITION_FAILED).
- The last step is always checkpointed when ``checkpoint.dir`` is set (checked by the NaN-row runs).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from ngd_dist.service.checkpoint import CheckpointStore
from ngd_dist.service.exit_codes import ExitCode
from ngd_dist.service.jobs import JobError, job_from_dict
from ngd_dist.service.metrics import MetricsExporter
from ngd_dist.service.trainer import TrainResult, summary_line
from ngd_dist.testing.distributed import free_port
from tests.support import QUICK, ROOT, cli_env, http_get, run_cli, sets, summary_of

NAN_DATA = "data.name=tests.fixtures.nan_data:make_data"
SKIPPED = re.compile(r"\[rank (\d+)\] WARNING step (\d+) skipped: ")


def _env() -> dict[str, str]:
    """The CLI's environment with the repository root importable (for ``tests.fixtures.nan_data``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return cli_env(PYTHONPATH=path)


def _job(directory: Path, *pairs: str) -> list[str]:
    """The quickstart made tiny: 32 samples per rank, metrics off, checkpoints in ``directory``."""
    return sets("metrics.port=0", "batch.per_rank=32", "train.eval_every=0", f"checkpoint.dir={directory}", *pairs)


def _launch(directory: Path, *pairs: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``ngd-dist launch`` of the tiny quickstart on 2 torchrun ranks."""
    return run_cli(
        "launch", QUICK, "--launcher", "torchrun", "--nproc", "2", *_job(directory, *pairs),
        timeout=timeout, env=_env(),
    )  # fmt: skip


def _train(directory: Path, *pairs: str) -> subprocess.CompletedProcess[str]:
    """``ngd-dist train`` of the tiny quickstart in one process (no launcher)."""
    return run_cli("train", QUICK, *_job(directory, *pairs), timeout=120, env=_env())


def _skipped(summary: str) -> dict[str, int]:
    """The ``skipped=N (reason=n, ...)`` part of a summary line, by reason."""
    match = re.search(r" skipped=(\d+)(?: \(([^)]*)\))?", summary)
    assert match is not None, summary
    reasons = dict(item.split("=") for item in (match.group(2) or "").split(", ") if item)
    counts = {k: int(v) for k, v in reasons.items()}
    assert sum(counts.values()) == int(match.group(1)), summary
    return counts


def _one_line_error(stderr: str, *needles: str) -> str:
    """The worker's error line (``ngd-dist train: ...``) holding every needle; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-4000:]
    # from its start: rank 0's progress bar may precede it on the same line (no newline between)
    lines = [line[line.index("ngd-dist train:"):] for line in stderr.splitlines() if "ngd-dist train:" in line]
    assert lines, stderr[-4000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _checkpoints(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step-*.pt"))


def _finite(value: object) -> bool:
    """Whether every float tensor and float in a (nested) checkpoint entry is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


# -- non-finite steps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preconditioner", "steps", "every", "saved"),
    [("true", 40, 0, [40]), ("false", 45, 20, [20, 40, 45])],
    ids=["preconditioned-final-checkpoint-only", "plain-sgd-checkpoint-every-20"],
)
def test_a_nan_row_skips_its_steps_on_every_rank_the_run_stays_finite_and_the_last_step_is_checkpointed(
    tmp_path: Path, preconditioner: str, steps: int, every: int, saved: list[int]
) -> None:
    """The last step is always checkpointed: with ``checkpoint.every=0`` (no periodic checkpoint) and when
    ``train.steps`` is not a multiple of ``checkpoint.every``."""
    result = _launch(
        tmp_path, NAN_DATA, "data.args.nan_rows=[5]", f"preconditioner.enabled={preconditioner}",
        f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.keep=5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary, first, last = summary_of(result.stdout)
    assert f"steps={steps} " in summary, summary
    assert math.isfinite(first), summary
    assert math.isfinite(last), summary
    skipped = _skipped(summary)
    # 512 rows, 64 per step: the row with NaN comes once in each of the 5+ epochs, on one rank
    assert skipped.keys() == {"nonfinite_loss"}, summary
    assert skipped["nonfinite_loss"] >= 5, summary
    logged = SKIPPED.findall(result.stderr)
    assert len(logged) == skipped["nonfinite_loss"], result.stderr[-4000:]
    assert {rank for rank, _ in logged} == {"0"}, logged  # one line per skipped step, from rank 0
    assert _checkpoints(tmp_path) == [f"step-{s:08d}.rank{r}-of2.pt" for s in saved for r in (0, 1)]
    for step in saved:
        states = [CheckpointStore(tmp_path, rank=r, world_size=2).load(tmp_path / f"step-{step:08d}.rank{r}-of2.pt")
                  for r in (0, 1)]  # fmt: skip
        for state in states:
            assert _finite(state), f"step {step}: a non-finite tensor was saved"
            assert state["step"] == step
            assert state["scheduler"]["last_epoch"] == step  # the schedule stepped once per applied step
        for name, tensor in states[0]["model"].items():
            assert torch.equal(tensor, states[1]["model"][name]), f"step {step}: ranks disagree on {name}"


def test_steps_that_stay_non_finite_stop_the_job_with_exit_code_3_and_nothing_saved(tmp_path: Path) -> None:
    result = _launch(tmp_path, NAN_DATA, "data.args.nan_every=16", "train.max_bad_steps=4", "train.steps=40")
    line = _one_line_error(result.stderr, "train.max_bad_steps", "4 steps in a row", "step 1", "non-finite")
    assert result.returncode == ExitCode.DIVERGED, (line, result.stderr[-3000:])
    assert _checkpoints(tmp_path) == []
    assert len(SKIPPED.findall(result.stderr)) == 4


def test_ngd_dist_train_exits_3_when_the_run_diverges(tmp_path: Path) -> None:
    result = _train(tmp_path, NAN_DATA, "data.args.nan_every=16", "train.max_bad_steps=3", "train.steps=10")
    _one_line_error(result.stderr, "train.max_bad_steps", "3 steps in a row")
    assert result.returncode == ExitCode.DIVERGED
    assert "done:" not in result.stdout


def test_a_state_with_non_finite_values_is_never_checkpointed(tmp_path: Path) -> None:
    """Inputs of 1e20 keep loss and gradients finite (~1e20), but AdamW's second moment (g^2 ~ 1e40)
    overflows float32: the save refuses that state."""
    result = _launch(
        tmp_path, NAN_DATA, "data.args.scale=1e20", "preconditioner.enabled=false", "optimizer.name=adamw",
        "checkpoint.every=1", "train.steps=5",
    )  # fmt: skip
    line = _one_line_error(result.stderr, "not saved", "optimizer.state.", "exp_avg_sq", "non-finite")
    assert result.returncode == ExitCode.DIVERGED, result.stderr[-3000:]
    match = re.search(r"step (\d+) not saved", line)
    assert match is not None, line
    refused = int(match.group(1))
    # the steps before were saved, finite; the refused one left nothing behind on any rank
    assert _checkpoints(tmp_path) == [f"step-{s:08d}.rank{r}-of2.pt" for s in range(1, refused) for r in (0, 1)]
    for name in _checkpoints(tmp_path):
        rank = int(name.split(".rank")[1][0])
        assert _finite(CheckpointStore(tmp_path, rank=rank, world_size=2).load(tmp_path / name)), name


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("deepspeed"), reason="deepspeed is not installed"
)
def test_a_nan_row_under_deepspeed_skips_its_steps(tmp_path: Path) -> None:
    extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ROOT / ".cache" / "torch_extensions")
    extensions.mkdir(parents=True, exist_ok=True)
    env = {**_env(), "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = run_cli(
        "launch", QUICK, "--launcher", "deepspeed", "--nproc", "2", "--master-port", str(free_port()),
        *_job(tmp_path, NAN_DATA, "data.args.nan_rows=[5]", "train.steps=24"), timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary, _, last = summary_of(result.stdout)
    assert "steps=24 " in summary, summary
    assert math.isfinite(last), summary
    assert _skipped(summary).get("nonfinite_loss", 0) >= 3, summary
    assert _finite(CheckpointStore(tmp_path, rank=1, world_size=2).load(tmp_path / "step-00000024.rank1-of2.pt"))


# -- failing decompositions ------------------------------------------------------------------------

HUGE_FACTORS = (
    NAN_DATA, "data.args.scale=1e20",           # A factors ~1e40: they fit in float64, not in float32
    "preconditioner.factor_dtype=float64", "preconditioner.inverse_every=1",
    "preconditioner.max_failed_decompositions=2", "optimizer.lr=1e-30", "train.steps=10",
)  # fmt: skip


def test_a_factor_that_keeps_failing_to_decompose_stops_the_job_with_exit_code_4(tmp_path: Path) -> None:
    result = _launch(tmp_path, *HUGE_FACTORS)
    _one_line_error(
        result.stderr, "failed to decompose 2 times in a row", "factor A of layer", "preconditioner.damping",
        "preconditioner.inverse_dtype=float64",
    )  # fmt: skip
    assert result.returncode == ExitCode.DECOMPOSITION_FAILED, result.stderr[-3000:]
    assert _checkpoints(tmp_path) == []


def test_ngd_dist_train_exits_4_and_the_remedy_works(tmp_path: Path) -> None:
    failed = _train(tmp_path / "float32", *HUGE_FACTORS)
    _one_line_error(failed.stderr, "failed to decompose 2 times in a row")
    assert failed.returncode == ExitCode.DECOMPOSITION_FAILED
    fixed = _train(tmp_path / "float64", *HUGE_FACTORS, "preconditioner.inverse_dtype=float64")
    assert fixed.returncode == 0, fixed.stderr[-3000:]


# -- the summary, the counter and the job field ----------------------------------------------------


def _result(**changes: object) -> TrainResult:
    fields: dict[str, object] = {
        "steps": 40, "applied": 40, "first_loss": 2.3, "last_loss": 0.5, "seconds": 2.0,
        "samples_per_second": 1000.0, "resumed_from": None, "preempted": False, "skipped": {},
    }  # fmt: skip
    return TrainResult(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_summary_line_says_what_happened() -> None:
    assert summary_line(_result(), total=40, ranks=2).startswith("done: steps=40 loss 2.3000 -> 0.5000 wall=2.0s")
    assert " skipped=0" in summary_line(_result(), total=40, ranks=2)
    skipped = summary_line(_result(skipped={"nonfinite_loss": 3, "nonfinite_gradient": 1}), total=40, ranks=2)
    assert "skipped=4 (nonfinite_loss=3, nonfinite_gradient=1)" in skipped
    none_applied = summary_line(
        _result(steps=12, applied=0, first_loss=math.nan, last_loss=math.nan, skipped={"nonfinite_loss": 2},
                preempted=True, resumed_from=12),
        total=40, ranks=2,
    )  # fmt: skip
    assert none_applied.startswith("done: steps=12 of 40, no step applied in this run"), none_applied
    assert "skipped=2 (nonfinite_loss=2)" in none_applied, none_applied
    assert "nothing to do" not in none_applied, none_applied
    assert "nan" not in none_applied, none_applied
    finished = summary_line(_result(applied=0, first_loss=math.nan, last_loss=math.nan), total=40, ranks=2)
    assert finished == "done: nothing to do, checkpoint at step 40 of 40"


def test_skipped_steps_are_exported_by_reason() -> None:
    exporter = MetricsExporter(rank=1, world_size=2, port=free_port())
    try:
        exporter.observe_skipped_step(reason="nonfinite_loss", loss=float("nan"))
        exporter.observe_skipped_step(reason="nonfinite_loss", loss=float("nan"))
        exporter.observe_skipped_step(reason="nonfinite_gradient", loss=1.5)
        _, text = http_get(exporter.url + "/metrics")
    finally:
        exporter.close()
    assert 'ngd_skipped_steps_total{rank="1",reason="nonfinite_loss"} 2.0' in text, text
    assert 'ngd_skipped_steps_total{rank="1",reason="nonfinite_gradient"} 1.0' in text, text
    assert 'ngd_loss{rank="1"} 1.5' in text  # the loss gauge shows the skipped step's loss (NgdNonFiniteLoss)
    assert 'ngd_steps_total{rank="1"} 0.0' in text  # a skipped step is not a step


def test_max_bad_steps_is_a_train_field_with_a_documented_default() -> None:
    assert job_from_dict({}).train.max_bad_steps == 10
    assert job_from_dict({"train": {"max_bad_steps": 3}}).train.max_bad_steps == 3
    with pytest.raises(JobError, match=r"train\.max_bad_steps: got 0; expected an integer >= 1"):
        job_from_dict({"train": {"max_bad_steps": 0}})

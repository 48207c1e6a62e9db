"""metrics.tensorboard: rank 0 writes TensorBoard event files into the run directory, beside
metrics.jsonl (loss, learning rate, preconditioner state, phase times, evaluation); a resumed run
replaces what came after its checkpoint; refused in one line without the extra or a run directory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from ngd_dist.cli import main
from ngd_dist.service.records import METRICS_FILE, RunRecord, read_records
from tests.support import QUICK, refused_in_process, sets

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="needs the 'tensorboard' extra"
)


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``directory``, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@needs_tensorboard
def test_the_records_become_scalars_with_phase_seconds_per_step(tmp_path: Path) -> None:
    record = RunRecord(tmp_path, enabled=True, tensorboard=True)
    record.start("name: a\n", None)
    phases = {"forward": 0.25, "precondition": 0.5}
    record.write({"step": 2, "samples": 64, "wall_s": 1.0, "loss": 2.5, "lr": 0.1, "damping": 1e-3,
                  "kl_scale": 0.5, "gamma": None, "phases": phases})  # fmt: skip
    record.write({"step": 4, "samples": 128, "wall_s": 2.0, "loss": 1.5, "lr": 0.05, "damping": None,
                  "kl_scale": None, "gamma": 0.125, "phases": {"forward": 0.75, "precondition": 0.5}})  # fmt: skip
    record.write({"event": "eval", "step": 4, "wall_s": 2.5, "eval_loss": 1.25, "eval_accuracy": 0.75})
    record.close()
    assert len(read_records(tmp_path / METRICS_FILE)) == 3
    got = _scalars(tmp_path)
    assert got["train/loss"] == [(2, 2.5), (4, 1.5)]
    assert got["train/lr"] == [(2, pytest.approx(0.1)), (4, pytest.approx(0.05))]
    assert got["train/samples"] == [(2, 64.0), (4, 128.0)]
    assert got["preconditioner/damping"] == [(2, pytest.approx(1e-3))]  # null: not written
    assert got["preconditioner/kl_scale"] == [(2, 0.5)]
    assert got["preconditioner/gamma"] == [(4, 0.125)]
    # seconds per step in each phase since the last record: (0.75 - 0.25) / 2 and (0.5 - 0.5) / 2
    assert got["phase_seconds/forward"] == [(2, 0.125), (4, 0.25)]
    assert got["phase_seconds/precondition"] == [(2, 0.25), (4, 0.0)]
    assert got["eval/loss"] == [(4, 1.25)]
    assert got["eval/accuracy"] == [(4, 0.75)]
    assert not RunRecord(tmp_path / "rank1", enabled=False, tensorboard=True).active


@needs_tensorboard
def test_a_run_writes_its_scalars_and_a_resume_replaces_the_steps_after_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One process, 6 steps with evaluation at 3 and 6; then the same run resumed from step 3: each
    step's scalars appear once, as metrics.jsonl has them."""
    common = [QUICK, *sets("metrics.port=0", "metrics.tensorboard=true", "train.steps=6", "train.log_every=3",
                           "train.eval_every=3", "checkpoint.every=3", "batch.per_rank=64",
                           f"checkpoint.dir={tmp_path}")]  # fmt: skip
    assert main(["train", *common]) == 0
    first = _scalars(tmp_path)
    assert main(["train", *common, *sets("checkpoint.resume=3")]) == 0
    assert "resumed_from=3" in capsys.readouterr().out
    got = _scalars(tmp_path)
    records = read_records(tmp_path / METRICS_FILE)
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [s for s, _ in got["train/loss"]] == [3, 6]
    for tag, key, rows in (("train/loss", "loss", steps), ("train/lr", "lr", steps),
                           ("eval/loss", "eval_loss", evals), ("eval/accuracy", "eval_accuracy", evals)):  # fmt: skip
        want: list[tuple[int, Any]] = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
        assert got[tag] == want, tag
    assert got["train/loss"] == first["train/loss"]  # the resumed run repeats steps 4..6 bit for bit
    assert {"phase_seconds/forward", "phase_seconds/backward", "preconditioner/damping"} <= set(got), sorted(got)


def test_tensorboard_needs_a_run_directory_and_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused_in_process(capsys, "validate", QUICK, *sets("metrics.tensorboard=true", "checkpoint.dir=null", "checkpoint.every=0"))
    assert (
        "metrics.tensorboard: got True; expected false unless checkpoint.dir is set (the run directory the "
        "event files are written into)" in line
    ), line
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    line = refused_in_process(capsys, "validate", QUICK, *sets("metrics.tensorboard=true"))
    assert line == (
        f"ngd-dist validate: {QUICK}: metrics.tensorboard: true needs the 'tensorboard' extra: "
        "pip install 'ngd_dist[tensorboard]'"
    )
    line = refused_in_process(
        capsys, "train", QUICK, *sets("metrics.tensorboard=true", "metrics.port=0", f"checkpoint.dir={tmp_path}")
    )
    assert line.endswith("metrics.tensorboard: true needs the 'tensorboard' extra: pip install 'ngd_dist[tensorboard]'")

"""Evaluation on held-out data (``data.holdout``, ``train.eval_every``) and the per-run record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import IterableDataset

from ngd_dist.service.data.loading import TensorDicts, TensorPairs
from ngd_dist.service.evaluate import evaluate, holdout_split
from ngd_dist.service.jobs import JobError, job_from_dict, load_job
from ngd_dist.service.records import METRICS_FILE, RunRecord, read_records
from tests.support import QUICK, checkpoint_params, run_cli, sets, summary_of

CPU = torch.device("cpu")


def test_holdout_split_is_fixed_by_the_seed_disjoint_and_complete() -> None:
    data = TensorPairs(torch.arange(50.0).unsqueeze(1), torch.arange(50))
    train, held = holdout_split(data, 0.2, seed=3)
    again_train, again_held = holdout_split(data, 0.2, seed=3)
    _, other = holdout_split(data, 0.2, seed=4)
    ids = [int(held[i][1]) for i in range(len(held))]
    assert len(held) == 10
    assert len(train) == 40
    assert ids == [int(again_held[i][1]) for i in range(len(again_held))]
    assert ids != [int(other[i][1]) for i in range(len(other))]
    assert sorted(ids + [int(train[i][1]) for i in range(len(train))]) == list(range(50))
    assert len({*ids} & {int(again_train[i][1]) for i in range(len(again_train))}) == 0


def test_holdout_split_refuses_a_stream_and_a_split_with_an_empty_side() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(ValueError, match=r"^data\.holdout: 0\.1 needs a map-style dataset"):
        holdout_split(Stream(), 0.1, seed=0)
    with pytest.raises(ValueError, match=r"^data\.holdout: 0\.1 of 4 items leaves 0 to evaluate on"):
        holdout_split(TensorPairs(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), 0.1, seed=0)


def test_classification_loss_and_accuracy_are_those_of_the_whole_held_out_set() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(11, 3), torch.randint(0, 4, (11,))
    y[2] = -100  # counts for nothing
    ev = evaluate(model, TensorPairs(x, y), rank=0, world_size=1, batch_size=4, device=CPU, language_model=False)
    with torch.no_grad():
        logits = model(x)
    kept = y != -100
    assert ev.rows == 10
    assert ev.loss == pytest.approx(float(F.cross_entropy(logits[kept], y[kept])), rel=1e-6)
    assert ev.accuracy == pytest.approx(float((logits[kept].argmax(-1) == y[kept]).double().mean()))
    assert ev.perplexity is None
    assert model.training  # given back in the mode it was in
    # two "ranks" (without a process group) together see every item once
    halves = [
        evaluate(model, TensorPairs(x, y), rank=r, world_size=2, batch_size=3, device=CPU, language_model=False)
        for r in (0, 1)
    ]
    assert halves[0].rows + halves[1].rows == 10
    total = sum(h.loss * h.rows for h in halves) / 10
    assert total == pytest.approx(ev.loss, rel=1e-6)


class CausalLM(nn.Module):
    """Returns an object with ``.logits``, as a transformers model does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.head(self.emb(input_ids))})()


def test_language_model_loss_is_per_token_with_the_causal_shift_and_perplexity_its_exp() -> None:
    torch.manual_seed(0)
    model = CausalLM()
    ids = torch.randint(0, 7, (5, 6))
    labels = ids.clone()
    labels[0, 3:] = -100
    data = TensorDicts({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    ev = evaluate(model, data, rank=0, world_size=1, batch_size=2, device=CPU, language_model=True)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].reshape(-1, 7)
    targets = labels[:, 1:].reshape(-1)
    assert ev.rows == int((targets != -100).sum()) == 5 * 5 - 3
    expected = float(F.cross_entropy(logits, targets, ignore_index=-100))
    assert ev.loss == pytest.approx(expected, rel=1e-6)
    assert ev.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert ev.accuracy is None


def test_eval_every_without_held_out_data_is_one_line_naming_the_field() -> None:
    with pytest.raises(JobError, match=r"^<dict>: train\.eval_every: got 5; expected 0 unless data\.holdout > 0"):
        job_from_dict({"train": {"eval_every": 5}})
    with pytest.raises(JobError, match=r"^<dict>: data\.holdout: got 0\.9; expected"):
        job_from_dict({"data": {"holdout": 0.9}})
    job_from_dict({"train": {"eval_every": 5}, "data": {"holdout": 0.1}})


def test_the_run_record_keeps_what_comes_before_a_resume(tmp_path: Path) -> None:
    record = RunRecord(tmp_path, enabled=True)
    record.start("name: a\n", None)
    for step in (1, 2, 3):
        record.write({"step": step, "wall_s": float(step), "loss": math.nan if step == 2 else 1.0 / step})
    record.close()
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 4, "wal')  # a crash in the middle of a line
    assert [r["step"] for r in read_records(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert read_records(tmp_path / METRICS_FILE)[1]["loss"] is None  # NaN written as null
    resumed = RunRecord(tmp_path, enabled=True)
    resumed.start("name: b\n", 2)
    assert resumed.wall_offset == 2.0
    resumed.write({"step": 3, "wall_s": 2.5})
    resumed.close()
    assert [r["step"] for r in read_records(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert (tmp_path / "job.yaml").read_text() == "name: b\n"
    RunRecord(tmp_path, enabled=True).start("name: c\n", None)  # afresh: a new file
    assert read_records(tmp_path / METRICS_FILE) == []
    assert not RunRecord(tmp_path / "other", enabled=False).active


def test_a_run_evaluates_records_and_reports_without_changing_its_training(tmp_path: Path) -> None:
    """One process: held-out accuracy in the summary line, metrics.jsonl and job.yaml in the run
    directory; evaluating at other steps leaves the trained weights bit-identical."""
    runs = {}
    for every in (3, 6):
        directory = tmp_path / f"every{every}"
        result = run_cli(
            "train", QUICK,
            *sets("metrics.port=0", "train.steps=6", "train.log_every=3", f"train.eval_every={every}",
                  f"checkpoint.dir={directory}", "checkpoint.every=0", "batch.per_rank=64"),
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[every] = (directory, result)
    directory, result = runs[3]
    summary, _, _ = summary_of(result.stdout)
    assert " eval_loss=" in summary
    assert " eval_acc=" in summary
    records = read_records(directory / METRICS_FILE)
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in steps] == [3, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert set(steps[0]) >= {"step", "samples", "wall_s", "loss", "lr", "damping", "kl_scale", "gamma", "phases"}
    assert steps[1]["samples"] == 6 * 64
    assert steps[0]["wall_s"] < steps[1]["wall_s"]
    assert 0.0 <= evals[-1]["eval_accuracy"] <= 1.0
    assert f"eval_acc={evals[-1]['eval_accuracy']:.4f}" in summary
    assert "step 3: eval_loss=" in result.stderr
    job = load_job(directory / "job.yaml")
    assert (job.train.eval_every, job.data.holdout) == (3, 0.1)
    assert yaml.safe_load((directory / "job.yaml").read_text())["train"]["steps"] == 6
    assert json.dumps(records)  # plain JSON throughout
    a, b = (checkpoint_params(runs[e][0], 6, 0, 1) for e in (3, 6))
    for name in a:
        assert torch.equal(a[name], b[name]), name

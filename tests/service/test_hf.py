"""Hugging Face models in the service: dict batches, ModelOutput logits, the causal-LM shift and -100
labels, the built-in factories (config dict, local pretrained directory, Conv1D as Linear), the
'hf' extra, what DeepSpeed and the quality probe refuse, and one 2-rank launch of
configs/gpt2_tiny.yaml."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ngd_dist.cli import main
from ngd_dist.service.environment import Environment
from ngd_dist.service.jobs import JobError, load_job
from ngd_dist.service.trainer import Worker
from tests.support import ROOT, assert_same_params, checkpoint_params, run_cli, sets, summary_of

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs the 'hf' extra (transformers)"
)

GPT2 = str(ROOT / "configs" / "gpt2_tiny.yaml")
SMALL = [
    "metrics.port=0",
    "checkpoint.dir=null",
    "checkpoint.every=0",
    "data.args={n_sequences: 64, block_size: 16, vocab_size: 64, format: dict}",
    "batch.per_rank=4",
]
"""configs/gpt2_tiny.yaml cut down for one process: 64 sequences of 16 tokens, 4 a step."""

CLASSES = {
    "model.name": "hf_sequence_classification",
    "model.args": "{model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 16, vocab_size: 32, n_positions: 8, "
    "num_labels: 2, pad_token_id: 0, bos_token_id: 0, eos_token_id: 0}",
    "data.name": "tests.fixtures.data_sources:make_token_classes",
    "data.args": "{n: 32}",
}


def _worker(*overrides: str) -> Worker:
    torch.manual_seed(0)
    job = load_job(GPT2, [*SMALL, *overrides])
    return Worker(job, Environment(0, 1, 0, torch.device("cpu"), "single"))


@needs_hf
def test_a_causal_lm_trains_on_dict_batches_through_its_model_output() -> None:
    worker = _worker()
    assert worker.parts.task == "language_model"
    assert worker.parts.precond is not None
    assert worker.parts.precond.config.output_module == "lm_head"
    batch = next(worker.parts.loader.forever())
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(batch["labels"], batch["input_ids"])
    before = [p.detach().clone() for p in worker.parts.base_model.parameters()]
    outcome = worker.train_step(batch)
    assert outcome.skipped is None, outcome
    assert math.isfinite(outcome.loss)
    assert outcome.tokens == 4 * 15  # the first token of each sequence is no target
    assert worker.step == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, worker.parts.base_model.parameters(), strict=True))


@needs_hf
def test_labels_of_minus_100_carry_no_loss_and_are_no_tokens() -> None:
    worker = _worker("preconditioner.enabled=false")
    batch = next(worker.parts.loader.forever())
    labels = batch["labels"].clone()
    labels[:2, 10:] = -100  # padding at the end of two sequences
    padded = {**batch, "labels": labels}
    assert worker._tokens(padded) == 4 * 15 - 2 * 6
    model = worker.parts.model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
        got = worker._forward_loss(padded)
    torch.testing.assert_close(got, want)
    nothing = {**batch, "labels": torch.full_like(labels, -100)}
    with torch.no_grad():
        assert float(worker._forward_loss(nothing)) == 0.0  # no target at all: no loss, not NaN
    assert worker.train_step(padded).skipped is None


@needs_hf
def test_a_sequence_classifier_trains_on_dict_batches_with_one_label_each() -> None:
    worker = _worker(*(f"{k}={v}" for k, v in CLASSES.items()))
    assert worker.parts.task == "classification"
    assert worker.parts.precond is not None
    assert worker.parts.precond.config.output_module == "score"
    batch = next(worker.parts.loader.forever())
    assert batch["labels"].shape == (4,)
    outcome = worker.train_step(batch)
    assert outcome.skipped is None
    assert math.isfinite(outcome.loss)
    assert (outcome.tokens, outcome.samples) == (0, 4)


@needs_hf
def test_the_factories_build_from_a_config_or_a_local_directory(tmp_path: Path) -> None:
    from ngd_dist.service.catalog import build_model
    from ngd_dist.service.models import hf_causal_lm

    args = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 32, "n_positions": 8}
    torch.manual_seed(0)
    plain = hf_causal_lm(**args).eval()
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"  # the library handles it
    plain.save_pretrained(tmp_path / "saved")
    loaded = build_model("hf_causal_lm", {"pretrained": str(tmp_path / "saved")})
    assert (loaded.ngd_output_module, loaded.ngd_task) == ("lm_head", "language_model")
    assert_same_params(dict(loaded.state_dict()), dict(plain.state_dict()), "from_pretrained")
    with pytest.raises(ValueError, match=r"model\.args: building 'hf_causal_lm'.*expected a local directory"):
        build_model("hf_causal_lm", {"pretrained": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"needs model\.args\.model_type"):
        build_model("hf_causal_lm", {"n_layer": 1})


def test_without_transformers_a_hf_model_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    assert main(["validate", GPT2]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"ngd-dist validate: {GPT2}: model.name: hf_causal_lm needs the 'hf' extra: pip install 'ngd_dist[hf]'"
    )


@needs_hf
def test_dict_batches_are_refused_under_deepspeed_and_by_the_quality_probe(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["launch", GPT2, "--launcher", "deepspeed", "--nproc", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ngd-dist launch: model.name: got 'hf_causal_lm'"), err
    assert main(["launch", GPT2, "--launcher", "deepspeed", "--nproc", "2", "--dry-run",
                 "--set", "model.name=gpt", "--set", "model.args={}"]) == 2  # fmt: skip
    assert "data.args.format: got 'dict'; expected pairs under --launcher deepspeed" in capsys.readouterr().err
    worker = _worker("preconditioner.enabled=false")
    under_deepspeed = dataclasses.replace(worker.parts, engine=object())  # type: ignore[arg-type]
    worker.parts = under_deepspeed
    with pytest.raises(JobError, match=r"data: dict batches .* are not supported under --launcher deepspeed"):
        worker.train_step(next(worker.parts.loader.forever()))
    with pytest.raises(JobError, match=r"metrics\.quality_every: got 5; expected 0 with dict batches"):
        _worker(*(f"{k}={v}" for k, v in CLASSES.items()), "metrics.port=1", "metrics.quality_every=5")


@needs_hf
def test_gpt2_tiny_on_two_ranks_lowers_the_loss_with_identical_ranks(tmp_path: Path) -> None:
    """The one end-to-end launch: configs/gpt2_tiny.yaml under torchrun, 2 ranks (gloo, CPU)."""
    proc = run_cli(
        "launch", GPT2, "--launcher", "torchrun", "--nproc", "2",
        *sets(f"checkpoint.dir={tmp_path}", "train.steps=12", "checkpoint.every=12", "train.log_every=6",
              "metrics.port=0", "data.args.n_sequences=256", "batch.per_rank=8"),
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary, first, last = summary_of(proc.stdout)
    assert "ranks=2 skipped=0" in summary, summary
    assert last < first - 0.3, summary
    assert_same_params(checkpoint_params(tmp_path, 12, 1, 2), checkpoint_params(tmp_path, 12, 0, 2), "rank 1 vs 0")
    # The start-up log lists every layer: 8 Conv1D, 5 LayerNorms, wpe, the head with its tied embedding.
    log = proc.stderr
    assert "layers preconditioned, 100.0% of trainable parameters" in log, log[-3000:]
    rows = [line.strip() for line in log.splitlines() if line.startswith(("  module.transformer.", "  module.lm_head"))]
    assert sum(" Conv1D " in row for row in rows) == 8, rows
    assert sum(" LayerNorm " in row for row in rows) == 5, rows
    assert any(row.startswith("module.lm_head") and "tied: module.transformer.wte" in row for row in rows), rows
    assert "  left out: module.transformer.wte: tied to module.lm_head" in log

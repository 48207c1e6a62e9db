"""Evaluation on held-out data: the model's loss (and accuracy or perplexity) over every rank's shard.

A job holds out ``data.holdout`` of a map-style dataset (a fixed, seeded choice of items) when
``train.eval_every`` > 0. Every ``eval_every`` steps and at the end, each rank evaluates the items
``rank, rank + W, rank + 2W, ...`` of the held-out set in ``batch.per_rank`` batches, in eval mode and
without gradients; one all-reduce sums the loss, the counted rows and the correct predictions, so
every rank gets the same numbers. Rows labelled -100 count for nothing. Classification reports the
mean loss and the accuracy, a language model the mean loss per token and the perplexity ``exp(loss)``.
No random number is drawn: evaluating does not change what training does next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, Subset

from ngd_dist.kfac.outputs import IGNORE_INDEX, logits_of
from ngd_dist.service.data.loading import Batch, batch_labels, collate, to_device


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation found, the same on every rank."""

    loss: float
    """Mean loss per counted row (sample, or token of a language model)."""
    rows: int
    """Rows counted over all ranks."""
    accuracy: float | None = None
    """Fraction of counted rows whose largest logit is the label (classification)."""
    perplexity: float | None = None
    """``exp(loss)`` (language models)."""

    def fields(self) -> dict[str, float]:
        """``eval_loss`` and ``eval_accuracy`` or ``eval_perplexity``, for logs and records."""
        out = {"eval_loss": self.loss}
        if self.accuracy is not None:
            out["eval_accuracy"] = self.accuracy
        if self.perplexity is not None:
            out["eval_perplexity"] = self.perplexity
        return out

    def text(self) -> str:
        """``eval_loss=0.4321 eval_acc=0.9120`` (or ``eval_ppl=...``)."""
        parts = [f"eval_loss={self.loss:.4f}"]
        if self.accuracy is not None:
            parts.append(f"eval_acc={self.accuracy:.4f}")
        if self.perplexity is not None:
            parts.append(f"eval_ppl={self.perplexity:.3f}")
        return " ".join(parts)


def holdout_split(dataset: Dataset[Any], fraction: float, seed: int) -> tuple[Dataset[Any], Dataset[Any]]:
    """``(train, held_out)``: ``fraction`` of a map-style ``dataset``'s items, chosen by ``seed``.

    Both keep the dataset's order. ValueError naming ``data.holdout`` for an iterable dataset or one
    too small to leave items on both sides.
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            f"data.holdout: {fraction:g} needs a map-style dataset (with __len__); the data is "
            f"a {type(dataset).__name__} stream: set data.holdout to 0 and train.eval_every to 0"
        )
    size = len(dataset)
    held = round(size * fraction)
    if held < 1 or held >= size:
        raise ValueError(
            f"data.holdout: {fraction:g} of {size} items leaves {held} to evaluate on and "
            f"{size - held} to train on; expected at least one of each"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    held_out = sorted(order[:held].tolist())
    kept = sorted(order[held:].tolist())
    return Subset(dataset, kept), Subset(dataset, held_out)


def model_logits(model: nn.Module, batch: Batch) -> Tensor:
    """The logits of ``batch``: ``model(x)`` of ``(x, y)``, or ``model(**inputs)`` of a dict batch
    (every key but ``labels``); an output with ``.logits`` (a transformers ModelOutput) gives those.
    TypeError naming the output's type when it holds no logits tensor.
    """
    if isinstance(batch, dict):
        output = model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        output = model(batch[0])
    logits = logits_of(output)
    if logits is None:
        raise TypeError(type(output).__name__)
    return logits


def rows_and_targets(logits: Tensor, labels: Tensor, *, shift: bool) -> tuple[Tensor, Tensor]:
    """Logits as ``(rows, classes)`` and their targets ``(rows,)``; ``shift``: the causal-LM
    convention, ``logits[:, :-1]`` predict ``labels[:, 1:]``.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)


def evaluate(
    model: nn.Module,
    held_out: Dataset[Any],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device,
    language_model: bool,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Evaluate ``model`` on this rank's shard of ``held_out`` and reduce over the ranks (see above).

    Call it on every rank at once (one all-reduce when torch.distributed is initialised). The
    model is put in eval mode for the pass and given back in the mode it was in.
    """
    size = len(held_out)  # type: ignore[arg-type]
    mine = list(range(rank, size, world_size))
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, rows, correct
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            for start in range(0, len(mine), batch_size):
                items = [held_out[i] for i in mine[start : start + batch_size]]
                batch = to_device(collate(items), device)
                logits = model_logits(model, batch)
                shift = language_model and isinstance(batch, dict)
                flat, targets = rows_and_targets(logits, batch_labels(batch), shift=shift)
                counted = targets != IGNORE_INDEX
                loss = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
                correct = ((flat.argmax(dim=-1) == targets) & counted).sum()
                totals += torch.stack([loss.double(), counted.sum().double(), correct.double()])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.all_reduce(totals)
    loss_sum, rows, correct = totals.tolist()
    mean = loss_sum / rows if rows else math.nan
    if language_model:
        return Evaluation(mean, int(rows), perplexity=math.exp(min(mean, 700.0)) if rows else math.nan)
    return Evaluation(mean, int(rows), accuracy=correct / rows if rows else math.nan)

"""ViT + LoRA fine-tuning, small: the iEF paper's own setting (Wu et al. 2024) on a CPU budget.

A tiny Vision Transformer (``transformers.ViTConfig``: 8x8 single-channel images, 2x2 patches,
hidden size 32, 2 layers, 2 heads; built from the config, nothing is downloaded) is

1. **pre-trained** in full with AdamW on the digits of classes 0-4 only (training split), then
2. wrapped with **peft LoRA** (r=4 on the attention's query and value projections, which
   transformers 5 names ``q_proj`` / ``v_proj``; a freshly initialised classifier head trained in
   full through ``modules_to_save``) and **fine-tuned** on all ten classes.

The fine-tuning compares SGD (momentum 0.9), AdamW (weight decay 0), EF-K-FAC and iEF-K-FAC
(``KFACPreconditioner`` over SGD with momentum 0.9, the library's defaults otherwise: factors and
decompositions every step, KL clip 1e-3) with the same initial weights and the same batches for
every method. Each method is tuned on a small grid (learning rate; damping too for K-FAC) by the
final full-training-split loss of seed 0, and the picked setting is re-run with every seed.

Recorded per run: the batch loss and wall time of each step, the full-training-split loss and the
held-out accuracy (20% of the digits) every ``eval_every`` steps; for the re-runs also the iEF
paper's update-quality indicator γ (``ngd_dist.kfac.quality.quality_indicator``, on the step's
training batch) every ``gamma_every`` steps:

- *own trajectory*: γ of the direction each method takes (SGD: the gradient; AdamW: its applied
  update; K-FAC: the preconditioned gradient, before momentum);
- *paired*: along the EF-K-FAC and the iEF-K-FAC trajectories, at the same parameters and on the
  same batch, γ of the gradient, of EF-K-FAC's and iEF-K-FAC's directions (the other curvature's
  preconditioner is a shadow copy fed the same batches at the same parameters every step) and of
  the exact iEF direction (``exact_ief_direction``, damping 1e-7, all 1,354 trainable parameters).

Usage::

    .venv/bin/python benchmarks/vit_lora.py            # full run -> benchmarks/results/vit_lora.{json,png}
    .venv/bin/python benchmarks/vit_lora.py --quick    # smoke run (< 1 min) -> benchmarks/out/vit_lora/

The Markdown tables are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import machine_info  # noqa: E402

from ngd_dist import KFACConfig, KFACPreconditioner, exact_ief_direction, per_sample_gradients  # noqa: E402
from ngd_dist.kfac.config import Curvature  # noqa: E402
from ngd_dist.kfac.quality import quality_indicator  # noqa: E402
from ngd_dist.service.data.datasets import digits, split_holdout  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
warnings.filterwarnings("ignore", message=".*have not yet implemented the batching rule.*")

METHODS = ("sgd", "adamw", "kfac-ef", "kfac-ief")
PRETRAIN_CLASSES = 5
"""Pre-training sees only the digits of classes 0 .. PRETRAIN_CLASSES - 1."""
EXACT_IEF_DAMPING = 1e-7


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run of the benchmark."""

    steps: int = 200
    batch_size: int = 64
    eval_every: int = 5
    gamma_every: int = 20
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    momentum: float = 0.9
    kl_clip: float | None = 1e-3
    factor_every: int = 1
    inverse_every: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    sgd_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    adamw_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2, 0.1)
    kfac_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    threads: int = 1


def quick_settings(threads: int) -> Settings:
    """A smoke run: few steps, one point per grid, one seed."""
    return Settings(
        steps=20,
        eval_every=5,
        gamma_every=10,
        pretrain_steps=20,
        seeds=(0,),
        sgd_lrs=(0.3,),
        adamw_lrs=(1e-2,),
        kfac_lrs=(0.3,),
        dampings=(1e-2,),
        threads=threads,
    )


# -- data and model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The digits, split 80/20 (``split_holdout``, seed 0), images (N, 1, 8, 8) in [0, 1]."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data() -> Data:
    """The embedded digits, with 20% held out."""
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8).float()
    (x_train, y_train), (x_test, y_test) = split_holdout(x, y, 0.2, seed=0)
    return Data(x_train, y_train, x_test, y_test)


def vit_config() -> Any:
    """The tiny ViT of the benchmark (no dropout)."""
    from transformers import ViTConfig

    options: dict[str, Any] = {
        "image_size": 8,
        "patch_size": 2,
        "num_channels": 1,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_labels": 10,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    return ViTConfig(**options)


def batch_indices(samples: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Per step, ``batch_size`` distinct indices drawn from a private generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(samples, generator=g)[:batch_size] for _ in range(steps)])


def pretrain(data: Data, settings: Settings) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train the full ViT with AdamW on classes 0-4; its state dict and a few numbers about it."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(vit_config())
    keep = data.y_train < PRETRAIN_CLASSES
    x, y = data.x_train[keep], data.y_train[keep]
    opt = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    losses = []
    for idx in batch_indices(len(x), settings.pretrain_steps, settings.batch_size, seed=12345):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    test_keep = data.y_test < PRETRAIN_CLASSES
    with torch.no_grad():
        pred = model(pixel_values=data.x_test[test_keep]).logits.argmax(-1)
    info = {
        "steps": settings.pretrain_steps,
        "lr": settings.pretrain_lr,
        "classes": list(range(PRETRAIN_CLASSES)),
        "samples": len(x),
        "final_batch_loss": losses[-1],
        "held_out_accuracy_classes_0_4": float((pred == data.y_test[test_keep]).float().mean()),
        "seconds": time.perf_counter() - start,
    }
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


def lora_model(pretrained: dict[str, Tensor], seed: int) -> nn.Module:
    """The pre-trained ViT with a fresh classifier head and LoRA adapters (initialised from ``seed``)."""
    import peft
    from transformers import ViTForImageClassification

    cfg = vit_config()
    model = ViTForImageClassification(cfg)
    model.load_state_dict(pretrained)
    torch.manual_seed(1000 + seed)
    head = model.classifier
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        nn.init.normal_(head.weight, std=cfg.initializer_range)
        nn.init.zeros_(head.bias)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["classifier"],
    )
    wrapped: nn.Module = peft.get_peft_model(model, lora)
    wrapped.train()
    return wrapped


class Logits(nn.Module):
    """``model(pixel_values=x).logits`` as a module (``quality_indicator`` needs a tensor output)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: Tensor) -> Tensor:
        out: Tensor = self.inner(pixel_values=pixel_values).logits
        return out


# -- one run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A method and its hyper-parameters."""

    method: str
    lr: float
    damping: float | None = None

    def label(self) -> str:
        """``lr=…, damping=…``."""
        return f"lr={self.lr:g}" + (f", damping={self.damping:g}" if self.damping is not None else "")


@dataclass
class RunResult:
    """What one fine-tuning run recorded."""

    spec: Spec
    seed: int
    batch_loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    """Mean cross-entropy over the whole training split, after ``eval_steps`` updates."""
    eval_accuracy: list[float] = field(default_factory=list)
    """Held-out accuracy at ``eval_steps``."""
    gamma_steps: list[int] = field(default_factory=list)
    gamma_own: list[float] = field(default_factory=list)
    """γ of the method's own direction, at the parameters before that step."""
    paired: dict[str, list[float]] = field(default_factory=dict)
    """K-FAC runs: γ of the gradient / ``ef`` / ``ief`` / ``exact_ief`` directions at the same steps."""
    kl_scales: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    summary: str | None = None
    kfac_stats: dict[str, Any] | None = None
    """K-FAC runs: the preconditioner's counters at the end (decompositions, retries, failures ...)."""

    @property
    def final_loss(self) -> float:
        return self.eval_loss[-1] if self.eval_loss and self.diverged_at is None else math.inf

    def seconds_at(self, step: int) -> float:
        """Training seconds (evaluations and γ excluded) of the first ``step`` steps."""
        return sum(self.step_seconds[:step])


def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """Full training-split loss and held-out accuracy, in eval mode (K-FAC's hooks stay idle)."""
    model.eval()
    try:
        with torch.no_grad():
            loss = float(F.cross_entropy(model(pixel_values=data.x_train).logits, data.y_train))
            pred = model(pixel_values=data.x_test).logits.argmax(-1)
    finally:
        model.train()
    return loss, float((pred == data.y_test).float().mean())


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_kfac(
    model: nn.Module, curvature: str, damping: float, settings: Settings, opt: torch.optim.Optimizer | None
) -> KFACPreconditioner:
    """The benchmark's preconditioner; ``opt=None`` (a shadow) turns the KL clip off (it only rescales)."""
    config = KFACConfig(
        curvature=Curvature.parse("curvature", curvature),
        damping=damping,
        factor_every=settings.factor_every,
        inverse_every=settings.inverse_every,
        kl_clip=settings.kl_clip if opt is not None else None,
        method="eigen",  # the form docs/benchmarks.md quotes (the library default became inverse)
    )
    return KFACPreconditioner(model, config, optimizer=opt)


def forward_backward(model: nn.Module, precond: KFACPreconditioner | None, x: Tensor, y: Tensor) -> Tensor:
    """Zero the gradients, forward (marking the logits for K-FAC), loss, backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    logits = model(pixel_values=x).logits
    if precond is not None:
        precond.mark_output(logits)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss


def gamma(
    wrapper: Logits,
    x: Tensor,
    y: Tensor,
    direction: dict[str, Tensor],
    at: dict[str, Tensor] | None = None,
) -> float:
    """γ of ``direction`` (peft model's names) on the batch, at ``at`` (default: the current parameters)."""
    params = None if at is None else {f"inner.{n}": v for n, v in at.items()}
    prefixed = {f"inner.{n}": d for n, d in direction.items()}
    return quality_indicator(wrapper, x, y, prefixed, params=params).gamma


def exact_ief(wrapper: Logits, names: list[str], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The exact iEF update direction (minus Eq. 8's vector) on the batch, by parameter name.

    Computed in eval mode: in training mode the preconditioner's capture hooks would record the
    per-sample passes (inside ``vmap``) as statistics of the next step.
    """
    params = dict(wrapper.named_parameters())
    full = [f"inner.{n}" for n in names]
    wrapper.eval()
    try:
        jacobian, s, _ = per_sample_gradients(wrapper, full, x, y)
    finally:
        wrapper.train()
    flat = exact_ief_direction(jacobian, s, EXACT_IEF_DAMPING)
    out, offset = {}, 0
    for n, f in zip(names, full, strict=True):
        k = params[f].numel()
        out[n] = -flat[offset : offset + k].reshape(params[f].shape)
        offset += k
    return out


def train(
    spec: Spec,
    seed: int,
    settings: Settings,
    data: Data,
    pretrained: dict[str, Tensor],
    *,
    shadow_dampings: dict[str, float] | None = None,
    eval_every: int | None = None,
) -> RunResult:
    """Fine-tune one method from seed ``seed``, evaluating every ``eval_every`` steps (default: the settings).

    With ``shadow_dampings`` (the picked damping of each curvature), γ is recorded: of the method's
    own direction and, for K-FAC, the paired γ, with a shadow preconditioner of the other curvature.
    """
    measure = shadow_dampings is not None
    model = lora_model(pretrained, seed)
    params = trainable(model)
    names = list(params)
    precond: KFACPreconditioner | None = None
    if spec.method == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params.values(), lr=spec.lr, momentum=settings.momentum)
    curvature = spec.method.removeprefix("kfac-") if spec.method.startswith("kfac-") else None
    shadow: nn.Module | None = None
    shadow_pc: KFACPreconditioner | None = None
    if curvature is not None:
        assert spec.damping is not None
        precond = make_kfac(model, curvature, spec.damping, settings, opt)
        if shadow_dampings is not None:
            shadow = lora_model(pretrained, seed)  # identical to ``model``; reloaded at every step
            other = "ief" if curvature == "ef" else "ef"
            shadow_pc = make_kfac(shadow, other, shadow_dampings[other], settings, None)
    result = RunResult(spec, seed)
    if precond is not None:
        result.summary = precond.summary()
    wrapper = Logits(model)
    batches = batch_indices(len(data.x_train), settings.steps, settings.batch_size, seed=7919 * (seed + 1))
    loss0, acc0 = evaluate(model, data)
    result.eval_steps.append(0)
    result.eval_loss.append(loss0)
    result.eval_accuracy.append(acc0)
    for step, idx in enumerate(batches.tolist()):
        x, y = data.x_train[idx], data.y_train[idx]
        due = measure and step % settings.gamma_every == 0
        extra: dict[str, dict[str, Tensor]] = {}
        if shadow is not None and shadow_pc is not None:  # same parameters, same batch, every step
            shadow.load_state_dict(model.state_dict())
            forward_backward(shadow, shadow_pc, x, y)
            shadow_pc.step()
            if due:
                extra[shadow_pc.config.curvature.value] = {
                    n: -p.grad.detach().clone() for n, p in trainable(shadow).items() if p.grad is not None
                }
        start = time.perf_counter()
        loss = forward_backward(model, precond, x, y)
        ok = precond.step() if precond is not None else True
        paused = time.perf_counter()
        before: dict[str, Tensor] = {}
        if due:
            grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
            if spec.method == "adamw":
                before = {n: p.detach().clone() for n, p in params.items()}
            else:
                result.gamma_own.append(gamma(wrapper, x, y, {n: -g for n, g in grads.items()}))
            if curvature is not None:
                assert precond is not None
                extra[curvature] = {n: -g for n, g in grads.items()}
                plain = _plain_gradient(model, x, y)
                extra["gradient"] = plain
                extra["exact_ief"] = exact_ief(wrapper, names, x, y)
                for key in ("gradient", "ef", "ief", "exact_ief"):
                    result.paired.setdefault(key, []).append(gamma(wrapper, x, y, extra[key]))
            result.gamma_steps.append(step)
        resumed = time.perf_counter()
        if ok:
            opt.step()
        value = float(loss.detach())
        done = time.perf_counter()
        if due and spec.method == "adamw":
            update = {n: p.detach() - before[n] for n, p in params.items()}
            result.gamma_own.append(gamma(wrapper, x, y, update, at=before))
        result.step_seconds.append((paused - start) + (done - resumed))
        result.batch_loss.append(value)
        if precond is not None:
            result.kl_scales.append(precond.stats.kl_scale)
        if not math.isfinite(value):
            result.diverged_at = step
            break
        if (step + 1) % (eval_every or settings.eval_every) == 0 or step + 1 == settings.steps:
            loss_now, acc = evaluate(model, data)
            result.eval_steps.append(step + 1)
            result.eval_loss.append(loss_now)
            result.eval_accuracy.append(acc)
            if not math.isfinite(loss_now):
                result.diverged_at = step
                break
    if precond is not None:
        result.kfac_stats = asdict(precond.stats)
    return result


def _plain_gradient(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Minus the plain gradient of the batch loss (evaluated without K-FAC's hooks: eval mode)."""
    params = trainable(model)
    model.eval()
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
            grads = torch.autograd.grad(loss, list(params.values()))
    finally:
        model.train()
    return {n: -g.detach() for n, g in zip(params, grads, strict=True)}


# -- tuning, targets -------------------------------------------------------------------------------


def grid(method: str, settings: Settings) -> list[Spec]:
    """The tuning grid of ``method``."""
    if method == "sgd":
        return [Spec(method, lr) for lr in settings.sgd_lrs]
    if method == "adamw":
        return [Spec(method, lr) for lr in settings.adamw_lrs]
    return [Spec(method, lr, d) for lr in settings.kfac_lrs for d in settings.dampings]


def steps_to(run: RunResult, target: float) -> int | None:
    """The first evaluated step at which the training-split loss is at or below ``target``."""
    for step, loss in zip(run.eval_steps, run.eval_loss, strict=True):
        if loss <= target:
            return step
    return None


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(values) else None


# -- machine, output -------------------------------------------------------------------------------


def machine(settings: Settings) -> dict[str, Any]:
    """CPU model, cores, load, versions, date and commit (benchmarks/machine.py), and the HF versions."""
    import peft
    import transformers

    info = machine_info(settings.threads)
    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    return {**info, "nproc": info["cpu_count"], **versions}


def load() -> dict[str, Any]:
    """``uptime``-style load averages and the CPU pressure (PSI some avg60, %), now."""
    one, five, fifteen = os.getloadavg()
    pressure = None
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        pressure = float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return {"loadavg": [one, five, fifteen], "cpu_pressure_avg60": pressure}


def _clean(value: Any, digits: int = 6) -> Any:
    """JSON-safe copy: non-finite floats become None, floats keep ``digits`` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, digits) for v in value]
    return value


def run_record(run: RunResult, *, curves: bool) -> dict[str, Any]:
    """A run as JSON; ``curves`` keeps every step's loss and time."""
    record: dict[str, Any] = {
        **asdict(run.spec),
        "seed": run.seed,
        "final_loss": run.final_loss,
        "final_accuracy": run.eval_accuracy[-1] if run.eval_accuracy else None,
        "diverged_at": run.diverged_at,
        "mean_step_ms": 1e3 * sum(run.step_seconds) / max(len(run.step_seconds), 1),
    }
    if run.kl_scales:
        record["kl_clip_bound_fraction"] = sum(s < 1.0 for s in run.kl_scales) / len(run.kl_scales)
        record["kfac_stats"] = run.kfac_stats
    if curves:
        record.update(
            eval_steps=run.eval_steps,
            eval_loss=run.eval_loss,
            eval_accuracy=run.eval_accuracy,
            eval_seconds=[run.seconds_at(s) for s in run.eval_steps],
            batch_loss=run.batch_loss,
            step_ms=[t * 1e3 for t in run.step_seconds],
            gamma_steps=run.gamma_steps,
            gamma_own=run.gamma_own,
            paired=run.paired,
        )
    return record


COLORS = {"sgd": "tab:blue", "adamw": "tab:orange", "kfac-ef": "tab:green", "kfac-ief": "tab:red"}


def plot(picked: dict[str, list[RunResult]], path: Path) -> None:
    """Loss vs steps, loss vs seconds, γ of each method's direction, paired γ along iEF's trajectory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for method, runs in picked.items():
        for i, run in enumerate(runs):
            kw: dict[str, Any] = {"color": COLORS[method], "alpha": 1.0 if i == 0 else 0.35, "lw": 1.4}
            label = f"{method} ({run.spec.label()})" if i == 0 else None
            axes[0].plot(run.eval_steps, run.eval_loss, label=label, **kw)
            axes[1].plot([run.seconds_at(s) for s in run.eval_steps], run.eval_loss, **kw)
            if run.gamma_own:
                axes[2].plot(run.gamma_steps, run.gamma_own, marker="o", ms=3, label=label, **kw)
    adamw = picked["adamw"][0]
    for ax in axes[:2]:
        ax.axhline(adamw.final_loss, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_ylabel("training-split loss")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds (evaluations excluded)")
    axes[0].set_title("loss vs steps (seed 0 solid; dotted: AdamW final, seed 0)")
    axes[1].set_title("loss vs seconds")
    axes[2].set_title("γ of each method's own direction (batch)")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    styles = {"gradient": "tab:blue", "ef": "tab:green", "ief": "tab:red", "exact_ief": "black"}
    for i, run in enumerate(picked["kfac-ief"]):
        for key, color in styles.items():
            if key in run.paired:
                axes[3].plot(
                    run.gamma_steps,
                    run.paired[key],
                    color=color,
                    marker="o",
                    ms=3,
                    alpha=1.0 if i == 0 else 0.35,
                    label=key if i == 0 else None,
                )
    axes[3].set_title("paired γ along iEF-K-FAC's trajectory (same θ, same batch)")
    axes[3].set_xlabel("step")
    axes[3].set_yscale("log")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """The result tables."""
    s = report["summary"]
    lines = [
        "| method | picked | final train loss (mean; seeds) | held-out acc (mean) | steps to AdamW's final "
        "| × AdamW steps | s to AdamW's final | × AdamW s | step ms | median γ (own) | KL clip bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        m = s[method]
        seeds = ", ".join(_fmt(v, ".4g") for v in m["final_loss"])
        steps = ", ".join("–" if v is None else str(v) for v in m["steps_to_target"])
        secs = ", ".join(_fmt(v, ".2f") for v in m["seconds_to_target"])
        ratio = ", ".join(_fmt(v, ".2f") for v in m["steps_ratio"])
        sratio = ", ".join(_fmt(v, ".2f") for v in m["seconds_ratio"])
        bound = m.get("kl_clip_bound_fraction")
        lines.append(
            f"| {method} | {m['picked']} | {_fmt(m['final_loss_mean'], '.4g')} ({seeds}) | "
            f"{_fmt(m['accuracy_mean'], '.3f')} | {steps} | {ratio} | {secs} | {sratio} | "
            f"{_fmt(m['step_ms_mean'], '.1f')} | {_fmt(m['gamma_own_median'])} | "
            f"{'' if bound is None else f'{bound:.0%}'} |"
        )
    lines += [
        "",
        "Paired γ (same parameters, same batch; medians over the measured steps of all seeds; "
        "iEF<EF: share of measured steps):",
        "",
        "| trajectory | gradient | EF-K-FAC | iEF-K-FAC | exact iEF | iEF<EF |",
        "|---|---|---|---|---|---|",
    ]
    for method in ("kfac-ef", "kfac-ief"):
        p = s[method]["paired"]
        lines.append(
            f"| {method} | {_fmt(p['gradient'])} | {_fmt(p['ef'])} | {_fmt(p['ief'])} | "
            f"{_fmt(p['exact_ief'])} | {p['ief_below_ef']:.0%} ({p['ief_below_ef_count']}) |"
        )
    t = report["targets"]
    lines += [
        "",
        f"Targets: iEF-K-FAC steps / AdamW steps to AdamW's final loss ≤ 0.7: per seed "
        f"{', '.join(_fmt(v, '.2f') for v in t['steps_ratio'])} -> **{t['steps_met']}**; "
        f"iEF-K-FAC γ below EF-K-FAC's on most measured steps: paired (same θ, same batch) along "
        f"iEF's trajectory {t['paired_ief_traj']:.0%}, along EF's {t['paired_ef_traj']:.0%} -> "
        f"**{t['gamma_met_paired']}**; each on its own trajectory (different θ at the same step) "
        f"{t['own_gamma_ief_below_ef']:.0%} -> **{t['gamma_met_own']}**.",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def summarise(picked: dict[str, list[RunResult]], specs: dict[str, Spec]) -> dict[str, Any]:
    """Per method: losses, accuracies, steps and seconds to AdamW's final loss (per seed), γ medians."""
    target = {run.seed: run.final_loss for run in picked["adamw"]}
    adamw_steps = {run.seed: steps_to(run, target[run.seed]) for run in picked["adamw"]}
    adamw_secs = {
        run.seed: (None if adamw_steps[run.seed] is None else run.seconds_at(adamw_steps[run.seed] or 0))
        for run in picked["adamw"]
    }
    out: dict[str, Any] = {}
    for method, runs in picked.items():
        steps = [steps_to(r, target[r.seed]) for r in runs]
        secs = [None if st is None else r.seconds_at(st) for r, st in zip(runs, steps, strict=True)]
        ratio = [
            None if st is None or not adamw_steps[r.seed] else st / (adamw_steps[r.seed] or 1)
            for r, st in zip(runs, steps, strict=True)
        ]
        sratio = [
            None if sc is None or not adamw_secs[r.seed] else sc / (adamw_secs[r.seed] or 1.0)
            for r, sc in zip(runs, secs, strict=True)
        ]
        entry: dict[str, Any] = {
            "picked": specs[method].label(),
            "seeds": [r.seed for r in runs],
            "final_loss": [r.final_loss for r in runs],
            "final_loss_mean": _mean([r.final_loss for r in runs]),
            "accuracy": [r.eval_accuracy[-1] for r in runs],
            "accuracy_mean": _mean([r.eval_accuracy[-1] for r in runs]),
            "target": [target[r.seed] for r in runs],
            "steps_to_target": steps,
            "seconds_to_target": secs,
            "steps_ratio": ratio,
            "seconds_ratio": sratio,
            "step_ms_mean": _mean([1e3 * sum(r.step_seconds) / len(r.step_seconds) for r in runs]),
            "gamma_own_median": _median([g for r in runs for g in r.gamma_own]),
        }
        if runs[0].kl_scales:
            scales = [k for r in runs for k in r.kl_scales]
            entry["kl_clip_bound_fraction"] = sum(k < 1.0 for k in scales) / len(scales)
        if runs[0].paired:
            keys = ("gradient", "ef", "ief", "exact_ief")
            paired: dict[str, Any] = {k: _median([g for r in runs for g in r.paired[k]]) for k in keys}
            pairs = [(a, b) for r in runs for a, b in zip(r.paired["ief"], r.paired["ef"], strict=True)]
            below = sum(a < b for a, b in pairs)
            paired["ief_below_ef"] = below / len(pairs)
            paired["ief_below_ef_count"] = f"{below}/{len(pairs)}"
            entry["paired"] = paired
        out[method] = entry
    return out


def targets(picked: dict[str, list[RunResult]], summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's two targets, measured."""
    ratios = summary["kfac-ief"]["steps_ratio"]
    own = [
        (a, b)
        for ri, re in zip(picked["kfac-ief"], picked["kfac-ef"], strict=True)
        for a, b in zip(ri.gamma_own, re.gamma_own, strict=True)
    ]
    own_share = sum(a < b for a, b in own) / len(own) if own else math.nan
    p_ief = summary["kfac-ief"]["paired"]["ief_below_ef"]
    p_ef = summary["kfac-ef"]["paired"]["ief_below_ef"]
    steps_met = "met" if all(r is not None and r <= 0.7 for r in ratios) else "not met"
    return {
        "steps_ratio": ratios,
        "steps_met": steps_met,
        "own_gamma_ief_below_ef": own_share,
        "paired_ief_traj": p_ief,
        "paired_ef_traj": p_ef,
        "gamma_met_paired": "met" if min(p_ief, p_ef) > 0.5 else "not met",
        "gamma_met_own": "met" if own_share > 0.5 else "not met",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write JSON and PNG; print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 min)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    settings = quick_settings(args.threads) if args.quick else Settings(threads=args.threads)
    out: Path = args.out or ROOT / "benchmarks" / ("out/vit_lora" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", flush=True)

    load_before = load()
    data = load_data()
    pretrained, pre_info = pretrain(data, settings)
    log(f"pre-trained on classes 0-4: {pre_info}")

    grid_runs: list[RunResult] = []
    specs: dict[str, Spec] = {}
    for method in METHODS:
        runs = []
        for spec in grid(method, settings):
            run = train(spec, settings.seeds[0], settings, data, pretrained, eval_every=settings.steps)
            runs.append(run)
            log(f"grid {method} {spec.label()}: final loss {run.final_loss:.4g}")
        grid_runs += runs
        specs[method] = min(runs, key=lambda r: r.final_loss).spec
    dampings = {c: specs[f"kfac-{c}"].damping or 0.0 for c in ("ef", "ief")}
    log(f"picked: { {m: s.label() for m, s in specs.items()} }")

    picked: dict[str, list[RunResult]] = {m: [] for m in METHODS}
    for seed in settings.seeds:
        for method in METHODS:
            run = train(specs[method], seed, settings, data, pretrained, shadow_dampings=dampings)
            picked[method].append(run)
            log(f"seed {seed} {method}: final loss {run.final_loss:.4g}, acc {run.eval_accuracy[-1]:.3f}")
    summary = summarise(picked, specs)
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine(settings),
        "load_before": load_before,
        "load_after": load(),
        "total_seconds": time.perf_counter() - began,
        "pretrain": pre_info,
        "kfac_summary_ief": picked["kfac-ief"][0].summary,
        "grid": [run_record(r, curves=False) for r in grid_runs],
        "picked": {m: [run_record(r, curves=True) for r in runs] for m, runs in picked.items()},
        "summary": summary,
    }
    report["targets"] = targets(picked, summary)
    (out / "vit_lora.json").write_text(json.dumps(_clean(report), indent=1) + "\n")
    plot(picked, out / "vit_lora.png")
    print()
    print((picked["kfac-ief"][0].summary or "").splitlines()[0])
    print()
    print(markdown(_clean(report)))
    print()
    print(f"load before {report['load_before']}, after {report['load_after']}")
    log(f"wrote {out / 'vit_lora.json'} and vit_lora.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

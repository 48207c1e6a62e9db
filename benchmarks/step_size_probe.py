"""Does a model-based step size and momentum beat the default KL-clipped step to SGD's loss?

kfac-jax picks each step's size ``alpha`` and momentum ``mu`` by minimising the exact-GGN quadratic
model of the loss over the plane of the preconditioned step and the previous update (Martens &
Grosse 2015, sec. 7), optionally adapting the damping by Levenberg-Marquardt (sec. 6.5). This
probe asks whether that reaches SGD's final loss in fewer steps than ngd_dist's default step
(``KFACConfig`` defaults: a fixed learning rate and momentum under the KL clip).

The set-up of ``benchmarks/knob_sweep.py``: ``small_cnn(channels=3, width=32, side=32)`` on
``synthetic_images`` (3x32x32, 10 classes, 25,600 samples, each seen once), batch 128, 200 steps,
one process, one thread. Every run of a seed starts from the same weights and sees the same batches.

Runs, per seed (0, 1, 2 by default), in this order:

1. SGD (lr 0.02, momentum 0.9): its final loss is the target;
2. the default: iEF-K-FAC at ``KFACConfig`` defaults under SGD, lr 0.05, momentum 0.9 (knob_sweep's
   baseline);
3. quadratic-model runs (``MODEL_RUNS``), ``kl_clip=None``, the preconditioned gradient ``-delta``
   from ``KFACPreconditioner.step()`` and the step ``alpha delta + mu prev``: (a) alpha, mu every
   step at a fixed damping 0.03 (``method="inverse"``); (b) the same with LM adaptation of the
   damping every 5 steps from 0.03; (c) as (b) from 1.0; (d) as (b) with ``method="eigen"``;
   (e) alpha, mu computed every 10 steps and reused in between, LM every 10 steps from 0.03.

The quadratic model (:func:`quadratic_model`): ``q(alpha, mu) = alpha g.delta + mu g.prev +
1/2 s^T (GGN + lambda I) s`` with ``s = alpha delta + mu prev``, ``g`` the mean loss's gradient,
``GGN`` the exact Gauss-Newton matrix of the mean cross-entropy (per sample ``J^T (diag(p) - p
p^T) J``, ``J`` the logits' Jacobian, ``p`` the softmax), its products from ``torch.func.jvp`` over
``torch.func.functional_call`` on a hook-free copy of the model (the preconditioner's capture hooks
never see dual tensors) and ``lambda`` the preconditioner's current damping. ``alpha, mu`` solve its
2x2 system in float64 (``alpha`` alone while ``prev`` is zero). LM (:class:`AdaptiveDamping`): the
reduction ratio ``rho = (loss(theta + s) - loss(theta)) / (q(s) - q(0))`` on the step's own batch,
with the model's change taken without the ``lambda`` term (kfac-jax's default,
``include_damping_in_quad_change=False``; the JSON also records the ratio with it); ``rho > 3/4``
multiplies the damping by ``0.95^k`` (``k`` the steps between checks), ``rho < 1/4`` divides by
it, clamped to [1e-6, 1e3]. A run whose loss or gradient turns non-finite is stopped and recorded
as diverged.

Metrics per run: final loss (mean of the last 10 batch losses), steps to target (first step whose
trailing 10-step mean is at or below SGD's final loss of the same seed; "–" when never), its ratio
to SGD's own steps to that loss, the trailing 10-step mean at steps 25 / 50 / 100, wall seconds and
ms per step (information only: the machine is shared; the 1-minute load average is recorded at the
start and end of every run), the median alpha and mu used, the final damping, the fractions of LM
checks with rho > 3/4 and < 1/4, and the number of decompositions. A summary over seeds gives the
mean × SGD over the seeds that reached the target (the others counted as "not reached") and the
mean final loss over the seeds that did not diverge.

Usage::

    .venv/bin/python benchmarks/step_size_probe.py               # 3 seeds (~15-20 min on 2 cores)
    .venv/bin/python benchmarks/step_size_probe.py --quick       # smoke run: 20 steps, seed 0
    .venv/bin/python benchmarks/step_size_probe.py --seeds 0 1   # other seeds

Writes ``step_size_probe.{json,md}`` to benchmarks/results/ (``--quick``: benchmarks/out/step_size_probe/;
``--out``: that folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from knob_sweep import CHECKPOINTS, OUTPUT_MODULE, Settings, final, machine_line, make_batches, train  # noqa: E402
from machine import load1, machine_info  # noqa: E402
from target_bench import WINDOW, steps_to  # noqa: E402

from ngd_dist import KFACConfig, KFACPreconditioner  # noqa: E402
from ngd_dist.kfac.config import Method  # noqa: E402
from ngd_dist.service.data.datasets import synthetic_images  # noqa: E402
from ngd_dist.service.models import small_cnn  # noqa: E402

SGD = "sgd"
DEFAULT = "ngd_dist default (KL clip, lr 0.05, momentum 0.9)"


@dataclass(frozen=True)
class Probe:
    """What one probe does (learning rates, momentum and batch: ``knob_sweep.Settings``' defaults)."""

    steps: int = 200
    samples: int = 25600
    """steps x batch: every batch is new."""
    seeds: tuple[int, ...] = (0, 1, 2)
    lm_decay: float = 0.95
    """LM's per-step factor: a check ``k`` steps after the last one scales the damping by this^k."""
    lm_low: float = 0.25
    lm_high: float = 0.75
    damping_min: float = 1e-6
    damping_max: float = 1e3


QUICK = Probe(steps=20, samples=20 * 128, seeds=(0,))


@dataclass(frozen=True)
class ModelRun:
    """One quadratic-model run: its damping, its K-FAC method and how often alpha, mu and LM run."""

    name: str
    damping: float
    """The damping at step 0 (fixed unless ``lm``)."""
    lm: bool = False
    method: Method = Method.INVERSE
    every: int = 1
    """alpha and mu are computed every this many steps and reused in between."""
    lm_every: int = 5
    """LM checks every this many steps (at steps where alpha and mu were computed)."""


MODEL_RUNS = (
    ModelRun("quad model α,μ every step, damping 0.03 fixed", 0.03),
    ModelRun("quad model α,μ every step, LM damping from 0.03", 0.03, lm=True),
    ModelRun("quad model α,μ every step, LM damping from 1", 1.0, lm=True),
    ModelRun("quad model α,μ every step, LM damping from 0.03, eigen", 0.03, lm=True, method=Method.EIGEN),
    ModelRun("quad model α,μ every 10 steps, LM damping from 0.03", 0.03, lm=True, every=10, lm_every=10),
)


# -- the quadratic model -----------------------------------------------------------------------


class AdaptiveDamping:
    """A damping whose value Levenberg-Marquardt's rule changes; ``KFACConfig.damping`` calls it.

    The preconditioner reads it as a schedule (a callable of the step index) and gets the current
    value. With ``method="inverse"`` a change takes effect at the next decomposition only (the
    damping is built into the inverses; ``refresh_warmup`` decomposes at steps 0, 10, 20, 40, 80,
    100, 200 under the default factor_every 10 / inverse_every 100), while ``method="eigen"``
    applies it at every step.
    """

    def __init__(self, value: float, low: float = 1e-6, high: float = 1e3) -> None:
        self.value, self.low, self.high = value, low, high

    def __call__(self, step: int) -> float:
        return self.value

    def adapt(self, rho: float, factor: float, lower: float = 0.25, upper: float = 0.75) -> None:
        """LM: shrink by ``factor`` (< 1) when ``rho > upper``, grow by ``1/factor`` when ``rho < lower``."""
        if rho > upper:
            self.value *= factor
        elif rho < lower:
            self.value /= factor
        self.value = min(max(self.value, self.low), self.high)

    def __repr__(self) -> str:
        return f"AdaptiveDamping({self.value:g})"


def output_jvp(model: nn.Module, params: dict[str, Tensor], x: Tensor, vector: Sequence[Tensor]) -> Tensor:
    """``J v``: the change of ``model``'s logits on ``x`` along ``vector`` (one tensor per parameter).

    Forward-mode through ``functional_call``, so ``model`` should be a copy without hooks.
    """

    def logits(*values: Tensor) -> Tensor:
        return functional_call(model, dict(zip(params, values, strict=True)), (x,))

    with torch.no_grad():
        tangent = jvp(logits, tuple(params.values()), tuple(vector))[1]
    return tangent


def ggn_inner(ju: Tensor, jv: Tensor, probs: Tensor) -> float:
    """``u^T GGN v`` of the mean cross-entropy from ``J u``, ``J v`` and the softmax ``probs``.

    Per sample ``(J u)^T (diag(p) - p p^T) (J v)``, averaged over the batch, in float64.
    """
    ju, jv, p = ju.double(), jv.double(), probs.double()
    per_sample = (ju * jv * p).sum(-1) - (ju * p).sum(-1) * (jv * p).sum(-1)
    return per_sample.mean().item()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """The inner product of two parameter-shaped lists of tensors, in float64."""
    return sum((x.double() * y.double()).sum().item() for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Quadratic:
    """The quadratic model over ``s = alpha delta + mu prev``: its GGN, norm and gradient terms.

    ``q(alpha, mu) = alpha gd + mu gp + 1/2 [alpha mu] (C + damping N) [alpha mu]^T`` with ``C`` the
    GGN's 2x2 Gram matrix of ``delta, prev`` and ``N`` their Euclidean one.
    """

    ggn: tuple[float, float, float]
    """``delta^T GGN delta``, ``delta^T GGN prev``, ``prev^T GGN prev``."""
    norm: tuple[float, float, float]
    """``delta.delta``, ``delta.prev``, ``prev.prev``."""
    gd: float
    gp: float
    damping: float

    def matrix(self, with_damping: bool = True) -> tuple[float, float, float]:
        """The model's 2x2 curvature (dd, dp, pp), with or without the ``damping`` term."""
        scale = self.damping if with_damping else 0.0
        return tuple(c + scale * n for c, n in zip(self.ggn, self.norm, strict=True))  # type: ignore[return-value]

    def change(self, alpha: float, mu: float, with_damping: bool = True) -> float:
        """``q(alpha, mu) - q(0, 0)``: the loss change the model predicts for the step."""
        dd, dp, pp = self.matrix(with_damping)
        curvature = alpha * alpha * dd + 2 * alpha * mu * dp + mu * mu * pp
        return alpha * self.gd + mu * self.gp + 0.5 * curvature


def quadratic_model(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    probs: Tensor,
    grad: Sequence[Tensor],
    delta: Sequence[Tensor],
    prev: Sequence[Tensor],
    damping: float,
) -> Quadratic:
    """The exact-GGN quadratic model of the batch ``x`` around ``params`` over ``delta`` and ``prev``.

    ``model``: a hook-free copy of the trained model; ``probs``: the softmax of the logits at
    ``params``; ``grad``: the mean loss's gradient. A zero ``prev`` (the first step) costs no JVP.
    """
    jd = output_jvp(model, params, x, delta)
    dd = ggn_inner(jd, jd, probs)
    pp_norm = dot(prev, prev)
    if pp_norm == 0.0:
        ggn, norm = (dd, 0.0, 0.0), (dot(delta, delta), 0.0, 0.0)
    else:
        jp = output_jvp(model, params, x, prev)
        ggn = (dd, ggn_inner(jd, jp, probs), ggn_inner(jp, jp, probs))
        norm = (dot(delta, delta), dot(delta, prev), pp_norm)
    return Quadratic(ggn, norm, dot(grad, delta), dot(grad, prev), damping)


def solve_step(model: Quadratic) -> tuple[float, float]:
    """``alpha, mu`` minimising the damped model (2x2 solve in float64; ``mu = 0`` while prev is zero).

    A singular 2x2 system falls back to ``alpha`` alone.
    """
    dd, dp, pp = model.matrix()
    if pp == 0.0:
        return -model.gd / dd, 0.0
    system = torch.tensor([[dd, dp], [dp, pp]], dtype=torch.float64)
    try:
        alpha, mu = torch.linalg.solve(system, -torch.tensor([model.gd, model.gp], dtype=torch.float64))
    except torch.linalg.LinAlgError:
        return -model.gd / dd, 0.0
    return alpha.item(), mu.item()


def reduction_ratio(actual: float, predicted: float) -> float:
    """LM's ``rho`` = actual / predicted loss change; -1 (a bad step) unless a decrease was predicted."""
    if not math.isfinite(actual) or not predicted < 0:
        return -1.0
    return actual / predicted


# -- training ----------------------------------------------------------------------------------


def train_model_based(
    batches: Sequence[tuple[Tensor, Tensor]], seed: int, run: ModelRun, probe: Probe
) -> dict[str, Any]:
    """Train ``small_cnn`` from the seed's weights with quadratic-model steps; losses, times, counters.

    Stops at the first non-finite loss or gradient (``diverged_at``: that step).
    """
    torch.manual_seed(seed)
    model = small_cnn(channels=3, width=32, side=32)
    clone = copy.deepcopy(model)  # taken before the preconditioner hooks ``model``
    damping = AdaptiveDamping(run.damping, probe.damping_min, probe.damping_max)
    config = KFACConfig(
        output_module=OUTPUT_MODULE, seed=seed, method=run.method, damping=damping, kl_clip=None
    )
    precond = KFACPreconditioner(model, config, optimizer=None)
    named = dict(model.named_parameters())
    params = list(named.values())
    prev = [torch.zeros_like(p) for p in params]
    factor = probe.lm_decay**run.lm_every
    losses: list[float] = []
    times: list[float] = []
    alphas: list[float] = []
    mus: list[float] = []
    dampings: list[float] = []
    rhos: list[float] = []
    rhos_damped: list[float] = []
    diverged_at: int | None = None
    alpha = mu = 0.0
    quad: Quadratic | None = None
    load_start = load1()
    started = time.perf_counter()
    for t, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        model.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not math.isfinite(loss.item()):
            diverged_at = t
            break
        loss.backward()
        grad = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        if not precond.step():  # non-finite gradients: nothing preconditioned
            diverged_at = t
            break
        delta = [-p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
        if t % run.every == 0:
            current = {n: p.detach() for n, p in named.items()}
            probs = logits.detach().softmax(-1)
            quad = quadratic_model(clone, current, x, probs, grad, delta, prev, damping.value)
            alpha, mu = solve_step(quad)
        step = [alpha * d + mu * v for d, v in zip(delta, prev, strict=True)]
        with torch.no_grad():
            for p, s in zip(params, step, strict=True):
                p.add_(s)
        if run.lm and quad is not None and t % run.lm_every == 0 and t % run.every == 0:
            with torch.no_grad():
                after = {n: p.detach() for n, p in named.items()}
                new = F.cross_entropy(functional_call(clone, after, (x,)), y).item()
            rhos.append(reduction_ratio(new - loss.item(), quad.change(alpha, mu, with_damping=False)))
            rhos_damped.append(reduction_ratio(new - loss.item(), quad.change(alpha, mu)))
            damping.adapt(rhos[-1], factor, probe.lm_low, probe.lm_high)
        prev = step
        losses.append(loss.item())
        alphas.append(alpha)
        mus.append(mu)
        dampings.append(damping.value)
        times.append(time.perf_counter() - t0)
    return {
        "losses": losses,
        "diverged_at": diverged_at,
        "step_ms": 1000 * statistics.fmean(times) if times else None,
        "wall_s": time.perf_counter() - started,
        "load1_start": load_start,
        "load1_end": load1(),
        "decompositions": precond.stats.decompositions,
        "alphas": alphas,
        "mus": mus,
        "dampings": dampings,
        "rhos": rhos,
        "rhos_with_damping": rhos_damped,
    }


# -- analysis ----------------------------------------------------------------------------------


def fraction(values: Sequence[float], test: Callable[[float], bool]) -> float | None:
    """The fraction of ``values`` passing ``test`` (None when there are none)."""
    return sum(1 for v in values if test(v)) / len(values) if values else None


def summarise(run: dict[str, Any], target: float, sgd_steps: int | None, probe: Probe) -> dict[str, Any]:
    """A run's figures against the target loss and SGD's steps to it (a diverged run reaches nothing)."""
    losses = run["losses"]
    diverged = run.get("diverged_at") is not None
    reached = None if diverged else steps_to(losses, target)
    row: dict[str, Any] = {
        "diverged_at": run.get("diverged_at"),
        "final": None if diverged else final(losses),
        "steps_to_target": reached,
        "reached_before_diverging": steps_to(losses, target) if diverged else None,
        "steps_x_sgd": reached / sgd_steps if reached is not None and sgd_steps else None,
        "loss_at": {
            str(k): statistics.fmean(losses[k - WINDOW : k]) for k in CHECKPOINTS if k <= len(losses)
        },
        "step_ms": run["step_ms"],
        "wall_s": run["wall_s"],
        "load1_start": run["load1_start"],
        "load1_end": run["load1_end"],
        "decompositions": run.get("decompositions"),
        "kl_bound": run.get("kl_bound"),
        "losses": losses,
    }
    if "alphas" in run:
        high, low = probe.lm_high, probe.lm_low
        row.update(
            alpha_median=statistics.median(run["alphas"]) if run["alphas"] else None,
            mu_median=statistics.median(run["mus"]) if run["mus"] else None,
            damping_final=run["dampings"][-1] if run["dampings"] else None,
            lm_checks=len(run["rhos"]),
            rho_high=fraction(run["rhos"], lambda r: r > high),
            rho_low=fraction(run["rhos"], lambda r: r < low),
            rho_high_with_damping=fraction(run["rhos_with_damping"], lambda r: r > high),
            rho_low_with_damping=fraction(run["rhos_with_damping"], lambda r: r < low),
            **{k: run[k] for k in ("alphas", "mus", "dampings", "rhos", "rhos_with_damping")},
        )
    return row


def summary(per_seed: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per run over seeds: steps, × SGD and finals per seed; mean × SGD over the seeds that reached the
    target, mean final loss over the seeds that did not diverge.
    """
    out: dict[str, Any] = {}
    for name in names:
        rows = [r["rows"][name] for r in per_seed.values()]
        steps = [r["steps_to_target"] for r in rows]
        ratios = [r["steps_x_sgd"] for r in rows]
        finals = [r["final"] for r in rows]
        reached = [x for x in ratios if x is not None]
        kept = [x for x in finals if x is not None]
        out[name] = {
            "seeds": list(per_seed),
            "steps": steps,
            "ratios": ratios,
            "finals": finals,
            "diverged": [r["diverged_at"] for r in rows],
            "never": sum(s is None for s in steps),
            "ratio_mean": statistics.fmean(reached) if reached else None,
            "final_mean": statistics.fmean(kept) if kept else None,
            "step_ms_mean": statistics.fmean(r["step_ms"] for r in rows if r["step_ms"] is not None),
        }
    return out


def rank_key(row: dict[str, Any]) -> tuple[int, float, float]:
    """Sort key over the summary: fewest seeds not reached, then mean × SGD, then mean final loss."""
    ratio, loss = row["ratio_mean"], row["final_mean"]
    return (row["never"], math.inf if ratio is None else ratio, math.inf if loss is None else loss)


# -- the probe ---------------------------------------------------------------------------------


def _log(name: str, row: dict[str, Any]) -> None:
    end = (
        "diverged at step " + str(row["diverged_at"]) if row["final"] is None else f"final {row['final']:.4f}"
    )
    extra = ""
    if row.get("alpha_median") is not None:
        extra = (
            f"  alpha {row['alpha_median']:.3g} mu {row['mu_median']:.3g} damping {row['damping_final']:.3g}"
        )
    print(
        f"  {name:56s} {end}  steps {row['steps_to_target']}  {_fmt(row['step_ms'], '.0f')} ms/step  "
        f"load {row['load1_start']:.2f}->{row['load1_end']:.2f}{extra}",
        flush=True,
    )


def probe_runs(probe: Probe) -> dict[str, Any]:
    """Every seed: SGD (its final loss is the target), the default, then the quadratic-model runs."""
    torch.set_num_threads(1)
    base = Settings(steps=probe.steps, samples=probe.samples)
    settings = {
        **asdict(probe),
        "batch": base.batch,
        "sgd_lr": base.sgd_lr,
        "kfac_lr": base.kfac_lr,
        "momentum": base.momentum,
        "model_runs": [asdict(r) for r in MODEL_RUNS],
    }
    results: dict[str, Any] = {"settings": settings, "machine": machine_info(1), "seeds": {}}
    started = time.time()
    images, labels = synthetic_images(n=probe.samples, channels=3, size=32, classes=10, seed=0)
    for seed in probe.seeds:
        print(f"seed {seed}:", flush=True)
        batches = make_batches(images, labels, base, seed)
        sgd = train(batches, seed, "sgd", base.sgd_lr, base.momentum)
        target = final(sgd["losses"])
        sgd_steps = steps_to(sgd["losses"], target)
        rows = {SGD: summarise(sgd, target, sgd_steps, probe)}
        _log(SGD, rows[SGD])
        rows[DEFAULT] = summarise(
            train(batches, seed, "sgd", base.kfac_lr, base.momentum, {}), target, sgd_steps, probe
        )
        _log(DEFAULT, rows[DEFAULT])
        for run in MODEL_RUNS:
            rows[run.name] = summarise(train_model_based(batches, seed, run, probe), target, sgd_steps, probe)
            _log(run.name, rows[run.name])
        results["seeds"][str(seed)] = {"target": target, "sgd_steps": sgd_steps, "rows": rows}
    names = [SGD, DEFAULT, *(r.name for r in MODEL_RUNS)]
    results["summary"] = summary(results["seeds"], names)
    results["reading"] = reading(results)
    results["machine"]["load1_at_end"] = load1()
    results["seconds"] = time.time() - started
    return results


# -- outputs -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _span(values: Sequence[float], spec: str = ".3g") -> str:
    """``min–max`` of ``values`` (one value when they are equal)."""
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}–{high}"


def reading(results: dict[str, Any]) -> str:
    """What the numbers say, in a few sentences built from them."""
    summ = results["summary"]
    n = len(results["seeds"])
    default = summ[DEFAULT]
    runs = {r.name: r for r in MODEL_RUNS}
    rows = [r["rows"] for r in results["seeds"].values()]

    def said(name: str) -> str:
        r = summ[name]
        reach = f"reached the target at {n - r['never']} of {n} seed(s)"
        ratio = f" (mean × SGD {_fmt(r['ratio_mean'])} over those)" if r["ratio_mean"] is not None else ""
        loss = f", mean final loss {_fmt(r['final_mean'], '.4f')}" if r["final_mean"] is not None else ""
        diverged = [
            f"seed {s} at step {d}" for s, d in zip(r["seeds"], r["diverged"], strict=True) if d is not None
        ]
        return f"{reach}{ratio}{loss}" + (f", diverged at {', '.join(diverged)}" if diverged else "")

    def gathered(key: str, names: Sequence[str]) -> list[float]:
        return [row[m][key] for row in rows for m in names if row[m].get(key) is not None]

    bound = [row[DEFAULT]["kl_bound"] for row in rows if row[DEFAULT].get("kl_bound") is not None]
    parts = [
        f"Measured over seed(s) {', '.join(results['seeds'])}: the default (KL clip 1e-3, lr 0.05, momentum "
        f"0.9) {said(DEFAULT)}"
        + (f"; its KL clip bound on {_span([100 * b for b in bound], '.0f')}% of steps." if bound else ".")
    ]
    best = min(runs, key=lambda m: rank_key(summ[m]))
    beats = [
        m
        for m in runs
        if summ[m]["never"] == 0
        and default["never"] == 0
        and summ[m]["ratio_mean"] is not None
        and default["ratio_mean"] is not None
        and summ[m]["ratio_mean"] < default["ratio_mean"]
    ]
    if beats:
        parts.append(
            f"{len(beats)} of {len(runs)} quadratic-model runs reached the target at every seed in fewer "
            f"steps on average than the default: {', '.join(beats)}."
        )
    else:
        parts.append(
            f"No quadratic-model run (of {len(runs)}) reached the target at every seed in fewer steps on "
            "average than the default."
        )
    parts.append(f"The best of them, {best}, {said(best)}.")
    parts += [f"{m}: {said(m)}." for m in runs if m != best]
    alphas, mus = gathered("alpha_median", list(runs)), gathered("mu_median", list(runs))
    if alphas and mus:
        parts.append(
            f"Per run and seed, the model's median alpha was {_span(alphas)} and its median mu {_span(mus)}."
        )
    lm = [m for m, r in runs.items() if r.lm and r.every == 1]
    rhos = [rho for row in rows for m in lm for rho in row[m].get("rhos", [])]
    if rhos:
        high, low = gathered("rho_high", lm), gathered("rho_low", lm)
        high_damped = gathered("rho_high_with_damping", lm)
        ends = "; ".join(
            f"{m}: {' / '.join(_fmt(row[m].get('damping_final'), '.3g') for row in rows)}" for m in lm
        )
        pct = {
            k: _span([100 * x for x in v], ".0f")
            for k, v in (("high", high), ("low", low), ("damped", high_damped))
        }
        drift = (
            "shrank the damping at most checks"
            if statistics.median(high) > 0.5
            else "grew the damping at most checks"
            if statistics.median(low) > 0.5
            else "left the damping mostly unchanged"
        )
        parts.append(
            f"In the LM runs with alpha, mu every step, the median reduction ratio rho was "
            f"{statistics.median(rhos):.2f} ({len(rhos)} checks): rho > 3/4 at {pct['high']}% of a run's "
            f"checks (with the damping term in the model's change, the prototype's rule: {pct['damped']}%), "
            f"rho < 1/4 at {pct['low']}%, so LM {drift}; final damping per seed, {ends} (floor "
            f"{results['settings']['damping_min']:g})."
        )
    every = [m for m, r in runs.items() if r.every == 1]
    cost = [summ[m]["step_ms_mean"] / default["step_ms_mean"] for m in every if default["step_ms_mean"]]
    if cost:
        parts.append(
            f"A step with alpha, mu every step took {_span(cost, '.1f')}x the default's mean ms/step (two "
            "JVPs, and one forward per LM check; information only, shared machine)."
        )
    return " ".join(parts)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (a diverging run's alpha) replaced by None, for JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def markdown(results: dict[str, Any]) -> str:
    """Per-seed tables, the summary over seeds and the reading."""
    s = results["settings"]
    lines = [
        "# Model-based step size and momentum against the default step (`benchmarks/step_size_probe.py`)",
        "",
        machine_line(results),
        "",
        f"`small_cnn(3, width=32, side=32)`, one process, batch {s['batch']}, {s['steps']} steps, seeds "
        f"{', '.join(map(str, s['seeds']))} (weight init and batch order). SGD lr {s['sgd_lr']} momentum "
        f"{s['momentum']}; the default = iEF-K-FAC at `KFACConfig` defaults under SGD lr {s['kfac_lr']} "
        f"momentum {s['momentum']}; quad model = iEF-K-FAC direction (`kl_clip=None`), alpha and mu "
        "minimising the exact-GGN quadratic model with the damping term (Martens & Grosse 2015 sec. 7); "
        f"LM = Levenberg-Marquardt damping adaptation (rho > {s['lm_high']} shrinks by "
        f"{s['lm_decay']}^k, rho < {s['lm_low']} grows, k = steps between checks, clamped to "
        f"[{s['damping_min']:g}, {s['damping_max']:g}]; rho's predicted change without the damping term, "
        "as kfac-jax's default). Target = that seed's SGD final loss (mean of the last 10 step losses); "
        "steps to target = first step whose trailing 10-step mean is at or below it; × SGD = that over "
        "SGD's own steps to it. Loss at step k = mean of steps k-9..k. ms/step and wall time are for "
        "information only (shared machine).",
    ]
    for seed, per in results["seeds"].items():
        lines += [
            "",
            f"## Seed {seed} (target {per['target']:.4f}, reached by SGD at step "
            f"{_fmt(per['sgd_steps'], 'd')})",
            "",
            "| run | final loss | steps to target | × SGD | loss@25 | loss@50 | loss@100 | ms/step | wall s "
            "| α median | μ median | final damping | LM checks ρ>¾ / ρ<¼ | decompositions | load start→end |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in per["rows"].items():
            at = r["loss_at"]
            end = f"diverged at step {r['diverged_at']}" if r["final"] is None else f"{r['final']:.4f}"
            lm = "–" if not r.get("lm_checks") else f"{_pct(r['rho_high'])} / {_pct(r['rho_low'])}"
            lines.append(
                f"| {name} | {end} | {_fmt(r['steps_to_target'], 'd')} | {_fmt(r['steps_x_sgd'])} | "
                + " | ".join(_fmt(at.get(str(k)), ".3f") for k in CHECKPOINTS)
                + f" | {_fmt(r['step_ms'], '.0f')} | {r['wall_s']:.1f} | "
                f"{_fmt(r.get('alpha_median'), '.3g')} | {_fmt(r.get('mu_median'), '.3g')} | "
                f"{_fmt(r.get('damping_final'), '.3g')} | {lm} | "
                f"{_fmt(r['decompositions'], 'd')} | {r['load1_start']:.2f}→{r['load1_end']:.2f} |"
            )
    seeds = " / ".join(results["seeds"])
    lines += [
        "",
        f"## Summary over seeds {', '.join(results['seeds'])}",
        "",
        "Mean × SGD is over the seeds that reached the target; a run that never reached it (or diverged) "
        'at a seed is counted in "not reached", not averaged in. Mean final loss is over the seeds that '
        "did not diverge.",
        "",
        f"| run | steps to target (seed {seeds}) | × SGD per seed | mean × SGD | not reached "
        "| final loss per seed | mean final loss | ms/step |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for name, r in results["summary"].items():
        finals = " / ".join(
            f"diverged@{d}" if f is None else f"{f:.4f}"
            for f, d in zip(r["finals"], r["diverged"], strict=True)
        )
        lines.append(
            f"| {name} | {' / '.join(_fmt(x, 'd') for x in r['steps'])} | "
            f"{' / '.join(_fmt(x) for x in r['ratios'])} | {_fmt(r['ratio_mean'])} | "
            f"{r['never']} of {len(r['steps'])} | {finals} | {_fmt(r['final_mean'], '.4f')} | "
            f"{r['step_ms_mean']:.0f} |"
        )
    lines += ["", "## Reading", "", results["reading"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe and write its JSON and tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    prefix = [f"nice -n {niceness}"] if niceness > 0 else []
    command = " ".join(
        [*prefix, ".venv/bin/python", "benchmarks/step_size_probe.py", *(argv or sys.argv[1:])]
    )
    probe = QUICK if args.quick else Probe()
    if args.seeds:
        probe = Probe(**{**asdict(probe), "seeds": tuple(args.seeds)})
    out = args.out or (ROOT / "benchmarks" / ("out/step_size_probe" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    results = probe_runs(probe)
    results["command"] = command
    (out / "step_size_probe.json").write_text(json.dumps(finite_or_none(results), indent=1))
    (out / "step_size_probe.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

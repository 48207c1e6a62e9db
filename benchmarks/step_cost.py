"""What K-FAC adds to a training step: factor statistics on a capture step, preconditioning per step.

The models of issue #11's step-time figures, in one process on one thread
(``torch.set_num_threads(1)``):

- ``cnn``: ``small_cnn(channels=3, width=32, side=32)`` (:mod:`ngd_dist.service.models`), batch 64
  of 3x32x32 inputs (the per-rank batch of the issue);
- ``mlp``: ``mlp(64, 128, 10, depth=3)`` (the core benchmark's MLP, one hidden layer more, so two
  layers share a shape), batch 1024.

Variants, each with its own copy of the same initial weights, trained on the same random batches:

- ``sgd``: SGD with momentum 0.9, lr 0.05;
- ``kfac-before``: iEF-K-FAC (``KFACConfig`` defaults but ``factor_every=10``,
  ``inverse_every=100``) with the statistics and preconditioning as they were before issue #11:
  A from ``F.unfold`` patches transposed to rows with a column of ones concatenated, G rows
  copied, scaled and weighted in three passes, and gradient matrices concatenated with their bias
  column every step (the ``legacy_*`` functions below, this script's baseline only);
- ``kfac``: the same configuration with the library as it is;
- ``kfac-rows``: the same with ``statistics_rows=--rows``.

Four measurements, each interleaving its variants:

1. **A statistic per layer**: ``a_statistic`` of each Kronecker-factored layer on the input it saw,
   before (legacy), after, and after from ``--rows`` drawn rows, in alternation;
2. **preconditioning per step**: the preconditioner's ``_precondition`` on fixed gradients and
   decompositions, before and after, in alternation (the gradients are restored between calls,
   untimed);
3. **same-shape layers**: the eigen-form products of the layers that share a shape, a loop of
   matmuls per layer against one ``bmm`` chain over them (whether batching them would pay);
4. **whole steps**: blocks of ``--block`` steps (one factor period) per variant, the variants' order
   rotated every round so that a change of load hits them alike; per variant the mean and
   median step, the statistics computed in the hooks per capture step (the ``factor_computation``
   phase) and the preconditioning per step (the ``preconditioning`` phase), and the ratio of the
   mean step to SGD's.

``--effect`` adds what row subsampling does to learning: the CNN on ``synthetic_images`` for
``--effect-steps`` steps, SGD, K-FAC and K-FAC with ``statistics_rows``, same weights and batches
(final loss = mean of the last 10 batch losses; steps to SGD's final loss), and the relative error
of the subsampled factors of one capture step against the full ones.

Usage::

    .venv/bin/python benchmarks/step_cost.py            # ~3 min on 2 shared cores
    .venv/bin/python benchmarks/step_cost.py --quick    # smoke run, < 1 min
    .venv/bin/python benchmarks/step_cost.py --effect   # also the learning effect of --rows

Prints the tables and writes ``benchmarks/out/step_cost.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac.curvature.modules import (
    Conv2dMath,
    LinearMath,
    RowSample,
    accumulation_dtype,
    second_moment,
)
from ngd_dist.kfac.linalg import precondition
from ngd_dist.service.models import mlp, small_cnn

ROOT = Path(__file__).resolve().parent.parent


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


# -- the models ----------------------------------------------------------------------------------


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """A seeded model, its input shape (without the batch) and its batch size."""
    torch.manual_seed(0)
    if name == "cnn":
        return small_cnn(channels=3, classes=10, width=32, side=32), (3, 32, 32), 64
    return mlp(64, 128, 10, depth=3), (64,), 1024


def kfac_config(rows: int | None = None, **overrides: Any) -> KFACConfig:
    """KFACConfig defaults, factors every 10 steps, decompositions every 100 (and the row cap)."""
    extra: dict[str, Any] = {"statistics_rows": rows} if rows is not None else {}
    # method eigen: the form docs/benchmarks.md quotes (the library default became inverse)
    return KFACConfig(**{"method": "eigen", "factor_every": 10, "inverse_every": 100, **extra, **overrides})


# -- the baseline: statistics and preconditioning as they were before issue #11 ----------------


def legacy_a_statistic(
    self: LinearMath | Conv2dMath, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
) -> tuple[Tensor, int]:
    """Rows ``(N*L, d)`` (F.unfold patches transposed, for a conv) with a ones column concatenated."""
    if isinstance(module, nn.Conv2d):
        x = x.to(dtype)
        x = x.unsqueeze(0) if x.dim() == 3 else x
        padding = module.padding
        if isinstance(padding, str):
            x, padding = F.pad(x, module._reversed_padding_repeated_twice), (0, 0)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return second_moment(rows, dtype, diagonal), rows.shape[0]


def legacy_weighted_rows(
    rows: Tensor, weights: Tensor | None, scale: float, dtype: torch.dtype, sample: object = None
) -> Tensor:
    """G rows flattened (a copy), scaled (a copy), weighted (a copy)."""
    d, lead = rows.shape[-1], rows.shape[:-1]
    flat = rows.reshape(-1, d).to(accumulation_dtype(dtype)) * scale
    if weights is None:
        return flat
    w = weights.reshape(*weights.shape, *([1] * (len(lead) - weights.dim()))).expand(lead)
    return flat * w.reshape(-1, 1).to(flat.dtype).sqrt()


def _legacy_matrix(module: nn.Module) -> Tensor | None:
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight.grad is None:
        return None
    m = weight.grad.reshape(weight.shape[0], -1)
    if bias is not None:
        m = torch.cat([m, (bias.grad if bias.grad is not None else torch.zeros_like(bias)).unsqueeze(1)], 1)
    return m


def _legacy_write(module: nn.Module, matrix: Tensor) -> None:
    weight, bias = module.weight, getattr(module, "bias", None)
    n = matrix.shape[1] - (bias is not None)
    weight.grad.copy_(matrix[:, :n].reshape(weight.shape))
    if bias is not None:
        bias.grad.copy_(matrix[:, -1])


def legacy_precondition(self: KFACPreconditioner, step: int) -> None:
    """The single-rank ``_precondition`` of before: concatenated ``[dW | db]`` in, split back out."""
    damping = self.config.damping_at(step)
    grads = {la.name: _legacy_matrix(la.module) for la in self.layers}
    present = [la for la in self.layers if grads[la.name] is not None]
    updates: dict[str, Tensor] = {}
    for layer in present:
        grad = grads[layer.name]
        assert grad is not None
        a, g = layer.factors["a"].decomposition, layer.factors["g"].decomposition
        if a is None or g is None:
            updates[layer.name] = grad
            continue
        d = self._layer_damping(layer, damping)
        updates[layer.name] = precondition(a, g, grad, d, reciprocal=self._reciprocal(layer.name, a, g, d))
    squares, terms = [], []
    rates = self._learning_rates(present) if self.config.kl_clip is not None else [0.0] * len(present)
    lrs = {id(layer.module.weight): lr for layer, lr in zip(present, rates, strict=True)}
    for layer in present:
        grad = grads[layer.name]
        assert grad is not None
        squares.append(grad.float().square().sum())
    self._grad_norm_sq = torch.stack(squares).sum()
    for layer in present:
        grad = grads[layer.name]
        assert grad is not None
        lr = lrs.get(id(layer.module.weight), 0.0)
        terms.append((updates[layer.name] * grad).sum().float() * lr**2)
    scale = 1.0
    if self.config.kl_clip is not None:
        vg = float(torch.stack(terms).sum())
        if vg > 0 and math.isfinite(vg):
            scale = min(1.0, math.sqrt(self.config.kl_clip / vg))
    for layer in present:
        _legacy_write(layer.module, updates[layer.name] * scale if scale != 1.0 else updates[layer.name])


@contextmanager
def legacy() -> Iterator[None]:
    """Within it, the library computes statistics and preconditions as before issue #11."""
    with ExitStack() as stack:
        for cls in (LinearMath, Conv2dMath):
            stack.enter_context(mock.patch.object(cls, "a_statistic", legacy_a_statistic))
        stack.enter_context(mock.patch("ngd_dist.kfac.capture.weighted_rows", legacy_weighted_rows))
        stack.enter_context(mock.patch.object(KFACPreconditioner, "_precondition", legacy_precondition))
        yield


# -- measurement helpers -------------------------------------------------------------------------


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, list[float]]:
    """Milliseconds per call of each variant: ``rounds`` rounds, each variant ``inner`` calls a round."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for key in order:
            start = time.perf_counter()
            for _ in range(inner):
                variants[key]()
            times[key].append((time.perf_counter() - start) / inner * 1e3)
    return times


def summary(values: list[float]) -> dict[str, float]:
    """Median and minimum (ms)."""
    return {"median": statistics.median(values), "min": min(values)}


def kfac_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Kronecker-factored layers of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def layer_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Each Kronecker-factored layer's input for ``x``."""
    seen: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, args[0].detach()))
        for n, m in kfac_layers(model).items()
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


# -- 1. A statistics per layer -------------------------------------------------------------------


def bench_a_statistics(name: str, rounds: int, inner: int, rows: int | None) -> dict[str, Any]:
    """``a_statistic`` of every layer, legacy and current (and from drawn rows), interleaved."""
    model, shape, batch = build(name)
    inputs = layer_inputs(model, torch.randn(batch, *shape))
    out: dict[str, Any] = {}
    for lname, module in kfac_layers(model).items():
        math_ = Conv2dMath() if isinstance(module, nn.Conv2d) else LinearMath()
        x, f32 = inputs[lname], torch.float32
        diag = (module.weight[0].numel() + 1) > KFACConfig().max_factor_dim
        variants: dict[str, Callable[[], tuple[Tensor, int]]] = {
            "before": partial(legacy_a_statistic, math_, module, x, f32, diagonal=diag),
            "after": partial(math_.a_statistic, module, x, f32, diagonal=diag),
        }
        if rows is not None:
            sample = RowSample(rows, torch.Generator().manual_seed(0))
            variants["sampled"] = partial(math_.sampled_a_statistic, module, x, f32, sample, diagonal=diag)
        before, _ = variants["before"]()
        after, count = variants["after"]()
        entry: dict[str, Any] = {"n_rows": count, "a_dim": before.shape[0], "diagonal": diag}
        entry["rel_diff_after_vs_before"] = float((after - before).norm() / before.norm())
        if rows is not None:
            entry["rel_err_sampled_vs_all"] = float((variants["sampled"]()[0] - after).norm() / after.norm())
        times = interleaved(dict(variants), rounds, inner)
        out[lname] = {**entry, **{k: summary(v) for k, v in times.items()}}
    return out


# -- 2. preconditioning per step -----------------------------------------------------------------


def ready_preconditioner(name: str) -> tuple[KFACPreconditioner, list[Tensor], list[nn.Parameter]]:
    """A preconditioner after one full step (factors and decompositions), and the raw gradients."""
    model, shape, batch = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, kfac_config(output_module=str(len(model) - 1)), optimizer=opt)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    F.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    raw = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    precond.step()
    return precond, raw, params


def bench_preconditioning(name: str, rounds: int, inner: int) -> dict[str, Any]:
    """``_precondition`` before and after, interleaved, on the same gradients and decompositions."""
    precond, raw, params = ready_preconditioner(name)

    def restore() -> None:
        for p, g in zip(params, raw, strict=True):
            p.grad.copy_(g)  # type: ignore[union-attr]

    results = {}
    for label in ("before", "after"):
        restore()
        if label == "before":
            with legacy():
                precond._precondition(1)
        else:
            precond._precondition(1)
        results[label] = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    diff = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30))
        for a, b in zip(results["after"], results["before"], strict=True)
    )
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        for label in ("before", "after") if r % 2 == 0 else ("after", "before"):
            total = 0.0
            for _ in range(inner):
                restore()
                with legacy() if label == "before" else contextlib_null():
                    start = time.perf_counter()
                    precond._precondition(1)
                    total += time.perf_counter() - start
            times[label].append(total / inner * 1e3)
    return {"rel_diff_after_vs_before": diff, **{k: summary(v) for k, v in times.items()}}


@contextmanager
def contextlib_null() -> Iterator[None]:
    """A context that does nothing."""
    yield


# -- 3. same-shape layers in one batched product ---------------------------------------------


def bench_batched(name: str, rounds: int, inner: int) -> dict[str, Any] | None:
    """The eigen-form products of the layers sharing the most common (g_dim, a_dim): one loop of
    matmuls per layer against one ``bmm`` chain over the stacked layers (stacking the gradients
    included; the stacked eigenbases and reciprocals as if kept from the decomposition).
    """
    precond, _, _ = ready_preconditioner(name)
    groups: dict[tuple[int, int], list[Any]] = {}
    for la in precond.layers:
        a, g = la.factors["a"].decomposition, la.factors["g"].decomposition
        if getattr(a, "q", None) is not None and getattr(g, "q", None) is not None:
            groups.setdefault((la.g_dim, la.a_dim), []).append(la)
    shape, same = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(same) < 2:
        return None
    qg = [la.factors["g"].decomposition.q for la in same]
    qa = [la.factors["a"].decomposition.q for la in same]
    r = [torch.rand(shape) + 0.5 for _ in same]
    grads = [torch.randn(shape) for _ in same]
    qgs, qas, rs = torch.stack(qg), torch.stack(qa), torch.stack(r)

    def loop() -> list[Tensor]:
        return [q @ ((q.t() @ m @ p) * w) @ p.t() for q, p, w, m in zip(qg, qa, r, grads, strict=True)]

    def batched() -> list[Tensor]:
        x = torch.bmm(qgs.transpose(1, 2), torch.bmm(torch.stack(grads), qas)) * rs
        return list(torch.bmm(torch.bmm(qgs, x), qas.transpose(1, 2)).unbind(0))

    times = interleaved({"loop": loop, "batched": batched}, rounds, inner * 4)
    return {"layers": len(same), "shape": list(shape), **{k: summary(v) for k, v in times.items()}}


# -- 4. whole steps -----------------------------------------------------------------------------


class Runner:
    """One variant's model, optimizer and (for K-FAC) preconditioner, stepping on shared batches."""

    def __init__(self, variant: str, name: str, rows: int | None, batches: list[tuple[Tensor, Tensor]]):
        """Same initial weights for every variant of ``name``."""
        self.variant, self.batches = variant, batches
        self.model, _, _ = build(name)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.precond: KFACPreconditioner | None = None
        if variant != "sgd":
            head = str(len(self.model) - 1)
            cfg = kfac_config(rows if variant == "kfac-rows" else None, output_module=head)
            self.precond = KFACPreconditioner(self.model, cfg, optimizer=self.opt)
        self.t = 0
        self.steps: list[float] = []
        self.capture: list[float] = []
        self.preconditioning: list[float] = []
        self.phases: dict[str, float] = {}

    def run(self, steps: int, record: bool) -> None:
        """Take ``steps`` steps; record their times when ``record``."""
        with legacy() if self.variant == "kfac-before" else contextlib_null():
            for _ in range(steps):
                x, y = self.batches[self.t % len(self.batches)]
                capturing = self.precond is not None and self.precond.factor_step
                start = time.perf_counter()
                self.opt.zero_grad()
                F.cross_entropy(self.model(x), y).backward()
                if self.precond is not None:
                    self.precond.step()
                self.opt.step()
                elapsed = time.perf_counter() - start
                self.t += 1
                phases = self.precond.clock.take() if self.precond is not None else {}
                if record:
                    self.steps.append(elapsed * 1e3)
                    if capturing:
                        self.capture.append(phases.get("factor_computation", 0.0) * 1e3)
                    self.preconditioning.append(phases.get("preconditioning", 0.0) * 1e3)
                    for phase, seconds in phases.items():
                        self.phases[phase] = self.phases.get(phase, 0.0) + seconds * 1e3


def bench_steps(name: str, rows: int | None, block: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Blocks of steps per variant, their order rotated every round; per-variant step and phase times."""
    _, shape, batch = build(name)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        x = torch.randn(batch, *shape, generator=gen)
        batches.append((x, torch.randint(0, 10, (batch,), generator=gen)))
    variants = ["sgd", "kfac-before", "kfac"] + (["kfac-rows"] if rows is not None else [])
    runners = {v: Runner(v, name, rows, batches) for v in variants}
    for r in runners.values():
        r.run(warmup, record=False)
    loads = [load1()]
    for i in range(rounds):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            runners[v].run(block, record=True)
        loads.append(load1())
    sgd_mean = statistics.mean(runners["sgd"].steps)
    sgd_median = statistics.median(runners["sgd"].steps)
    out: dict[str, Any] = {"load1": loads}
    for v, r in runners.items():
        mean, median = statistics.mean(r.steps), statistics.median(r.steps)
        out[v] = {
            "steps": len(r.steps),
            "mean_step": mean,
            "median_step": median,
            "mean_vs_sgd": mean / sgd_mean,
            "median_vs_sgd": median / sgd_median,
            "statistics_per_capture_step": statistics.mean(r.capture) if r.capture else None,
            "preconditioning_per_step": statistics.mean(r.preconditioning) if r.preconditioning else None,
            "phases_per_step": {k: v / len(r.steps) for k, v in r.phases.items()},
        }
    return out


# -- the learning effect of row subsampling ------------------------------------------------------


def bench_effect(rows: int, steps: int) -> dict[str, Any]:
    """CNN on synthetic images: SGD, K-FAC, K-FAC with ``statistics_rows=rows``; and factor errors."""
    from ngd_dist.service.data.datasets import synthetic_images

    images, labels = synthetic_images(n=4096, seed=0)
    order = torch.randint(0, len(labels), (steps, 64), generator=torch.Generator().manual_seed(2))
    runs: dict[str, Any] = {}
    for variant in ("sgd", "kfac", "kfac-rows"):
        model, _, _ = build("cnn")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        precond = None
        if variant != "sgd":
            precond = KFACPreconditioner(
                model, kfac_config(rows if variant == "kfac-rows" else None, output_module="5"), optimizer=opt
            )
        losses = []
        start = time.perf_counter()
        for t in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(images[order[t]]), labels[order[t]])
            loss.backward()
            losses.append(loss.item())
            if precond is not None:
                precond.step()
            opt.step()
        final = statistics.mean(losses[-10:])
        runs[variant] = {"final_loss": final, "seconds": time.perf_counter() - start, "losses": losses}
    target = runs["sgd"]["final_loss"]
    for run in runs.values():
        trailing = [statistics.mean(run["losses"][t - 10 : t]) for t in range(10, steps + 1)]
        run["steps_to_sgd_final"] = next((t + 10 for t, v in enumerate(trailing) if v <= target), None)
    # the subsampled factors of one capture step against the full ones (factor_decay 0: that step only)
    factors = {}
    for r in (None, rows):
        model, _, _ = build("cnn")
        precond = KFACPreconditioner(model, kfac_config(r, output_module="5", factor_decay=0.0, kl_clip=None))
        F.cross_entropy(model(images[:64]), labels[:64]).backward()
        precond.step()
        factors[r] = {(la.name, f): la.factors[f].running for la in precond.layers for f in "ag"}
    errors = {
        f"{k[0]}/{k[1]}": float((factors[rows][k] - v).norm() / v.norm()) for k, v in factors[None].items()
    }
    return {"rows": rows, "steps": steps, "runs": runs, "factor_rel_error": errors}


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    """Run the measurements, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--rows", type=int, default=4096, help="statistics_rows of the kfac-rows variant")
    parser.add_argument("--block", type=int, default=10, help="steps per block of the whole-step phase")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of blocks of the whole-step phase")
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated; empty: the effect only")
    parser.add_argument("--effect", action="store_true", help="also the learning effect of --rows")
    parser.add_argument("--effect-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    block, rounds, warmup, micro = (10, 4, 5, (3, 3)) if args.quick else (args.block, args.rounds, 20, (7, 5))
    result: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "block": block, "rounds": rounds},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                    "cpus": os.cpu_count(), "load1_start": load1()},
        "models": {},
    }
    for name in [m for m in args.models.split(",") if m]:
        entry = {
            "a_statistic": bench_a_statistics(name, *micro, args.rows),
            "preconditioning": bench_preconditioning(name, *micro),
            "batched": bench_batched(name, *micro),
            "steps": bench_steps(name, args.rows, block, rounds, warmup),
        }
        result["models"][name] = entry
        print_model(name, entry)
    if args.effect:
        result["effect"] = bench_effect(args.rows, 20 if args.quick else args.effect_steps)
        print_effect(result["effect"])
    machine = result["machine"]
    machine["load1_end"] = load1()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "step_cost.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nload {machine['load1_start']:.2f} -> {machine['load1_end']:.2f}; wrote {path}")


def print_model(name: str, entry: dict[str, Any]) -> None:
    """The three tables of one model."""
    print(f"\n== {name}: A statistic per layer (ms, median of rounds; before = unfold + transpose + cat)")
    columns = ("before", "after", "rel diff", "sampled", "its err")
    print(f"{'layer':<8}{'rows x a_dim':>16}" + "".join(f"{h:>10}" for h in columns))
    for lname, v in entry["a_statistic"].items():
        shape = f"{v['n_rows']} x {v['a_dim']}" + (" d" if v["diagonal"] else "")
        sampled = ""
        if "sampled" in v:
            sampled = f"{v['sampled']['median']:>10.2f}{v['rel_err_sampled_vs_all']:>10.3f}"
        print(f"{lname:<8}{shape:>16}{v['before']['median']:>10.2f}{v['after']['median']:>10.2f}"
              f"{v['rel_diff_after_vs_before']:>10.1e}{sampled}")
    p = entry["preconditioning"]
    print(f"-- preconditioning per step (ms): before {p['before']['median']:.2f}, after "
          f"{p['after']['median']:.2f} (rel diff {p['rel_diff_after_vs_before']:.1e})")
    b = entry["batched"]
    if b is not None:
        print(f"-- {b['layers']} layers of shape {tuple(b['shape'])}, eigen-form products (ms): loop "
              f"{b['loop']['median']:.3f}, one bmm chain {b['batched']['median']:.3f}")
    s = entry["steps"]
    print(f"-- whole steps (ms; load {s['load1'][0]:.2f} -> {s['load1'][-1]:.2f})")
    columns = ("mean", "median", "x SGD", "med x", "stats/capture", "precond")
    print(f"{'variant':<13}" + "".join(f"{h:>14}" for h in columns))
    for v, r in s.items():
        if v == "load1":
            continue
        stats = "-" if r["statistics_per_capture_step"] is None else f"{r['statistics_per_capture_step']:.2f}"
        pre = "-" if r["preconditioning_per_step"] is None else f"{r['preconditioning_per_step']:.2f}"
        print(f"{v:<13}{r['mean_step']:>14.2f}{r['median_step']:>14.2f}{r['mean_vs_sgd']:>14.3f}"
              f"{r['median_vs_sgd']:>14.3f}{stats:>14}{pre:>14}")
        if r["phases_per_step"]:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_per_step"].items())
            print(f"{'':<13}per step: {phases}")


def print_effect(effect: dict[str, Any]) -> None:
    """The learning-effect table."""
    print(f"\n== statistics_rows={effect['rows']}: CNN, {effect['steps']} steps on synthetic images")
    for v, r in effect["runs"].items():
        print(f"{v:<10} final loss {r['final_loss']:.3f}  steps to SGD's final {r['steps_to_sgd_final']}  "
              f"{r['seconds']:.1f} s")
    print("factor relative error of one capture step:",
          ", ".join(f"{k} {v:.3f}" for k, v in effect["factor_rel_error"].items()))


if __name__ == "__main__":
    main()

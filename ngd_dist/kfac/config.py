"""Configuration of the K-FAC preconditioner, validated when it is built.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` whose message names
the field, the value given and what is allowed, so a typo in a job file never surfaces as a
traceback from deep inside the maths. Values are resolved there too: after construction every
dtype field is a ``torch.dtype`` (names such as ``"bf16"`` are accepted), every list a tuple, and
every string option a :class:`Choice` member (``"ief"`` becomes ``Curvature.IEF``, which still
equals ``"ief"``), so consumers ask the enum (``config.curvature.needs_logits``) instead of
comparing strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import torch

from ngd_dist.kfac.curvature.types import layer_type_names

_C = TypeVar("_C", bound="Choice")


def _fail(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"KFACConfig.{name}: got {value!r}; expected {allowed}")


class Choice(str, Enum):
    """A string option of KFACConfig: equal to its value, printed and written in YAML as it."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """The values the option accepts, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[_C], name: str, value: object) -> _C:
        """The member whose value is ``value``; ValueError naming the field ``name`` otherwise."""
        if isinstance(value, str):
            for member in cls:
                if member.value == value:
                    return member
        raise _fail(name, value, f"one of {', '.join(cls.choices())}")


class Curvature(Choice):
    """Which curvature the G factors estimate; what each needs from the model is asked of it here."""

    EF = "ef"
    MC = "mc"
    IEF = "ief"

    @property
    def needs_logits(self) -> bool:
        """Whether the model's logits must be marked on every forward pass (``mc`` and ``ief``)."""
        return self is not Curvature.EF

    @property
    def samples_labels(self) -> bool:
        """Whether G comes from an extra backward under labels drawn from the logits (``mc``)."""
        return self is Curvature.MC

    @property
    def weights_samples(self) -> bool:
        """Whether each sample's G rows are weighted by 1 / ||dl_n/dz_n||^2 (``ief``)."""
        return self is Curvature.IEF


class Method(Choice):
    """How factors are decomposed and applied (see :mod:`ngd_dist.kfac.linalg`)."""

    EIGEN = "eigen"
    INVERSE = "inverse"


class LossReduction(Choice):
    """How the training loss combines the samples of a batch."""

    MEAN = "mean"
    SUM = "sum"


class DampingScale(Choice):
    """What the damping number is relative to."""

    ABSOLUTE = "absolute"
    RELATIVE = "relative"


class Refresh(Choice):
    """When factors are decomposed again: on a fixed period, or on one adapted per factor."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class Placement(Choice):
    """Which ranks compute each layer's preconditioned gradient (KAISA's trade-off)."""

    MEMORY = "memory"
    COMMUNICATION = "communication"
    HYBRID = "hybrid"


class Assignment(Choice):
    """How factors are dealt to the ranks that decompose them."""

    ROUND_ROBIN = "round_robin"
    GREEDY = "greedy"


class Transport(Choice):
    """Which library carries the preconditioner's collectives."""

    TORCH = "torch"
    MPI = "mpi"



_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str, value: object, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """Turn ``value`` (a ``torch.dtype`` or a name such as ``"bf16"``) into one of ``allowed``."""
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    if isinstance(value, str):
        dtype = _DTYPES.get(value.lower())
    elif isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = None
    if dtype is None or dtype not in allowed:
        raise _fail(name, value, f"one of {names}")
    return dtype


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, value, f"an integer >= {minimum}")
    return value


def _check_float(name: str, value: object, low: float, high: float, *, open_low: bool) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        v = float(value)
        if (v > low if open_low else v >= low) and v <= high:
            return v
    bracket = "(" if open_low else "["
    raise _fail(name, value, f"a finite number in {bracket}{low}, {high}]")


@dataclass(kw_only=True)
class KFACConfig:
    """What the preconditioner estimates, how often, and how it damps and inverts it."""

    curvature: Curvature = Curvature.IEF
    """Curvature estimate for the G factors: ``"ef"`` empirical Fisher (gradients of the training
    loss), ``"mc"`` sampled Fisher (one label per sample drawn from softmax of the marked logits,
    one extra backward), ``"ief"`` improved empirical Fisher (each sample's contribution weighted by
    1/||dl_n/dz_n||^2, Wu et al. 2024, Eq. 43). ``"mc"`` and ``"ief"`` need the logits marked."""

    damping: float | Callable[[int], float] = 0.03
    """Tikhonov damping lambda, or a function of the step index returning it. In ngd_dist's
    per-sample units (``G`` is the mean of per-sample output-gradient outer products), which do not
    change with the batch size. kfac-pytorch / KAISA factor mean-loss gradients, ``B^2`` times
    smaller for a Linear layer and smaller still for a convolution, so the same number damps far
    less here: translate it with the table in docs/curvature.md. The default 0.03 (with the default
    ``method="inverse"``) was measured on a CIFAR-shaped CNN (``benchmarks/knob_sweep.py``, 200
    steps, lr 0.05, kl_clip 1e-3): at batch 128 over 3 seeds it reached SGD's final loss in 0.62x
    SGD's steps (eigen at the former default 0.1: 0.77x) and ended lower (0.391 against 0.424);
    ``--batch-sweep`` found it as good as 0.1 and 0.3 at batch 32 and better than both at 128 and
    512, where 0.01 was better still. The best damping falls as the batch grows (a small MLP at
    batch 512, the quickstart, learns best with eigen at 1e-3): with large batches try 0.01 and
    below."""

    damping_scale: DampingScale = DampingScale.ABSOLUTE
    """``"absolute"`` (the default): ``damping`` is added to every layer's ``G (x) A`` as it is (in
    ngd_dist's per-sample units, docs/curvature.md); ``"relative"``: to a layer it is ``damping``
    times the mean eigenvalue of that layer's ``G (x) A``, ``(tr A / dim A)(tr G / dim G)``, so one
    number means the same for every layer, model and curvature. Relative is not the default: at the
    best damping of each it learnt no better (``benchmarks/damping_bench.py``: 0.53 / 0.185 against
    absolute's 0.49 / 0.181 at batch 32 / 128), and the small numbers users bring from other
    libraries (1e-3 to 1e-2) leave it at or above chance (relative 1e-2: 2.66 / 1.31), since a
    layer's mean eigenvalue (0.002 to 0.015 on that CNN) makes relative 1 absolute 0.002 to 0.015."""

    factor_decay: float = 0.95
    """Running-average weight: ``X <- decay * X + (1 - decay) * X_new``; 0 keeps only the newest."""

    factor_debias: bool = True
    """Keep the running factors as the debiased average ``sum_k d^(t-k) X_k / sum_k d^(t-k)`` of the
    ``t`` folds so far (``d`` = factor_decay), as Adam debiases its moments: early on that is the
    plain mean of the statistics seen, not the first batch's statistics (taken at the initial
    weights) weighing ``d^(t-1)`` for the first ``1/(1-d)`` folds. False: the first fold, then
    ``d X + (1-d) X_new``."""

    factor_every: int = 10
    """Capture statistics and refresh the factors every this many steps. The default 10 / 100 (with
    ``refresh_warmup``) is what reached a target loss first in wall time in
    ``benchmarks/target_bench.py``: refreshing every step (``--every-step``) learnt little more per
    step at about 3x the step time on its CNN (2026-11-30, 2 CPU ranks)."""

    inverse_every: int = 100
    """Recompute eigendecompositions / inverses every this many steps (a multiple of factor_every)."""

    kl_clip: float | None = 1e-3
    """Scale all preconditioned gradients by min(1, sqrt(kl_clip / sum lr^2 <P, g>)); None disables
    it. Needs the optimizer passed to the preconditioner, to read each parameter's learning rate.
    Where it binds (``stats.kl_scale < 1``) the step ``lr P'`` has ``sum lr^2 <P', (G (x) A +
    damping) P'> = kl_clip`` whatever the learning rate, so the learning rate (and its schedule)
    stops mattering and momentum multiplies the clipped step. In ``benchmarks/damping_bench.py``
    (lr 0.05, momentum 0.9) it bound on 100% of steps at every absolute damping >= 0.003 and still
    learnt best: at each batch size's best damping, 1e-2 gave 1.25 / 0.77 and None 2.30 / 2.31
    (chance) against 1e-3's 0.49 / 0.18 (batch 32 / 128)."""

    method: Method = Method.INVERSE
    """``"inverse"`` (the default): damped inverses of each factor with the pi-split of Martens &
    Grosse, ``(A + pi sqrt(lambda))^-1`` and ``(G + sqrt(lambda)/pi)^-1``, the damping fixed when
    they are taken; 2 matmuls per layer and step. ``"eigen"``: the eigenbasis form, ``G (x) A +
    lambda`` damped as a whole and lambda applied at every step (a damping schedule acts between
    decompositions); 4 matmuls per layer and step. The same damping number damps the two forms
    differently. Inverse became the default after measuring both at their best dampings
    (``benchmarks/knob_sweep.py --batch-sweep``: at least as good as eigen at 0.1 at batch 32, 128
    and 512 on a CNN); eigen learnt better on the quickstart's MLP at 1e-3 (99.4% against 98.3%
    held out after 200 steps), which therefore sets it."""

    factor_dtype: torch.dtype = torch.float32
    """dtype the per-batch factor products are computed in (accumulated in float32 regardless)."""

    inverse_dtype: torch.dtype = torch.float32
    """dtype of decompositions (float32 retried in float64 on failure, or float64)."""

    max_failed_decompositions: int = 3
    """Consecutive failed decompositions of one factor (in ``inverse_dtype``, then in float64; the
    previous decomposition is kept each time) after which ``step()`` raises ``DecompositionError``
    naming the layer and factor, on every rank; >= 1."""

    layer_types: tuple[str, ...] | None = None
    """Module types to precondition, by name: ``"Linear"``, ``"Conv1D"`` (Hugging Face GPT-2),
    ``"Conv2d"``, ``"Embedding"`` (Kronecker-factored), ``"LayerNorm"``, ``"RMSNorm"``,
    ``"BatchNorm"``, ``"GroupNorm"`` (element-wise curvature of scale and shift), and any type
    registered with :func:`ngd_dist.kfac.register_layer_type`. None (the default): every known type,
    resolved when the config is built. Leave the normalisation types out to leave them to the base
    optimizer."""

    max_factor_dim: int = 4096
    """A factor with a side above this is kept diagonal (its diagonal only: memory and decomposition
    linear in the side instead of quadratic and cubic), so a 50k-token vocabulary head costs
    megabytes, not gigabytes. See docs/curvature.md for how the default was chosen."""

    include: tuple[str, ...] = ()
    """Regular expressions; when given, only modules whose qualified name matches one are used."""

    skip: tuple[str, ...] = ()
    """Regular expressions; modules whose qualified name matches one are left to the optimizer."""

    output_module: str | None = None
    """Qualified name of the module whose output are the logits (marked automatically on every
    forward); or call ``KFACPreconditioner.mark_output(logits)`` after each forward."""

    infer_ignored_rows: bool = True
    """Rows of the marked logits whose gradient is exactly zero are taken for rows the loss ignores
    (``ignore_index`` tokens, padding): they add nothing to G, to the iEF weights or to the row
    counts (``ef`` and ``ief``; an explicit ``mark_output(logits, mask=...)`` wins). Turn it off for
    a loss whose mean counts such rows."""

    ief_floor: float = 1e-12
    """Floor on s_n = ||dl_n/dz_n||^2 (per-sample units, see docs): iEF weights are 1/max(s_n,
    floor), so a sample with a vanishing logit gradient cannot blow a G factor up."""

    loss_reduction: LossReduction = LossReduction.MEAN
    """How the loss combines samples: ``"mean"`` (the usual) or ``"sum"``; used to express captured
    output gradients per sample, so that EF / iEF factors do not depend on the batch size."""

    seed: int = 0
    """Seed of the generator that draws the sampled-Fisher (``"mc"``) labels."""

    refresh: Refresh = Refresh.FIXED
    """``"fixed"``: decompose every factor every inverse_every steps. ``"adaptive"``: each factor
    has its own decomposition interval, starting at factor_every (inverse_every without
    refresh_warmup), doubled while the factor moves less than refresh_low since its last
    decomposition (up to refresh_cap), halved when it moved more than refresh_high (down to
    factor_every). Statistics are folded every factor_every steps in both."""

    refresh_warmup: bool = True
    """Decompose more often at the start, when the factors change fastest: the fixed schedule also
    decomposes at factor_every x 1, 2, 4, ... steps before the first inverse_every (10, 20, 40, 80
    for 10 / 100); adaptive intervals start at factor_every instead of inverse_every. False: the
    decomposition of step 0 serves until inverse_every."""

    refresh_low: float = 0.2
    """Adaptive refresh: relative change ||X_now - X_then||_F / ||X_then||_F of a factor since its
    decomposition below which its interval doubles. A single fold's batch noise already moves most
    factors by more than 0.05, so at 0.05 nearly every interval stayed at factor_every (the CNN of
    benchmarks/knob_sweep.py: 87 decompositions in 200 steps); at 0.2 it decomposed 48 times and
    reached SGD's loss at the same steps on 3 seeds (benchmarks/results/refresh_sweep/)."""

    refresh_high: float = 0.5
    """Adaptive refresh: relative change above which the interval halves."""

    refresh_cap: int = 128
    """Adaptive refresh: the longest interval, in steps."""

    assignment: Assignment = Assignment.ROUND_ROBIN
    """How factors are dealt to ranks: ``"round_robin"`` in registration order, or ``"greedy"``
    longest-processing-time first by decomposition cost (n^3)."""

    placement: Placement = Placement.COMMUNICATION
    """Where preconditioned gradients are computed (KAISA): ``"memory"`` by one rank per layer,
    which broadcasts them every step; ``"communication"`` (the default, as KAISA's) by every rank,
    the decompositions broadcast instead, only when they are recomputed, at the cost of holding
    every layer's decompositions on every rank; ``"hybrid"`` by grad_worker_fraction of the ranks.
    Measured on 2 CPU ranks (``benchmarks/target_bench.py``) the per-step broadcast of "memory" cost
    more than preconditioning every layer locally; choose "memory" or "hybrid" when the
    decompositions do not fit on one device."""

    grad_worker_fraction: float = 0.5
    """Hybrid placement: fraction of ranks computing each layer's preconditioned gradient (rounded
    down to a divisor of the world size)."""

    comm_dtype: torch.dtype = torch.float32
    """dtype of factor statistics on the wire (float32, or bfloat16 for half the bytes)."""

    transport: Transport = Transport.TORCH
    """Collectives over torch.distributed (gloo / NCCL) or over mpi4py (CPU buffers)."""

    statistics_rows: int | None = 1024
    """At most this many rows (samples x positions: a conv layer has batch x H_out x W_out) per
    layer and pass build its A and G statistics on a capture step, drawn uniformly without
    replacement (reproducibly: seeded by ``seed``, the step, the layer and the factor) and scaled
    by rows / drawn, so each factor stays an unbiased estimate; None uses every row.
    Applies to the A of Linear, Conv1D and Conv2d layers and the G of every Kronecker-factored layer
    (embeddings' token counts and normalisation layers are always exact); with gradient accumulation
    each pass draws its own rows. The Gram products cost in proportion to the rows. Measured on
    ``small_cnn(3, width=32, side=32)``, whose convolutions have 65,536 and 16,384 rows at batch 64:
    ``benchmarks/step_cost.py --rows 4096 --models cnn`` (one CPU thread, batch 64): a capture
    step's statistics 13.1 ms at 1024 rows against 22.7 ms at 4096; in
    ``benchmarks/target_bench.py`` (2 ranks) the statistics phase fell from 2.23 to 1.45 ms per step
    (two runs, 2026-11-30 and -12-01); ``benchmarks/knob_sweep.py --variants "statistics_rows
    4096"`` (batch 128, 200 steps, 3 seeds): SGD's final loss reached at steps 99 / 103 / 129 with
    1024 rows and with 4096, final losses 0.394 and 0.392; ``step_cost.py --effect`` (one seed):
    final loss 0.126 at 1024 rows, 0.140 at 4096, 0.136 with every row. 1024 became the default on
    those figures (it was 4096). Models whose per-rank rows per layer are few (an MLP at batch <=
    1024, a language model's tokens up to 1024 per rank) are unaffected: a layer with no more rows
    than this uses them all, exactly."""

    def __post_init__(self) -> None:
        """Check every field; normalise dtypes and tuples."""
        self.curvature = Curvature.parse("curvature", self.curvature)
        if not callable(self.damping):
            self.damping = _check_float("damping", self.damping, 0.0, math.inf, open_low=True)
        self.damping_scale = DampingScale.parse("damping_scale", self.damping_scale)
        self.factor_decay = _check_float("factor_decay", self.factor_decay, 0.0, 1.0, open_low=False)
        if self.factor_decay >= 1.0:
            raise _fail("factor_decay", self.factor_decay, "a number in [0, 1)")
        self.factor_every = _check_int("factor_every", self.factor_every, 1)
        self.inverse_every = _check_int("inverse_every", self.inverse_every, 1)
        if self.inverse_every % self.factor_every:
            raise _fail(
                "inverse_every",
                self.inverse_every,
                f"a multiple of factor_every={self.factor_every} (a decomposition between two "
                "factor refreshes would repeat the previous one)",
            )
        if self.kl_clip is not None:
            self.kl_clip = _check_float("kl_clip", self.kl_clip, 0.0, math.inf, open_low=True)
        self.method = Method.parse("method", self.method)
        self.factor_dtype = parse_dtype(
            "factor_dtype",
            self.factor_dtype,
            (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        )
        self.inverse_dtype = parse_dtype("inverse_dtype", self.inverse_dtype, (torch.float32, torch.float64))
        self.max_failed_decompositions = _check_int(
            "max_failed_decompositions", self.max_failed_decompositions, 1
        )
        known = layer_type_names()
        if self.layer_types is None:
            self.layer_types = known
        self.layer_types = self._names("layer_types", self.layer_types)
        for t in self.layer_types:
            if t not in known:
                raise _fail("layer_types", t, f"names from {', '.join(known)}")
        self.max_factor_dim = _check_int("max_factor_dim", self.max_factor_dim, 1)
        self.include = self._patterns("include", self.include)
        self.skip = self._patterns("skip", self.skip)
        if self.output_module is not None and (
            not isinstance(self.output_module, str) or not self.output_module
        ):
            raise _fail("output_module", self.output_module, "a module name or None")
        if not isinstance(self.infer_ignored_rows, bool):
            raise _fail("infer_ignored_rows", self.infer_ignored_rows, "true or false")
        self.ief_floor = _check_float("ief_floor", self.ief_floor, 0.0, 1.0, open_low=True)
        self.loss_reduction = LossReduction.parse("loss_reduction", self.loss_reduction)
        self.seed = _check_int("seed", self.seed, 0)
        self.refresh = Refresh.parse("refresh", self.refresh)
        for flag in ("factor_debias", "refresh_warmup"):
            if not isinstance(getattr(self, flag), bool):
                raise _fail(flag, getattr(self, flag), "true or false")
        self.refresh_low = _check_float("refresh_low", self.refresh_low, 0.0, math.inf, open_low=False)
        self.refresh_high = _check_float("refresh_high", self.refresh_high, 0.0, math.inf, open_low=True)
        if self.refresh_high <= self.refresh_low:
            raise _fail("refresh_high", self.refresh_high, f"a number above refresh_low={self.refresh_low}")
        self.refresh_cap = _check_int("refresh_cap", self.refresh_cap, 1)
        if self.refresh is Refresh.ADAPTIVE and self.refresh_cap < self.inverse_every:
            raise _fail("refresh_cap", self.refresh_cap, f"an integer >= inverse_every={self.inverse_every}")
        self.assignment = Assignment.parse("assignment", self.assignment)
        self.placement = Placement.parse("placement", self.placement)
        self.grad_worker_fraction = _check_float(
            "grad_worker_fraction", self.grad_worker_fraction, 0.0, 1.0, open_low=True
        )
        self.comm_dtype = parse_dtype("comm_dtype", self.comm_dtype, (torch.float32, torch.bfloat16))
        self.transport = Transport.parse("transport", self.transport)
        if self.statistics_rows is not None:
            self.statistics_rows = _check_int("statistics_rows", self.statistics_rows, 1)

    @staticmethod
    def _names(name: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise _fail(name, value, "a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise _fail(name, value, "a list of strings")
        return tuple(value)

    @classmethod
    def _patterns(cls, name: str, value: object) -> tuple[str, ...]:
        patterns = cls._names(name, value)
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise _fail(name, p, f"a valid regular expression ({exc})") from None
        return patterns

    def damping_at(self, step: int) -> float:
        """Damping lambda at ``step``; a schedule's value is checked to be positive and finite."""
        if not callable(self.damping):
            return float(self.damping)
        value = self.damping(step)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"KFACConfig.damping: the schedule returned {value!r} at step {step}; "
                "expected a positive finite number"
            )
        return float(value)

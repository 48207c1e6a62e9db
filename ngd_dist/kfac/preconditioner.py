"""The K-FAC preconditioner: orchestration of one optimisation step, on one rank or many.

Usage (any ``torch.optim`` optimizer follows the preconditioned gradients)::

    precond = KFACPreconditioner(model, KFACConfig(curvature="ief"), optimizer=opt)
    for x, y in loader:
        opt.zero_grad()
        logits = model(x)
        precond.mark_output(logits)        # or KFACConfig(output_module="head")
        loss_fn(logits, y).backward()
        if precond.step():                 # .grad of registered layers <- preconditioned
            opt.step()                     # False: the gradients were not finite, skip the step

One step, in order (SP-NGD / KAISA style; every collective is a no-op on one rank):

1. gradients are averaged over the ranks, unless DDP already did it (bucketed all-reduce);
2. on steps where factors are due, each rank's statistics are summed to each factor's owner
   (one reduce per owner rank, symmetric factors packed as upper triangles) after one small
   all-reduce of traces, counts and NaN flags, from which every rank makes the same decisions;
3. owners decompose the factors that are due and send them to their layer's gradient workers;
4. gradient workers precondition their layers and send the results along their row;
5. every rank scales all preconditioned gradients by the same KL-clip factor and writes them into
   ``.grad``.

Before any of that, the averaged gradients are checked: when they hold NaN or inf (a GradScaler
overflow among them), :meth:`step` does none of it and returns False. A factor that fails to
decompose ``max_failed_decompositions`` times in a row makes :meth:`step` raise
:class:`~ngd_dist.kfac.linalg.DecompositionError` on every rank.

With a ``torch.amp.GradScaler``, call ``scaler.unscale_(opt)`` before :meth:`step`; a step whose
gradients overflowed (the scaler will skip it) returns False and folds nothing into the factors.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ngd_dist.kfac.capture import StatisticsCapture
from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.curvature.modules import accumulation_dtype
from ngd_dist.kfac.distributed.assignment import LayerShape, grad_workers_for, make_plan
from ngd_dist.kfac.distributed.buckets import Collectives, Layout, Slot
from ngd_dist.kfac.distributed.comm import Communicator, default_communicator
from ngd_dist.kfac.distributed.wire import decomposition_slots, decomposition_tensors, received_decomposition
from ngd_dist.kfac.finite import all_finite, finite_flag
from ngd_dist.kfac.layer import FACTORS, Factor, KFACLayer
from ngd_dist.kfac.linalg import (
    Decomposition,
    DecompositionError,
    Eigen,
    damped_reciprocal,
    decompose,
    inverse_shifts,
    precondition_blocks,
)
from ngd_dist.kfac.memory import available_bytes, factor_memory, gib
from ngd_dist.kfac.refresh import AdaptiveInterval, AdaptiveSchedule, FixedSchedule, Schedule, relative_change
from ngd_dist.kfac.select import register_layers
from ngd_dist.kfac.state import check_factors_state, factors_state, load_factors_state
from ngd_dist.kfac.timing import PhaseClock

STATE_VERSION = 2
_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
"""The dtype reductions of half-precision gradients are taken in."""
FOLDS_UNKNOWN = 10_000
"""Fold count assumed for a saved state that has none: the debiased weight is then ``decay``."""
Key = tuple[str, str]


class ParamGroups(Protocol):
    """What the preconditioner reads of an optimizer: groups of ``params`` with their ``lr``.

    Any ``torch.optim.Optimizer`` is one; so is ``ngd_dist.service.deepspeed_engine.LearningRates``,
    which maps the model's parameters to the learning rates of an optimizer wrapped by DeepSpeed.
    """

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups, each a dict with at least ``"params"`` and ``"lr"``."""
        ...


@dataclass
class KFACStats:
    """Counters and last values of the preconditioner (what the metrics exporter reports)."""

    steps: int = 0
    """Steps taken: calls to :meth:`KFACPreconditioner.step` that returned True (the refresh
    schedule counts these)."""
    factor_refreshes: int = 0
    """Steps whose statistics were folded into the running factors."""
    decompositions: int = 0
    """Factor decompositions computed on this rank."""
    decomposition_retries: int = 0
    """Decompositions that failed in the configured dtype and were retried in float64."""
    decomposition_failures: int = 0
    """Decompositions that failed in float64 too (the previous one was kept); after
    ``max_failed_decompositions`` in a row of one factor, step() raises DecompositionError."""
    nonfinite_rejected: int = 0
    """Factor statistics rejected because they held NaN or inf (counted on every rank)."""
    skipped_steps: int = 0
    """Calls to step() that found non-finite gradients (NaN or inf, a GradScaler overflow among
    them) and returned False: nothing was folded, decomposed or preconditioned."""
    kl_scale: float = 1.0
    """The KL-clip scale applied at the last step (1 when it did not bind)."""
    damping: float = 0.0
    """Damping used at the last step."""


def _dot(u: Tensor, b: Tensor) -> Tensor:
    """``<u, b>`` as a float32 scalar: ``torch.dot`` of the flat tensors where both are contiguous
    float32 or float64 (no product tensor written), else the product summed in float32 or wider.
    """
    if u.dtype == b.dtype in (torch.float32, torch.float64) and u.is_contiguous() and b.is_contiguous():
        dot = torch.dot(u.view(-1), b.view(-1))
        return dot if dot.dtype == torch.float32 else dot.float()
    return (u * b).sum(dtype=_WIDE.get(b.dtype)).float()


class KFACPreconditioner:
    """K-FAC natural gradients for a model's layers: Linear, Hugging Face Conv1D, Conv2d and Embedding
    (Kronecker-factored), normalisation layers (element-wise), and types registered with
    :func:`~ngd_dist.kfac.register_layer_type`; :meth:`summary` shows what was done with each.

    Replaces their gradients by preconditioned ones under the EF, sampled-Fisher or iEF curvature
    (see :class:`KFACConfig`), on one process or spread over the ranks of a data-parallel job.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig | None = None,
        *,
        optimizer: ParamGroups | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        communicator: Communicator | None = None,
        clock: PhaseClock | None = None,
    ) -> None:
        """Register the model's supported layers, plan who does what, and hook the layers.

        ``optimizer`` is read for each parameter's learning rate (needed by ``kl_clip``);
        ``grad_scaler`` is the ``torch.amp.GradScaler`` of mixed-precision training, if any;
        ``communicator`` defaults to torch.distributed's default group when it is initialised
        (``config.transport="mpi"``: MPI's world), else a single process. A model wrapped in
        ``DistributedDataParallel`` has its gradients averaged by DDP, not again here. ``clock``
        times the phases of :meth:`step` and the statistics computed in the layers' hooks (give it
        the clock that times your forward and backward passes, and those exclude the statistics);
        by default the preconditioner's own.
        """
        self.config = config if config is not None else KFACConfig()
        if self.config.kl_clip is not None and optimizer is None:
            raise ValueError(
                "KFACConfig.kl_clip: got "
                f"{self.config.kl_clip!r} but no optimizer was given; pass optimizer=... so the "
                "learning rate can be read, or set kl_clip=None"
            )
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.comm = communicator if communicator is not None else self._default_communicator()
        self.collectives = Collectives(self.comm)
        self.ddp = isinstance(model, DistributedDataParallel)
        self.layers, self.skipped = register_layers(model, self.config)
        if not self.layers:
            raise ValueError(
                "KFACConfig.layer_types/include/skip: no module of the model can be preconditioned "
                f"(left out: {self.skipped or 'no module of a known type'})"
            )
        self._by_name = {layer.name: layer for layer in self.layers}
        self.device = self.layers[0].math.params(self.layers[0].module)[0].device
        shapes = [LayerShape(la.name, la.a_dim, la.g_dim, la.diagonal_a, la.diagonal_g) for la in self.layers]
        world = self.comm.world_size
        grad_workers = grad_workers_for(self.config.placement, world, self.config.grad_worker_fraction)
        self.plan = make_plan(shapes, world, self.config.assignment, grad_workers)
        columns = [self.plan.column_ranks(c) for c in range(self.plan.columns)]
        rows = [self.plan.row_ranks(j) for j in range(grad_workers)]
        self._column = self.collectives.on(self.comm.split(columns))
        self._row = self.collectives.on(self.comm.split(rows))
        self.memory = factor_memory(
            self.layers,
            self.plan,
            self.comm.rank,
            factor_dtype=self.config.factor_dtype,
            inverse_dtype=self.config.inverse_dtype,
            eigen=self.config.method == "eigen",
        )
        """Bytes of factors and decompositions this rank holds (see :mod:`ngd_dist.kfac.memory`)."""
        self._check_memory(available_bytes(self.device))
        trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
        covered = {id(p) for la in self.layers for p in la.math.params(la.module)}
        total = sum(trainable.values())
        self.coverage = sum(n for i, n in trainable.items() if i in covered) / total if total else 0.0
        """The fraction of the model's trainable parameters (each shared one counted once) that are
        preconditioned; the rest follow the base optimizer's plain gradients (read every step by the
        metrics exporter, so computed once here)."""
        self.schedule: Schedule = self._make_schedule()
        wide = self.config.factor_dtype == torch.float64
        self._comm_dtype: torch.dtype = torch.float64 if wide else self.config.comm_dtype
        self._inverse_dtype: torch.dtype = self.config.inverse_dtype
        self.stats = KFACStats()
        self._grad_norm_sq: Tensor | float | None = None
        self.clock = clock if clock is not None else PhaseClock()
        self._rebroadcast = False
        self._reciprocals: dict[str, tuple[Eigen, Eigen, float, Tensor]] = {}
        self._group_of: dict[int, int] | None = None
        self._group_count = 0
        self.idle: set[str] = set()
        """Registered layers that gathered no statistics in the first step (warned about once)."""
        self.decomposed: Counter[Key] = Counter()
        """How many times this rank decomposed each factor."""
        self._failed: Counter[Key] = Counter()
        """Consecutive failed decompositions of each factor this rank owns (0 after a success)."""
        self.capture = StatisticsCapture(
            self.layers, self.config, grad_scaler, clock=self.clock, step=lambda: self.stats.steps
        )
        self.capture.install(model)
        self.capture.capturing = self._capturing_at(0)

    # -- public --------------------------------------------------------------------------------

    def mark_output(self, logits: Tensor, mask: Tensor | None = None) -> None:
        """Declare the model's output logits of the forward pass just run (needed by "mc"/"ief").

        Call it after the forward pass and before ``backward``, once per micro-batch; it does
        nothing on steps that do not refresh the factors. ``KFACConfig.output_module`` does the
        same automatically for a named head module. ``mask`` (bool, the logits' leading shape):
        the rows the loss counts; rows where it is False (``ignore_index`` tokens, padding) add
        nothing to the curvature. Without it, rows whose logit gradient is exactly zero are left
        out (``KFACConfig.infer_ignored_rows``).
        """
        self.capture.mark_output(logits, mask)

    def mask_rows(self, mask: Tensor) -> None:
        """Give the row mask of the logits marked automatically by ``KFACConfig.output_module``.

        Call it after the forward pass and before ``backward``: e.g. ``labels != -100`` (shifted as
        the loss shifts them). With ``curvature="mc"`` the labels are drawn when the logits are
        marked, so pass the mask to :meth:`mark_output` instead.
        """
        self.capture.mask_rows(mask)

    @property
    def factor_step(self) -> bool:
        """Whether the current step gathers statistics for any layer."""
        return self.capture.active

    def grad_norm(self) -> float | None:
        """The last step's gradient norm: rank-averaged, before preconditioning, registered layers.

        None before the first step. A host sync when the KL clip is off (else it came with the clip's).
        """
        if self._grad_norm_sq is None:
            return None
        sq = float(self._grad_norm_sq)
        return math.sqrt(sq) if math.isfinite(sq) else float("nan")

    def intervals(self) -> dict[Key, int]:
        """The current refresh interval of every factor, in steps."""
        return {key: self.schedule.interval(key) for key in self._keys()}

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent per phase, summed over steps: the totals of :attr:`clock` (reset them at will).

        The phases are ``gradient_communication``, ``factor_computation`` (the statistics computed
        in hooks), ``factor_communication``, ``decomposition`` and ``preconditioning``; with a clock
        shared with the caller, the caller's phases too.
        """
        return self.clock.totals

    def summary(self) -> str:
        """A table of what is preconditioned and how: each layer with its type, parameters, factor
        shapes (``diag`` for a diagonal one) and the weights it shares, the memory of factors and
        decompositions on this rank, the coverage, and every module left out with its reason.
        """
        c = self.config
        params = {la.name: sum(p.numel() for p in la.math.params(la.module)) for la in self.layers}
        lines = [
            f"K-FAC ({c.curvature}, {c.method}): {len(self.layers)} layers preconditioned, "
            f"{self.coverage:.1%} of trainable parameters; on rank {self.comm.rank}: "
            f"{gib(self.memory.factors)} of factors, {gib(self.memory.decompositions)} of decompositions"
        ]
        width = max(len(la.name) for la in self.layers)

        def side(la: KFACLayer, f: str) -> str:
            n = la.a_dim if f == "a" else la.g_dim
            return f"diag {n}" if la.diagonal(f) else f"{n}x{n}"

        for la in self.layers:
            tied = f"  tied: {', '.join(la.tied)}" if la.tied else ""
            tied += "  (no statistics seen: its forward never ran)" if la.name in self.idle else ""
            lines.append(
                f"  {la.name:<{width}}  {la.kind:<10} {params[la.name]:>10,} params  "
                f"A {side(la, 'a'):<11} G {side(la, 'g'):<11}{tied}"
            )
        for name, reason in self.skipped.items():
            lines.append(f"  left out: {name}: {reason}")
        return "\n".join(lines)

    @property
    def comm_bytes(self) -> dict[str, int]:
        """Payload bytes this rank handed to collectives, by kind, since construction."""
        return dict(self.collectives.bytes)

    def step(self, *, checked_finite: bool = False) -> bool:
        """Refresh what is due; replace each registered layer's ``.grad`` by its natural gradient.

        Returns True when it did. Returns False, as ``GradScaler.step`` skips, when the model's
        gradients (averaged over the ranks first: by DDP, or here) hold NaN or inf, a GradScaler
        overflow among them: then the step's statistics are dropped, nothing is folded, decomposed
        or preconditioned, ``.grad`` is left as it is, ``stats.skipped_steps`` counts it and the
        refresh schedule does not advance. Skip the optimizer step then. The gradients being the
        same on every rank, so is the answer: the check needs no collective of its own (one host
        sync for the flag).

        Raises :class:`~ngd_dist.kfac.linalg.DecompositionError` (one line naming the layer, the
        factor and the remedies) when a factor has failed to decompose
        ``config.max_failed_decompositions`` times in a row; every rank learns of it with the next
        step's statistics and raises at that same step.

        ``checked_finite``: the caller has already established, on every rank, that the gradients
        are finite (the service folds that check into its per-step all-reduce); the check is not
        repeated.
        """
        with self.clock("gradient_communication"):
            self._average_gradients()
        if not checked_finite and not self._gradients_finite():
            self.stats.skipped_steps += 1
            self._grad_norm_sq = math.nan
            self.discard_step()
            return False
        step = self.stats.steps
        keys = self._keys()
        fold = [k for k in keys if self.schedule.fold_due(k, step)]
        due = [k for k in keys if self.schedule.decompose_due(k, step)]
        if fold:
            self._check_marked()
            with self.clock("factor_communication"):
                self._fold(fold, step)
        self._clear_pending()
        if due or self._rebroadcast:
            with self.clock("decomposition"):
                self._decompose(due, keys if self._rebroadcast else due, step)
        with self.clock("preconditioning"):
            self._precondition(step)
        self.stats.steps += 1
        self.capture.reset()
        self.capture.capturing = self._capturing_at(self.stats.steps)
        return True

    def discard_step(self) -> None:
        """Drop the statistics gathered since the last :meth:`step`, without using them.

        For a loop that skips a step for a reason :meth:`step` cannot see (a non-finite loss, or a
        non-finite gradient on another rank that its own check already caught): call it instead
        of :meth:`step`, on every rank. Factors, decompositions, ``.grad`` and the refresh schedule
        are left as they are, and nothing is communicated.
        """
        self._clear_pending()
        self.capture.reset()
        self.capture.capturing = self._capturing_at(self.stats.steps)

    def remove(self) -> None:
        """Remove the hooks; the model is left as it was."""
        self.capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """This rank's factors, the traces and refresh state, and the counters.

        Decompositions are not saved: :meth:`load_state_dict` recomputes them from the factors
        they were computed from, so the next step is identical to an uninterrupted run.
        """
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "stats": asdict(self.stats),
            "factors": factors_state(self.layers),
            "traces": {f"{la.name}/{f}": la.factors[f].trace for la in self.layers for f in FACTORS},
            "folds": {f"{la.name}/{f}": la.factors[f].folds for la in self.layers for f in FACTORS},
        }
        if isinstance(self.schedule, AdaptiveSchedule):
            policy = self.schedule.policy
            state["refresh"] = {
                "intervals": {f"{k[0]}/{k[1]}": v for k, v in policy.intervals.items()},  # type: ignore[index]
                "last": {f"{k[0]}/{k[1]}": v for k, v in policy.last.items()},  # type: ignore[index]
            }
        if self.capture.generator is not None:
            state["mc_generator"] = self.capture.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and recompute this rank's decompositions.

        Raises ValueError naming the entry when the state does not fit this model and job.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"KFAC state: version {got!r}; expected a dict from KFACPreconditioner.state_dict() "
                f"with version {STATE_VERSION}"
            )
        if state["world_size"] != self.comm.world_size or state["rank"] != self.comm.rank:
            raise ValueError(
                f"KFAC state: written by rank {state['rank']} of {state['world_size']}; expected "
                f"rank {self.comm.rank} of {self.comm.world_size} (factors are sharded by rank)"
            )
        traces = state["traces"]
        missing = sorted({f"{la.name}/{f}" for la in self.layers for f in FACTORS} ^ set(traces))
        if missing:
            raise ValueError(
                f"KFAC state: layers {missing} are in only one of the checkpoint and the model; "
                "expected the same registered layers"
            )
        check_factors_state(self.layers, state["factors"])
        load_factors_state(
            self.layers, state["factors"], traces, self.config.method, self._inverse_dtype, self.device
        )
        # A state from before fold counts were kept: its averages are long past their first folds.
        folds = state.get("folds", {})
        for la in self.layers:
            for f in FACTORS:
                la.factors[f].folds = int(folds.get(f"{la.name}/{f}", FOLDS_UNKNOWN))
        self.stats = KFACStats(**state["stats"])
        if "refresh" in state and isinstance(self.schedule, AdaptiveSchedule):
            policy = self.schedule.policy
            policy.intervals = {tuple(k.rsplit("/", 1)): v for k, v in state["refresh"]["intervals"].items()}
            policy.last = {tuple(k.rsplit("/", 1)): v for k, v in state["refresh"]["last"].items()}
        if "mc_generator" in state:
            self.capture.generator = torch.Generator(self.device)
            self.capture.generator.set_state(state["mc_generator"])
        self._rebroadcast = True
        self._failed.clear()
        self.capture.reset()
        self.capture.capturing = self._capturing_at(self.stats.steps)

    # -- set-up --------------------------------------------------------------------------------

    def _check_memory(self, available: int | None) -> None:
        """Refuse to start when this rank's factors cannot fit in what the device has free."""
        if available is None or self.memory.total <= available:
            return
        largest = max(self.layers, key=lambda la: max(la.a_dim, la.g_dim))
        raise ValueError(
            f"KFACConfig.max_factor_dim: the factors and decompositions need {gib(self.memory.total)} on "
            f"rank {self.comm.rank}, more than the {gib(available)} free on {self.device}; lower "
            f"max_factor_dim (now {self.config.max_factor_dim}; the largest layer is {largest.name!r}, "
            f"{largest.g_dim}x{largest.a_dim}), leave large layers out with skip, or use more ranks"
        )

    def _default_communicator(self) -> Communicator:
        if self.config.transport == "mpi":
            from ngd_dist.kfac.distributed.mpi import MPICommunicator

            return MPICommunicator()
        return default_communicator()

    def _make_schedule(self) -> Schedule:
        c = self.config
        if c.refresh == "fixed":
            return FixedSchedule(c.factor_every, c.inverse_every, warmup=c.refresh_warmup)
        policy = AdaptiveInterval(
            initial=c.factor_every if c.refresh_warmup else c.inverse_every,
            cap=c.refresh_cap,
            low=c.refresh_low,
            high=c.refresh_high,
            floor=c.factor_every,
        )
        return AdaptiveSchedule(c.factor_every, policy)

    def _keys(self) -> list[Key]:
        return [(layer.name, f) for layer in self.layers for f in FACTORS]

    def _capturing_at(self, step: int) -> set[str]:
        return {name for name, f in self._keys() if self.schedule.fold_due((name, f), step)}

    # -- one step ------------------------------------------------------------------------------

    def _check_marked(self) -> None:
        if self.config.curvature.needs_logits and self.capture.unmarked():
            raise RuntimeError(
                f"curvature={self.config.curvature!r} needs the model's logits: call "
                "precond.mark_output(logits) after each forward pass (before backward), or set "
                "KFACConfig(output_module=<name of the head module>)"
            )

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _average_gradients(self) -> None:
        """Average every gradient over the ranks in one bucket, unless DDP did it already."""
        world = self.comm.world_size
        if world == 1 or self.ddp:
            return
        grads = self._grads()
        if not grads:
            return
        dtype = grads[0].dtype if all(g.dtype == grads[0].dtype for g in grads) else torch.float32
        layout = Layout([Slot(i, tuple(g.shape)) for i, g in enumerate(grads)])
        summed = self.collectives.all_reduce(layout, dict(enumerate(grads)), "gradients", dtype, self.device)
        for i, g in enumerate(grads):
            g.copy_(summed[i] / world)

    def _gradients_finite(self) -> bool:
        """Whether every gradient of the model is finite (what a GradScaler checks too)."""
        grads = self._grads()
        return all_finite(grads)

    def _clear_pending(self) -> None:
        for layer in self.layers:
            layer.pending_a.clear()
            layer.pending_g.clear()

    def _fold(self, keys: list[Key], step: int) -> None:
        """Sum due statistics to their owners and fold them; every rank makes the same decisions.

        The small all-reduce that comes first carries, per factor, its trace, its row count, a
        NaN flag and its owner's count of consecutive failed decompositions (DecompositionError).
        """
        rank, decay = self.comm.rank, self.config.factor_decay
        meta_in: dict[Hashable, Tensor] = {}
        for key in keys:
            pending = self._factor(key).pending
            failed = float(self._failed[key])
            if pending.total is None:
                meta_in[key] = torch.tensor([0.0, 0.0, 0.0, failed], dtype=torch.float64, device=self.device)
                continue
            total = pending.total
            diag = total if total.dim() == 1 else total.diagonal()
            flag = (~finite_flag([total])).double()
            count, failures = (total.new_tensor(v, dtype=torch.float64) for v in (pending.count, failed))
            meta_in[key] = torch.stack([diag.sum().double(), count, flag, failures])
        layout = Layout([Slot(key, (4,)) for key in keys])
        meta = self.collectives.all_reduce(layout, meta_in, "meta", torch.float64, self.device)
        values = {key: meta[key].tolist() for key in keys}
        self._raise_on_failing_decompositions(values)
        if self.stats.factor_refreshes == 0 and not self.idle:
            self._note_idle_layers(values)
        reduced: dict[Hashable, Tensor] = {}
        for owner in range(self.comm.world_size):
            mine = [k for k in keys if self.plan.owner(*k) == owner and values[k][1] > 0]
            slots = [
                Slot(k, self._by_name[k[0]].shape(k[1]), symmetric=len(self._by_name[k[0]].shape(k[1])) == 2)
                for k in mine
            ]
            totals = {k: self._factor(k).pending.total for k in mine}
            result = self.collectives.reduce(
                Layout(slots),
                {k: t for k, t in totals.items() if t is not None},
                owner,
                "factors",
                self._comm_dtype,
                self.device,
            )
            if result is not None:
                reduced.update(result)
        accepted: list[Key] = []
        for key in keys:
            trace_sum, count, nonfinite, _ = values[key]
            if count == 0:
                continue
            if nonfinite > 0 or not math.isfinite(trace_sum):
                self.stats.nonfinite_rejected += 1
                continue
            accepted.append(key)
            factor = self._factor(key)
            kept = factor.next_decay(decay, self.config.factor_debias)
            factor.fold_trace(trace_sum / count, kept)
            if self.plan.owner(*key) == rank:
                factor.fold(reduced[key].to(accumulation_dtype(self.config.factor_dtype)) / count, kept)
        if accepted:
            self.stats.factor_refreshes += 1

    def _note_idle_layers(self, values: dict[Key, list[float]]) -> None:
        """Warn once about registered layers that gathered no statistics on any rank in the first step
        that folds: their module's forward never ran (a parent using the weight directly).
        """
        for layer in self.layers:
            counts = [values[(layer.name, f)][1] for f in FACTORS if (layer.name, f) in values]
            if counts and all(c == 0 for c in counts):
                self.idle.add(layer.name)
        if self.idle:
            names = ", ".join(sorted(self.idle))
            warnings.warn(
                f"K-FAC: layers {names} saw no statistics in the first step: their modules' forward never "
                "ran (a parent applies the weight itself, as nn.MultiheadAttention does with out_proj); "
                "they keep their plain gradients",
                RuntimeWarning,
                stacklevel=3,
            )

    def _raise_on_failing_decompositions(self, values: dict[Key, list[float]]) -> None:
        """Raise DecompositionError for the first factor whose owner reported too many failures in a row."""
        limit = self.config.max_failed_decompositions
        for (layer, factor), meta in values.items():
            if meta[3] >= limit:
                raise DecompositionError(
                    layer,
                    factor,
                    int(meta[3]),
                    limit=limit,
                    damping=self.config.damping_at(self.stats.steps),
                    inverse_dtype=self._inverse_dtype,
                )

    def _factor(self, key: Hashable) -> Factor:
        assert isinstance(key, tuple)
        return self._by_name[key[0]].factors[key[1]]

    def _layer_damping(self, layer: KFACLayer, damping: float) -> float:
        """``damping`` for ``layer``: as it is, or times the mean eigenvalue of its ``G (x) A``
        (``damping_scale="relative"``, from the running traces every rank knows).
        """
        if self.config.damping_scale == "absolute":
            return damping
        trace_a, trace_g = layer.factors["a"].trace, layer.factors["g"].trace
        if not trace_a or not trace_g or trace_a <= 0 or trace_g <= 0:
            return damping
        scaled = damping * (trace_a / layer.a_dim) * (trace_g / layer.g_dim)
        return scaled if math.isfinite(scaled) and scaled > 0 else damping

    def _shift(self, key: Key, damping: float) -> float:
        layer = self._by_name[key[0]]
        trace_a = layer.factors["a"].trace or 0.0
        trace_g = layer.factors["g"].trace or 0.0
        damping = self._layer_damping(layer, damping)
        shift_a, shift_g = inverse_shifts(trace_a, layer.a_dim, trace_g, layer.g_dim, damping)
        return shift_a if key[1] == "a" else shift_g

    def _observe_staleness(self, due: list[Key], step: int) -> None:
        """Adapt the due factors' intervals to how far they moved since their decompositions.

        Owners measure; one all-reduce gives every rank the same numbers and the same decisions.
        """
        middle = (self.config.refresh_low + self.config.refresh_high) / 2
        changes: dict[Hashable, Tensor] = {}
        for key in due:
            factor = self._factor(key)
            if self.plan.owner(*key) != self.comm.rank:
                continue
            if factor.running is None or factor.decomposed_from is None:
                change = middle  # nothing to compare yet: keep the interval
            else:
                change = relative_change(factor.running, factor.decomposed_from)
            changes[key] = torch.tensor([change], dtype=torch.float64)
        layout = Layout([Slot(key, (1,)) for key in due])
        shared = self.collectives.all_reduce(layout, changes, "meta", torch.float64, self.device)
        for key in due:
            self.schedule.observe(key, step, float(shared[key]))

    def _decompose(self, due: list[Key], keys: list[Key], step: int) -> None:
        """Owners decompose their ``due`` factors, then send ``keys`` to their column.

        ``keys`` are the due factors, or all of them after a checkpoint was loaded.
        """
        rank, damping = self.comm.rank, self.config.damping_at(step)
        self._rebroadcast = False
        if isinstance(self.schedule, AdaptiveSchedule) and due:
            self._observe_staleness(due, step)
        for key in due:
            factor = self._factor(key)
            if self.plan.owner(*key) != rank or factor.running is None:
                continue
            shift = self._shift(key, damping)
            result, retried = decompose(
                factor.running,
                self.config.method,
                shift,
                self._inverse_dtype,
            )
            self.stats.decompositions += 1
            self.decomposed[key] += 1
            self.stats.decomposition_retries += int(retried)
            self.stats.decomposition_failures += int(result is None)
            self._failed[key] = self._failed[key] + 1 if result is None else 0
            if result is not None:
                factor.decomposition = result
                factor.decomposed_from, factor.decomposed_shift = factor.running, shift
        if self.plan.grad_workers == 1:
            return
        column = self.plan.column_of(rank)
        members = self.plan.column_ranks(column)
        mine = [k for k in keys if self.plan.layer_column[k[0]] == column]
        for src, owner in enumerate(members):
            sent = [k for k in mine if self.plan.owner(*k) == owner]
            if not sent:
                continue
            method = self.config.method
            layout = Layout(
                [s for k in sent for s in decomposition_slots(k, self._by_name[k[0]].shape(k[1]), method)]
            )
            payload: dict[Hashable, Tensor] = {}
            if owner == rank:
                for k in sent:
                    payload.update(decomposition_tensors(k, self._factor(k).decomposition))
            received = self._column.broadcast(
                layout,
                payload,
                src,
                "decompositions",
                self._inverse_dtype,
                self.device,
            )
            if owner != rank:
                for k in sent:
                    d = received_decomposition(k, received, method)
                    if d is not None:
                        self._factor(k).decomposition = d

    def _reciprocal(self, name: str, a: Decomposition, g: Decomposition, damping: float) -> Tensor | None:
        """The eigen form's damped reciprocal of a layer, kept while its decompositions and damping stay."""
        if not isinstance(a, Eigen) or not isinstance(g, Eigen):
            return None
        kept = self._reciprocals.get(name)
        if kept is not None and kept[0] is a and kept[1] is g and kept[2] == damping:
            return kept[3]
        reciprocal = damped_reciprocal(a, g, damping)
        self._reciprocals[name] = (a, g, damping, reciprocal)
        return reciprocal

    def _learning_rates(self, layers: Sequence[KFACLayer]) -> list[float]:
        """The learning rate of each layer's weight, read from its optimizer group now (0 if none).

        Which group holds which weight is looked up once and again only when the optimizer's
        groups change in number (``add_param_group``); the rates themselves are read every call.
        """
        if self.optimizer is None:
            return [0.0] * len(layers)
        groups = self.optimizer.param_groups
        if self._group_of is None or self._group_count != len(groups):
            self._group_of = {id(p): i for i, group in enumerate(groups) for p in group["params"]}
            self._group_count = len(groups)
        found = [self._group_of.get(id(la.math.params(la.module)[0])) for la in layers]
        return [0.0 if i is None else float(groups[i]["lr"]) for i in found]

    def _precondition(self, step: int) -> None:
        """Precondition this rank's layers, share the results along its row, clip, write ``.grad``.

        Gradients are read and written as the blocks of :meth:`ModuleMath.grad_blocks` (a weight
        and its bias column): views of ``.grad``, never concatenated into one matrix.
        """
        damping = self.config.damping_at(step)
        self.stats.damping = damping
        rank = self.comm.rank
        column = self.plan.column_of(rank)
        grads = {la.name: la.math.grad_blocks(la.module) for la in self.layers}
        present = [la for la in self.layers if grads[la.name] is not None]
        updates: dict[str, list[Tensor]] = {}
        for layer in present:
            if self.plan.layer_column[layer.name] != column:
                continue
            blocks = grads[layer.name]
            assert blocks is not None
            a, g = layer.factors["a"].decomposition, layer.factors["g"].decomposition
            if a is None or g is None:
                updates[layer.name] = blocks
            else:
                layer_damping = self._layer_damping(layer, damping)
                reciprocal = self._reciprocal(layer.name, a, g, layer_damping)
                updates[layer.name] = precondition_blocks(a, g, blocks, layer_damping, reciprocal=reciprocal)
        if self.plan.columns > 1:
            for src in range(self.plan.columns):
                sent = [la for la in present if self.plan.layer_column[la.name] == src]
                if not sent:
                    continue
                shapes = {la.name: [tuple(b.shape) for b in grads[la.name] or []] for la in sent}
                slots = [((n, k), size) for n, sizes in shapes.items() for k, size in enumerate(sizes)]
                layout = Layout([Slot(key, size) for key, size in slots])
                payload: dict[Hashable, Tensor] = {}
                if src == column:
                    payload = {(la.name, k): b for la in sent for k, b in enumerate(updates[la.name])}
                dtype = (grads[sent[0].name] or [])[0].dtype
                received = self._row.broadcast(layout, payload, src, "preconditioned", dtype, self.device)
                if src != column:
                    updates.update({n: [received[(n, k)] for k in range(len(s))] for n, s in shapes.items()})
        if not updates:
            return
        # The squared gradient norm stays on the device (read by grad_norm() only when asked); with
        # the KL clip on, it rides along the clip's host sync of lr^2 <Pg, g>.
        pairs = [
            (layer, b, u)
            for layer in present
            for b, u in zip(grads[layer.name] or [], updates[layer.name], strict=True)
        ]
        self._grad_norm_sq = torch.stack([_dot(b, b) for _, b, _ in pairs]).sum()
        scale = 1.0
        if self.config.kl_clip is not None:
            lr2 = [lr**2 for lr in self._learning_rates([layer for layer, _, _ in pairs])]
            dots = torch.stack([_dot(u, b) for _, b, u in pairs])
            vg_t = dots @ torch.tensor(lr2, dtype=dots.dtype, device=dots.device)
            sq, vg = (float(v) for v in torch.stack([self._grad_norm_sq, vg_t]).tolist())
            self._grad_norm_sq = sq
            if vg > 0 and math.isfinite(vg):
                scale = min(1.0, math.sqrt(self.config.kl_clip / vg))
        self.stats.kl_scale = scale
        for layer in present:
            layer.math.set_grad_blocks(layer.module, updates[layer.name], scale)

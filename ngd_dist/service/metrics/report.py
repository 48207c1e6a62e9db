"""What one rank reports to its exporter after each step.

Throughput, loss, gradient norm, the seconds of each phase (from the step's one
:class:`~ngd_dist.kfac.timing.PhaseClock`, where the preconditioner's phases and the statistics
its hooks compute are already counted once), the preconditioner's counters, and the γ of the
update-quality probe on the steps it measures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ngd_dist.kfac.preconditioner import KFACPreconditioner
from ngd_dist.kfac.quality import QualityProbe
from ngd_dist.kfac.timing import PhaseClock
from ngd_dist.service.environment import Environment
from ngd_dist.service.jobs import JobError, MetricsSpec
from ngd_dist.service.metrics.exporter import MetricsExporter, MetricsPortError


def open_exporter(spec: MetricsSpec, env: Environment) -> MetricsExporter:
    """This rank's Prometheus exporter (disabled when metrics are off or the port is 0)."""
    try:
        return MetricsExporter(
            rank=env.rank,
            world_size=env.world_size,
            host=spec.host,
            port=spec.port if spec.enabled else 0,
            local_rank=env.local_rank,
            stall_seconds=spec.stall_seconds,
        )
    except MetricsPortError as exc:
        raise JobError(f"metrics.port: {exc}") from exc


@dataclass(frozen=True)
class Snapshot:
    """The parameters before a step the quality probe measures, and the seconds the copy took."""

    before: dict[str, Tensor]
    seconds: float


class StepReport:
    """Per-step metrics of one rank, read from the parts the loop trains with."""

    def __init__(
        self,
        *,
        clock: PhaseClock,
        model: nn.Module,
        precond: KFACPreconditioner | None,
        quality: QualityProbe | None,
        quality_every: int,
    ) -> None:
        """Report what ``clock`` (shared with ``precond``) timed; ``model`` is what the step
        differentiates (read for the gradient norm without ``precond``); ``quality`` measures every
        ``quality_every`` steps.
        """
        self.clock = clock
        self.model = model
        self.precond = precond
        self.quality = quality
        self.quality_every = quality_every
        self.last_gamma: float | None = None
        """γ of the last step the probe measured (None before)."""

    def snapshot(self, metrics: MetricsExporter, step: int) -> Snapshot | None:
        """The parameters before optimizer step ``step`` (1-based), if the probe measures that step."""
        if self.quality is None or not metrics.enabled or step % self.quality_every:
            return None
        start = time.perf_counter()
        return Snapshot(self.quality.snapshot(), time.perf_counter() - start)

    def observe(
        self, metrics: MetricsExporter, *, step: int, samples: int, tokens: int, loss: float, seconds: float
    ) -> None:
        """Report the step just taken (``samples`` and ``tokens`` of this rank), its phase times, and
        the preconditioner's counters.
        """
        if not metrics.enabled:
            return
        if self.precond is not None:
            metrics.observe_preconditioner(self.precond)
        metrics.observe_step(
            step=step,
            samples=samples,
            tokens=tokens,
            seconds=seconds,
            loss=loss,
            grad_norm=self._grad_norm(),
            phases=self.clock.take(),
        )

    def skipped(self, metrics: MetricsExporter, *, reason: str, loss: float) -> None:
        """Report a step every rank skipped (``reason``: one of ``SKIP_REASONS``) and this rank's loss;
        the time of its phases is dropped.
        """
        if not metrics.enabled:
            return
        self.clock.take()
        metrics.observe_skipped_step(reason=reason, loss=loss)

    def measure_quality(self, metrics: MetricsExporter, snapshot: Snapshot | None) -> None:
        """γ of the step just taken (``ngd_quality_gamma``), if :meth:`snapshot` took one before it."""
        if snapshot is None or self.quality is None:
            return
        start = time.perf_counter()
        self.last_gamma = self.quality.measure(snapshot.before).gamma
        metrics.observe_quality(gamma=self.last_gamma, seconds=snapshot.seconds + time.perf_counter() - start)

    def _grad_norm(self) -> float | None:
        """L2 norm of the step's rank-averaged gradient, before preconditioning (None if unknown).

        With the preconditioner on, that of the layers it handles (it computes the norm anyway);
        otherwise of every parameter's ``.grad`` as DDP left it. DeepSpeed without K-FAC keeps the
        gradients in its own buffers: None.
        """
        if self.precond is not None:
            return self.precond.grad_norm()
        params = self.model.parameters()
        grads = [p.grad.detach().float().square().sum() for p in params if p.grad is not None]
        if not grads:
            return None
        return math.sqrt(float(torch.stack(grads).sum()))

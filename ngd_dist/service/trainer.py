"""The training worker behind ``ngd-dist train``: one rank of a YAML-described job.

It builds the model (identically on every rank), the rank's shard of the data, the optimizer with
its LR schedule and the K-FAC preconditioner, resumes from the newest checkpoint valid on every
rank (``checkpoint.resume: auto``), and trains: forward/backward under the job's precision,
preconditioning, optimizer step, a progress bar on rank 0 and rank-prefixed logs elsewhere,
checkpoints every ``checkpoint.every`` steps and when SIGTERM/SIGINT asks to stop. A resumed run
follows the same loss curve as an uninterrupted one: model, optimizer, preconditioner, schedule,
data position and RNG states are all restored.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ngd_dist.kfac.preconditioner import KFACPreconditioner
from ngd_dist.kfac.quality import QualityProbe
from ngd_dist.kfac.timing import PhaseClock
from ngd_dist.service.catalog import build_dataset, build_model, output_module_of, task_of
from ngd_dist.service.checkpoint import (
    CheckpointStore,
    PreemptionHandler,
    capture_rng_state,
    restore_rng_state,
)
from ngd_dist.service.data.datasets import ShardedLoader
from ngd_dist.service.environment import Environment, setup, teardown
from ngd_dist.service.jobs import Job, JobError, job_to_dict
from ngd_dist.service.metrics import MetricsExporter, MetricsPortError
from ngd_dist.service.optim import build_optimizer

if TYPE_CHECKING:
    from ngd_dist.service.deepspeed_engine import DeepSpeedEngine

log = logging.getLogger("ngd_dist.service")


@dataclass(kw_only=True)
class TrainResult:
    """What a finished (or preempted) run reports."""

    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    first_loss: float
    last_loss: float
    seconds: float
    samples_per_second: float
    resumed_from: int | None
    preempted: bool


class Worker:
    """Everything one rank needs to train a job."""

    def __init__(
        self, job: Job, env: Environment, *, job_dir: Path | None = None, deepspeed: bool = False
    ) -> None:
        """Build model, data, optimizer, schedule and preconditioner for ``job`` on ``env``.

        ``deepspeed``: step through a DeepSpeed engine (:mod:`ngd_dist.service.deepspeed_engine`)
        instead of DDP and the optimizer alone.
        """
        self.job, self.env = job, env
        paths = (str(job_dir),) if job_dir is not None else ()
        self.global_batch = job.batch.check_world(env.world_size)
        model = build_model(job.model.name, job.model.args, seed=job.seed, import_paths=paths)
        self.task = task_of(job.model.name, model)
        self.base_model = model.to(env.device)
        self.model: nn.Module = self.base_model
        if env.distributed and not deepspeed:
            device_ids = [env.local_rank] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.base_model, device_ids=device_ids)
        x, y = build_dataset(job.data.name, job.data.args, seed=job.seed, import_paths=paths)
        per_rank = job.batch.per_rank * job.batch.accumulation
        self.loader = ShardedLoader(
            x,
            y,
            rank=env.rank,
            world_size=env.world_size,
            batch_size=per_rank,
            seed=job.seed,
            device=env.device,
        )
        self.clock = PhaseClock()
        """Wall time of the step's forward, backward and optimizer phases (``ngd_phase_seconds``)."""
        self.quality: QualityProbe | None = None
        """The update-quality probe of ``metrics.quality_every`` (None when off)."""
        self.last_gamma: float | None = None
        if job.metrics.enabled and job.metrics.port and job.metrics.quality_every > 0:
            self.quality = QualityProbe.draw(
                self.base_model,
                x,
                y,
                size=job.metrics.quality_probe,
                seed=job.seed * 7919 + env.rank,
                loss=self.task,
                device=env.device,
            )
        self.optimizer = build_optimizer(job.optimizer, self.model)
        base_lr = job.optimizer.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: job.lr_at(step) / base_lr
        )
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=job.precision.use_grad_scaler)
        self.engine: DeepSpeedEngine | None = None
        if deepspeed:
            from ngd_dist.service.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(job, self.base_model, self.optimizer)
        self.precond: KFACPreconditioner | None = None
        config = job.kfac_config()
        if config is not None:
            if config.output_module is None:
                head = output_module_of(job.model.name, self.base_model)
                if head is not None:
                    config.output_module = f"module.{head}" if self.model is not self.base_model else head
            elif self.model is not self.base_model:
                config.output_module = f"module.{config.output_module}"
            if config.output_module is None and config.curvature in ("ief", "mc"):
                linears = [n for n, m in self.base_model.named_modules() if isinstance(m, nn.Linear)]
                hint = f" (its last Linear is {linears[-1]!r})" if linears else ""
                raise JobError.invalid(
                    "preconditioner.output_module",
                    None,
                    f"the name of the module producing the logits of {job.model.name!r}{hint}: "
                    f"curvature {config.curvature!r} needs them",
                )
            self.precond = KFACPreconditioner(
                self.model,
                config,
                optimizer=self.optimizer if self.engine is None else self.engine.learning_rates,
                grad_scaler=self.scaler,
            )
        self.store = (
            CheckpointStore(
                job.checkpoint.dir, keep=job.checkpoint.keep, rank=env.rank, world_size=env.world_size
            )
            if job.checkpoint.dir
            else None
        )
        self.step = 0

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly."""
        return {
            "step": self.step,
            "model": self.base_model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.engine is None else self.engine.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "preconditioner": self.precond.state_dict() if self.precond is not None else {},
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "job": job_to_dict(self.job),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`'s output."""
        self.base_model.load_state_dict(state["model"])
        if self.engine is not None:
            self.engine.load_state_dict(state["optimizer"])
        elif "masters" in state["optimizer"]:
            raise JobError(
                "checkpoint.resume: the checkpoint was written under --launcher deepspeed; "
                "resume it with that launcher, or set checkpoint.resume=never"
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.precond is not None and state["preconditioner"]:
            self.precond.load_state_dict(state["preconditioner"])
        self.loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])

    def _reduce(self, value: float, op: dist.ReduceOp.RedOpType, dtype: torch.dtype = torch.float64) -> float:
        """``value`` reduced over all ranks with ``op`` (itself on one rank)."""
        if not self.env.distributed:
            return value
        t = torch.tensor([value], dtype=dtype, device=self.env.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def _all_reduce_min(self, value: int) -> int:
        return int(self._reduce(value, dist.ReduceOp.MIN, torch.int64))

    def resume(self) -> int | None:
        """Load the checkpoint ``checkpoint.resume`` asks for; return its step, or None."""
        resume = self.job.checkpoint.resume
        if self.store is None or resume == "never":
            return None
        if resume == "auto":
            found = self.store.latest_agreed(self._all_reduce_min)
            if found is None:
                return None
            step, state = found
        else:
            state = self.store.load(resume)
            step = int(state["step"])
        self.load(state)
        return step

    def save(self) -> None:
        """Write this rank's checkpoint of the current step, then prune once every rank has."""
        if self.store is None:
            return
        self.store.save(self.step, self.state(), prune=False)
        self._all_reduce_min(1)  # every rank's file is complete before any prunes
        self.store.prune()

    # -- training ------------------------------------------------------------------------------

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def train_step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step over ``batch.accumulation`` micro-batches; returns the mean loss."""
        job = self.job
        if self.engine is not None:
            mean = self.engine.train_step(x, y, self._loss, self.precond, clock=self.clock)
            self.scheduler.step()
            self.step += 1
            return mean
        chunks = job.batch.accumulation
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(chunks), y.chunk(chunks), strict=True)):
            sync = i == chunks - 1 or not isinstance(self.model, DistributedDataParallel)
            context = self.model.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
            with context:
                with self.clock("forward"), torch.autocast(
                    self.env.device.type, dtype=job.precision.torch_dtype, enabled=job.precision.autocast
                ):
                    loss = self._loss(self.model(xm), ym)
                with self.clock("backward"):
                    self.scaler.scale(loss).backward()
            total += float(loss.detach())
        if chunks > 1:  # each micro-batch's loss is a mean over its own rows: average them
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(chunks)
        self.scaler.unscale_(self.optimizer)
        if self.precond is not None:
            self.precond.step()
        with self.clock("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return total / chunks

    def _mean_over_ranks(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM) / self.env.world_size

    def _stop_requested(self, local: bool, samples: int = 0, tokens: int = 0) -> tuple[bool, int, int]:
        """Whether any rank asks to stop, and this step's samples and tokens summed over ranks.

        One all-reduce per step carries all three (a SUM: the stop flags add up to > 0 when any is set).
        """
        if not self.env.distributed:
            return local, samples, tokens
        t = torch.tensor([int(local), samples, tokens], dtype=torch.int64, device=self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        stops, total_samples, total_tokens = (int(v) for v in t.tolist())
        return stops > 0, total_samples, total_tokens

    def _tokens(self, y: Tensor) -> int:
        return y.numel() if self.task == "language_model" else 0

    def _quality_snapshot(self, metrics: MetricsExporter) -> tuple[dict[str, Tensor], float] | None:
        """The parameters before this step and the seconds the copy took, if the probe measures this step."""
        every = self.job.metrics.quality_every
        if self.quality is None or not metrics.enabled or (self.step + 1) % every:
            return None
        start = time.perf_counter()
        return self.quality.snapshot(), time.perf_counter() - start

    def _measure_quality(
        self, metrics: MetricsExporter, snapshot: tuple[dict[str, Tensor], float] | None
    ) -> None:
        """γ of the step just taken (``ngd_quality_gamma``), if :meth:`_quality_snapshot` took a snapshot."""
        if snapshot is None or self.quality is None:
            return
        before, seconds = snapshot
        start = time.perf_counter()
        self.last_gamma = self.quality.measure(before).gamma
        metrics.observe_quality(gamma=self.last_gamma, seconds=seconds + time.perf_counter() - start)

    def _exporter(self) -> MetricsExporter:
        """This rank's Prometheus exporter (disabled when metrics are off or the port is 0)."""
        spec = self.job.metrics
        port = spec.port if spec.enabled else 0
        try:
            return MetricsExporter(
                rank=self.env.rank,
                world_size=self.env.world_size,
                host=spec.host,
                port=port,
                local_rank=self.env.local_rank,
                stall_seconds=spec.stall_seconds,
            )
        except MetricsPortError as exc:
            raise JobError(f"metrics.port: {exc}") from exc

    def _observe(
        self,
        metrics: MetricsExporter,
        x: Tensor,
        y: Tensor,
        loss: float,
        seconds: float,
        before: dict[str, float],
    ) -> None:
        """Report one step: throughput, loss, and the preconditioner's phases and counters."""
        if not metrics.enabled:
            return
        phases: dict[str, float] = {}
        if self.precond is not None:
            phases = {k: v - before.get(k, 0.0) for k, v in self.precond.timings.items()}
            metrics.observe_preconditioner(self.precond)
        for phase, spent in self.clock.take().items():
            phases[phase] = phases.get(phase, 0.0) + spent
        # the statistics are computed in hooks inside forward and backward: count them once
        inside = phases.get("factor_computation", 0.0)
        for phase in ("backward", "forward"):
            taken = min(inside, phases.get(phase, 0.0))
            if phase in phases:
                phases[phase] -= taken
            inside -= taken
        tokens = self._tokens(y)
        metrics.observe_step(
            step=self.step,
            samples=x.shape[0],
            tokens=tokens,
            seconds=seconds,
            loss=loss,
            grad_norm=self._grad_norm(),
            phases=phases,
        )

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

    def run(self) -> TrainResult:
        """Train to ``train.steps`` (or until preempted); checkpoint as configured."""
        job = self.job
        resumed = self.resume()
        if resumed is not None:
            log.info("resumed from step %d", resumed)
        batches = self.loader.forever()
        metrics = self._exporter()
        bar = _Progress(job.train.steps, self.step, enabled=self.env.rank == 0)
        first = last = math.nan
        preempted = False
        start, start_step = time.perf_counter(), self.step
        every = job.checkpoint.every
        with metrics, PreemptionHandler() as preempt:
            while self.step < job.train.steps:
                x, y = next(batches)
                before = dict(self.precond.timings) if self.precond is not None and metrics.enabled else {}
                snapshot = self._quality_snapshot(metrics)
                step_start = time.perf_counter()
                loss = self.train_step(x, y)
                seconds = time.perf_counter() - step_start
                self._observe(metrics, x, y, loss, seconds, before)
                self._measure_quality(metrics, snapshot)
                first = loss if math.isnan(first) else first
                last = loss
                log_now = self.step % job.train.log_every == 0 or self.step == job.train.steps
                if log_now:
                    mean = self._mean_over_ranks(loss)
                    rate = (
                        (self.step - start_step) * self.global_batch / max(time.perf_counter() - start, 1e-9)
                    )
                    bar.update_to(self.step, loss=mean, rate=rate, gamma=self.last_gamma)
                    if self.env.rank != 0:
                        log.debug("step %d loss %.4f", self.step, loss)
                stop, job_samples, job_tokens = self._stop_requested(
                    preempt.requested, x.shape[0], self._tokens(y)
                )
                metrics.observe_job(samples=job_samples, tokens=job_tokens, seconds=seconds)
                if (every and self.step % every == 0) or stop:
                    self.save()
                    metrics.mark_checkpoint()
                if stop:
                    preempted = True
                    log.warning(
                        "stopping at step %d (%s); checkpoint saved",
                        self.step,
                        preempt.signal_name or "signal",
                    )
                    break
        bar.close()
        seconds = time.perf_counter() - start
        samples = (self.step - start_step) * self.global_batch
        return TrainResult(
            steps=self.step,
            first_loss=self._mean_over_ranks(first),
            last_loss=self._mean_over_ranks(last),
            seconds=seconds,
            samples_per_second=samples / max(seconds, 1e-9),
            resumed_from=resumed,
            preempted=preempted,
        )


class _Progress:
    """tqdm on rank 0 (to stderr), nothing elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update_to(self, step: int, *, loss: float, rate: float, gamma: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            extra = {"gamma": f"{gamma:.3g}"} if gamma is not None else {}
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.0f}", **extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def configure_logging(rank: int) -> None:
    """Rank-prefixed log lines on stderr (rank 0 logs INFO, the others WARNING and above)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    root = logging.getLogger("ngd_dist")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def run_job(job: Job, *, job_dir: Path | None = None, deepspeed: bool = False) -> TrainResult:
    """Set up the distributed environment, train ``job``, print the summary on rank 0.

    ``deepspeed``: train through DeepSpeed's engine (the workers were started by its launcher).
    """
    env = setup(job.distributed.backend, job.distributed.timeout_s)
    configure_logging(env.rank)
    worker: Worker | None = None
    try:
        torch.manual_seed(job.seed + env.rank)
        try:
            worker = Worker(job, env, job_dir=job_dir, deepspeed=deepspeed)
        except ValueError as exc:  # the job names something that cannot be built: one line, exit 2
            raise JobError(str(exc)) from exc
        result = worker.run()
        if env.rank == 0 and math.isnan(result.first_loss):
            print(f"done: nothing to do, checkpoint at step {result.steps} of {job.train.steps}", flush=True)
        elif env.rank == 0:
            print(
                f"done: steps={result.steps} loss {result.first_loss:.4f} -> {result.last_loss:.4f} "
                f"wall={result.seconds:.1f}s samples/s={result.samples_per_second:.0f} ranks={env.world_size}"
                + (f" resumed_from={result.resumed_from}" if result.resumed_from is not None else "")
                + (" preempted" if result.preempted else ""),
                flush=True,
            )
            if worker.precond is not None:
                s = worker.precond.stats
                log.info(
                    "preconditioner: %d refreshes, %d decompositions on rank 0, %d rejected, kl_scale %.3f",
                    s.factor_refreshes,
                    s.decompositions,
                    s.nonfinite_rejected,
                    s.kl_scale,
                )
        return result
    finally:
        # DDP and the preconditioner hold the process group: release them before destroying it
        del worker
        gc.collect()
        teardown()

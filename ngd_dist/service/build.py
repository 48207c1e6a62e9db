"""From a job to the parts one rank trains with: model, data, optimizer, schedule, preconditioner.

:func:`build` makes them in a fixed order (the model first, from the job seed, so every rank holds
the same weights); the training loop (:mod:`ngd_dist.service.trainer`) only uses them. The one
:class:`~ngd_dist.kfac.timing.PhaseClock` of the parts times the loop's phases and is handed to
the preconditioner, which times its own on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.preconditioner import KFACPreconditioner
from ngd_dist.kfac.quality import QualityProbe
from ngd_dist.kfac.timing import PhaseClock
from ngd_dist.service.catalog import Task, build_data, build_model, output_module_of, task_of
from ngd_dist.service.checkpoint import CheckpointError, CheckpointStore
from ngd_dist.service.data.loading import ShardedLoader, TensorPairs, collate, is_map_style
from ngd_dist.service.environment import Environment
from ngd_dist.service.evaluate import holdout_split
from ngd_dist.service.jobs import Job, JobError
from ngd_dist.service.optim import build_optimizer

if TYPE_CHECKING:
    from ngd_dist.service.deepspeed_engine import DeepSpeedEngine


@dataclass(frozen=True, kw_only=True)
class Parts:
    """Everything one rank of a job trains with."""

    base_model: nn.Module
    model: nn.Module
    """What the forward pass calls: ``base_model`` wrapped in DDP on several ranks, else itself."""
    task: Task
    global_batch: int
    """Samples per optimizer step over all ranks."""
    loader: ShardedLoader
    """This rank's shard of the data (a torch DataLoader over the job's Dataset),
    ``batch.per_rank x batch.accumulation`` rows per step."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    engine: DeepSpeedEngine | None
    """DeepSpeed's engine around model and optimizer (``--launcher deepspeed``), else None."""
    precond: KFACPreconditioner | None
    store: CheckpointStore | None
    """This rank's checkpoints (None without ``checkpoint.dir``)."""
    quality: QualityProbe | None
    """The update-quality probe of ``metrics.quality_every`` (None when off)."""
    clock: PhaseClock
    """Phase times of every step (``ngd_phase_seconds``), shared by the loop and the preconditioner."""
    held_out: Dataset[Any] | None = None
    """The items held out to evaluate on (``data.holdout`` with ``train.eval_every`` > 0), else None."""



def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What waits for ``device``'s queued work (``metrics.synchronize_phases``), or None on the CPU."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)

def build(job: Job, env: Environment, *, job_dir: Path | None = None, deepspeed: bool = False) -> Parts:
    """The parts of ``job`` on ``env``; user factories are imported from ``job_dir`` too.

    ``deepspeed``: wrap model and optimizer in a DeepSpeed engine instead of DDP.
    """
    paths = (str(job_dir),) if job_dir is not None else ()
    global_batch = job.batch.check_world(env.world_size)
    store = _checkpoint_store(job, env)  # first: a directory it cannot write stops the job before any work
    built = build_model(job.model.name, job.model.args, seed=job.seed, import_paths=paths)
    task = task_of(job.model.name, built)
    base_model = built.to(env.device)
    model = base_model
    if env.distributed and not deepspeed:
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        model = DistributedDataParallel(base_model, device_ids=device_ids)
    dataset = build_data(job.data.name, job.data.args, seed=job.seed, import_paths=paths)
    held_out = None
    if job.train.eval_every > 0 and job.data.holdout > 0:
        dataset, held_out = holdout_split(dataset, job.data.holdout, job.seed)
    loader = ShardedLoader(
        dataset,
        rank=env.rank,
        world_size=env.world_size,
        batch_size=job.batch.per_rank * job.batch.accumulation,
        seed=job.seed,
        device=env.device,
        num_workers=job.data.num_workers,
        pin_memory=job.data.pin_memory and env.device.type == "cuda",
        prefetch_factor=job.data.prefetch_factor,
    )
    clock = PhaseClock(sync=device_sync(env.device) if job.metrics.synchronize_phases else None)
    quality = _quality_probe(job, env, base_model, task, dataset)
    optimizer = build_optimizer(job.optimizer, model)
    base_lr = job.optimizer.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: job.lr_at(step) / base_lr)
    scaler = torch.amp.GradScaler(env.device.type, enabled=job.precision.use_grad_scaler)
    engine: DeepSpeedEngine | None = None
    if deepspeed:
        from ngd_dist.service.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(job, base_model, optimizer)
    precond = None
    config = job.kfac_config()
    if config is not None:
        precond = KFACPreconditioner(
            model,
            with_logits_module(config, job.model.name, base_model, wrapped=model is not base_model),
            optimizer=optimizer if engine is None else engine.learning_rates,
            grad_scaler=scaler,
            clock=clock,
        )
    return Parts(
        base_model=base_model,
        model=model,
        task=task,
        global_batch=global_batch,
        loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        engine=engine,
        precond=precond,
        store=store,
        quality=quality,
        clock=clock,
        held_out=held_out,
    )


def _checkpoint_store(job: Job, env: Environment) -> CheckpointStore | None:
    """This rank's checkpoint store (None without ``checkpoint.dir``), its directory created if missing
    and checked writable now: JobError naming ``checkpoint.dir`` otherwise, not a failed save later.
    """
    if not job.checkpoint.dir:
        return None
    try:
        store = CheckpointStore(
            job.checkpoint.dir, keep=job.checkpoint.keep, rank=env.rank, world_size=env.world_size
        )
        store.check_writable()
    except CheckpointError as exc:
        raise JobError.invalid(
            "checkpoint.dir", job.checkpoint.dir, f"a directory this process can create and write to ({exc})"
        ) from exc
    return store


def _quality_probe(
    job: Job, env: Environment, model: nn.Module, task: Task, dataset: torch.utils.data.Dataset[Any]
) -> QualityProbe | None:
    """The probe ``metrics.quality_every`` asks for: a fixed draw from this rank's data (None when off).

    In-memory data: ``metrics.quality_probe`` rows drawn by a permutation seeded per rank; another
    map-style Dataset: the same draw of indices, its items collated; an iterable one: its first
    items. The probe calls ``model(x)`` on ``(x, y)`` batches: dict batches are refused (JobError
    naming ``metrics.quality_every``).
    """
    spec = job.metrics
    if not (spec.enabled and spec.port and spec.quality_every > 0):
        return None
    seed = job.seed * 7919 + env.rank
    if isinstance(dataset, TensorPairs):
        x, y, size = dataset.inputs, dataset.targets, spec.quality_probe
        return QualityProbe.draw(model, x, y, size=size, seed=seed, loss=task, device=env.device)
    if is_map_style(dataset):
        count = len(dataset)  # type: ignore[arg-type]
        rows = torch.randperm(count, generator=torch.Generator().manual_seed(seed % 2**63))
        items = [dataset[int(i)] for i in rows[: min(spec.quality_probe, count)]]
    else:
        items = list(islice(iter(dataset), spec.quality_probe))
    if not items:
        raise JobError.invalid("data.name", job.data.name, "a dataset with at least one item")
    batch = collate(items)
    if isinstance(batch, dict):
        raise JobError.invalid(
            "metrics.quality_every",
            spec.quality_every,
            "0 with dict batches: the update-quality probe calls model(x) on (inputs, targets) batches",
        )
    x, y = batch
    return QualityProbe(model, x.to(env.device), y.to(env.device), loss=task)


def with_logits_module(config: KFACConfig, model_name: str, model: nn.Module, *, wrapped: bool) -> KFACConfig:
    """``config`` with ``output_module`` naming the logits module as the preconditioner sees it.

    The config's own name, else the catalogue's for ``model_name`` (built as ``model``); prefixed
    with ``module.`` when the model is ``wrapped`` in DDP. A new config: ``config`` is left as
    validated. JobError when no name is known and the curvature needs the logits.
    """
    name = config.output_module if config.output_module is not None else output_module_of(model_name, model)
    if name is not None:
        return dataclasses.replace(config, output_module=f"module.{name}" if wrapped else name)
    if config.curvature.needs_logits:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = f" (its last Linear is {linears[-1]!r})" if linears else ""
        raise JobError.invalid(
            "preconditioner.output_module",
            None,
            f"the name of the module producing the logits of {model_name!r}{hint}: "
            f"curvature {config.curvature!r} needs them",
        )
    return config

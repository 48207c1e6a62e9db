"""The training worker behind ``ngd-dist train``: one rank of a YAML-described job.

:func:`~ngd_dist.service.build.build` makes the rank's parts (model, data shard, optimizer with
its LR schedule, K-FAC preconditioner, ...); the :class:`Worker` resumes from the newest checkpoint
valid on every rank (``checkpoint.resume: auto``) and trains: forward/backward under the job's
precision, preconditioning, optimizer step, a progress bar on rank 0 and rank-prefixed logs
elsewhere, per-step metrics (:class:`~ngd_dist.service.metrics.report.StepReport`), checkpoints
every ``checkpoint.every`` steps, at the last step and when SIGTERM/SIGINT asks to stop. A resumed
run follows the same loss curve as an uninterrupted one: model, optimizer, preconditioner, schedule,
data position and RNG states are all restored.

A batch is ``(x, y)`` (``model(x)`` against ``y``) or a dict of tensors with ``labels``
(``model(**batch_without_labels)``; a causal LM's logits ``[:, :-1]`` predict ``labels[:, 1:]``); an
output with ``.logits`` (a ``transformers`` ModelOutput) gives those, and labels equal to -100 carry
no loss and count as no tokens (docs/data.md).

A step whose loss (on any rank) or gradients hold NaN or inf is skipped on every rank: no optimizer,
preconditioner or schedule step, and it does not count towards ``train.steps`` (the run takes
another batch). The flags travel in the one small all-reduce every step already makes (with the
stop request and the sample counts). ``train.max_bad_steps`` skipped steps in a row end the job
(:class:`TrainingDiverged`), and so does a state with a non-finite value at a save: no checkpoint
ever holds one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ngd_dist.kfac.finite import finite_flag
from ngd_dist.service.build import build
from ngd_dist.service.checkpoint import (
    CheckpointError,
    CheckpointStore,
    PreemptionHandler,
    capture_rng_state,
    restore_rng_state,
    worker_preemption,
)
from ngd_dist.service.data.loading import (
    IGNORE_INDEX,
    Batch,
    DataError,
    batch_labels,
    batch_rows,
    chunk_batch,
)
from ngd_dist.service.environment import Environment, setup, teardown
from ngd_dist.service.evaluate import Evaluation, evaluate, model_logits, rows_and_targets
from ngd_dist.service.jobs import Job, JobError, job_to_dict, job_to_yaml
from ngd_dist.service.jobs.errors import clip
from ngd_dist.service.metrics.exporter import NONFINITE_GRADIENT, NONFINITE_LOSS
from ngd_dist.service.metrics.report import StepReport, open_exporter
from ngd_dist.service.progress import Progress, configure_logging
from ngd_dist.service.records import RunRecord
from ngd_dist.service.resume import check_files, job_changes, refusal, resume_error, resume_source

log = logging.getLogger("ngd_dist.service")


class TrainingDiverged(RuntimeError):
    """The run cannot go on: ``train.max_bad_steps`` steps in a row were skipped, or the state to
    checkpoint holds NaN or inf. One line; ``ngd-dist train`` exits with ``ExitCode.DIVERGED``.
    """


@dataclass(kw_only=True)
class TrainResult:
    """What a finished (or preempted) run reports."""

    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    applied: int = 0
    """Optimizer steps taken in this run (0: none, whether nothing was left to do or all were skipped)."""
    first_loss: float
    """Mean over the ranks of the loss of this run's first applied step (NaN when none was applied)."""
    last_loss: float
    """The same for the last applied step."""
    seconds: float
    samples_per_second: float
    """Samples of every step this run processed, skipped ones included, per second."""
    resumed_from: int | None
    preempted: bool
    skipped: dict[str, int] = field(default_factory=dict)
    """Steps skipped in this run, by reason (``nonfinite_loss``, ``nonfinite_gradient``)."""
    evaluation: Evaluation | None = None
    """The evaluation at the end of the run (``train.eval_every`` > 0), else None."""


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What one call of :meth:`Worker.train_step` did: the same on every rank, but ``loss``."""

    loss: float
    """This rank's loss, averaged over its micro-batches."""
    skipped: str | None
    """Why every rank skipped the step (``nonfinite_loss`` or ``nonfinite_gradient``); None when applied."""
    why: str
    """What was not finite, and on how many ranks ("" when applied)."""
    stop: bool
    """Whether any rank was asked to stop (SIGTERM/SIGINT)."""
    samples: int
    """Samples of the step over all ranks."""
    tokens: int
    """Tokens of the step over all ranks (0 unless a language model)."""


def nonfinite_entry(state: object, path: str = "") -> str | None:
    """The path (``optimizer.state.0.exp_avg_sq``) of the first float tensor or float of ``state``
    (nested mappings, lists and tuples) that holds NaN or inf; None when every one is finite.
    """
    if isinstance(state, torch.Tensor):
        finite = not (state.is_floating_point() or state.is_complex()) or bool(torch.isfinite(state).all())
        return None if finite else path
    if isinstance(state, float):
        return None if math.isfinite(state) else path
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, item in items:
        found = nonfinite_entry(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def summary_line(result: TrainResult, *, total: int, ranks: int) -> str:
    """Rank 0's last line of a run that ended without error; ``total`` is ``train.steps``.

    True whatever happened: "nothing to do" only when the run had no step left to take, and a run
    that applied no step (all skipped, then preempted) says so instead of showing a loss.
    """
    skipped = sum(result.skipped.values())
    if result.applied == 0 and skipped == 0 and not result.preempted:
        return f"done: nothing to do, checkpoint at step {result.steps} of {total}"
    reasons = ", ".join(f"{reason}={n}" for reason, n in result.skipped.items())
    if result.applied == 0:
        head = f"done: steps={result.steps} of {total}, no step applied in this run"
    else:
        head = f"done: steps={result.steps} loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
    return (
        f"{head} wall={result.seconds:.1f}s samples/s={result.samples_per_second:.0f} ranks={ranks} "
        f"skipped={skipped}"
        + (f" ({reasons})" if reasons else "")
        + (f" resumed_from={result.resumed_from}" if result.resumed_from is not None else "")
        + (" preempted" if result.preempted else "")
        + (f" {result.evaluation.text()}" if result.evaluation is not None else "")
    )


class Worker:
    """One rank of a job: its parts, the training loop, and its checkpoints."""

    def __init__(
        self, job: Job, env: Environment, *, job_dir: Path | None = None, deepspeed: bool = False
    ) -> None:
        """Build the parts of ``job`` on ``env`` (:func:`~ngd_dist.service.build.build`).

        ``deepspeed``: step through a DeepSpeed engine (:mod:`ngd_dist.service.deepspeed_engine`)
        instead of DDP and the optimizer alone.
        """
        self.job, self.env = job, env
        self.parts = build(job, env, job_dir=job_dir, deepspeed=deepspeed)
        parts = self.parts
        self.report = StepReport(
            clock=parts.clock,
            model=parts.model,
            precond=parts.precond,
            quality=parts.quality,
            quality_every=job.metrics.quality_every,
        )
        """What each step reports to the metrics exporter."""
        self.step = 0

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly."""
        p = self.parts
        return {
            "step": self.step,
            "model": p.base_model.state_dict(),
            "optimizer": p.optimizer.state_dict() if p.engine is None else p.engine.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict(),
            "preconditioner": p.precond.state_dict() if p.precond is not None else {},
            "loader": p.loader.state_dict(),
            "rng": capture_rng_state(),
            "job": job_to_dict(self.job),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`'s output."""
        p = self.parts
        p.base_model.load_state_dict(state["model"])
        if p.engine is not None:
            p.engine.load_state_dict(state["optimizer"])
        elif "masters" in state["optimizer"]:
            raise JobError(
                "checkpoint.resume: the checkpoint was written under --launcher deepspeed; "
                "resume it with that launcher, or set checkpoint.resume=never"
            )
        else:
            p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        p.scaler.load_state_dict(state["scaler"])
        if p.precond is not None and state["preconditioner"]:
            p.precond.load_state_dict(state["preconditioner"])
        p.loader.load_state_dict(state["loader"])
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
        """Load the checkpoint ``checkpoint.resume`` names (:mod:`ngd_dist.service.resume`); return
        its step, or None when the run starts afresh.

        Every rank loads its own rank's file of one step: the newest that loads on every rank for
        ``auto`` and a directory (a collective), else the step named. The file names are checked
        first (:func:`~ngd_dist.service.resume.check_files`: missing, another world size), then the
        job the checkpoint recorded is compared with this one
        (:func:`~ngd_dist.service.resume.job_changes`), and only then is the state restored. Each
        problem is a JobError naming ``checkpoint.resume`` (one line, exit 2), raised at once on the
        rank that finds it; when only one rank's file is bad the others stop as their next
        collective finds that rank gone.
        """
        source = resume_source(self.job.checkpoint)
        if source is None:
            return None
        env = self.env
        check_files(source, env.world_size)
        if not source.directory.is_dir():  # auto before checkpoint.dir exists: nothing to resume
            return None
        store = self.parts.store
        if store is None or store.directory != source.directory:  # only read from: nothing is written
            store = CheckpointStore(source.directory, rank=env.rank, world_size=env.world_size)
        try:
            if source.step is None:
                found = store.latest_agreed(self._all_reduce_min)
                if found is None and source.explicit:
                    raise resume_error(
                        f"no step in {source.directory} loads on every rank of {env.world_size} (the "
                        "warnings above say why)"
                    )
                if found is None:
                    return None
                step, state = found
            else:
                step, state = source.step, store.load(store.path_for(source.step))
        except CheckpointError as exc:
            raise resume_error(str(exc)) from exc
        recorded = state.get("job")
        if isinstance(recorded, Mapping):
            changes = job_changes(recorded, self.job)
            if changes:
                raise refusal(step, source.directory, changes)
        else:
            log.warning("checkpoint: step %d records no job, so it is not compared with this one", step)
        try:
            self.load(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # what the job check cannot see
            if isinstance(exc, JobError):
                raise
            why = clip(" ".join(str(exc).split()) or type(exc).__name__, 300)
            where = f"the checkpoint at step {step} in {source.directory}"
            raise resume_error(f"{where} does not fit this job: {why}") from exc
        return step

    def save(self) -> None:
        """Write this rank's checkpoint of the current step, then prune once every rank has.

        First every rank checks its state for NaN or inf (:func:`nonfinite_entry`); when any rank's
        state holds one, no rank writes anything and each raises :class:`TrainingDiverged`, naming
        its own entry: a checkpoint never holds a non-finite value, and the previous one stays the
        newest.
        """
        store = self.parts.store
        if store is None:
            return
        state = self.state()
        bad = nonfinite_entry(state)
        if self._all_reduce_min(int(bad is None)) == 0:
            what = f"{bad} holds NaN or inf" if bad is not None else "another rank's state holds NaN or inf"
            raise TrainingDiverged(
                f"checkpoint: step {self.step} not saved: {what} (a non-finite value); the run has "
                "diverged: gradients too large for float32, a learning rate too high or non-finite "
                "inputs; the previous checkpoint is kept"
            )
        store.save(self.step, state, prune=False)
        self._all_reduce_min(1)  # every rank's file is complete before any prunes
        store.prune()

    # -- training ------------------------------------------------------------------------------

    def _loss(self, logits: Tensor, labels: Tensor, *, shift: bool = False) -> Tensor:
        """Mean cross-entropy of ``logits`` (``(..., classes)``) over the ``labels`` (``(...)``) that
        are not -100 (0 when none is); for a causal LM (``shift``) ``logits[:, :-1]`` predict
        ``labels[:, 1:]``.
        """
        flat, targets = rows_and_targets(logits, labels, shift=shift)
        try:
            total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        except IndexError as exc:  # a label outside [0, classes): bad data, not a bug (no per-step check)
            classes = flat.shape[-1]
            raise JobError(
                f"data: a label does not fit the model's {classes} outputs ({exc}); "
                f"expected labels in [0, {classes}) or -100 (ignored)",
                path="data",
            ) from exc
        return total / (targets != IGNORE_INDEX).sum().clamp_min(1)

    def _shifts(self, batch: Batch) -> bool:
        """Whether the batch's labels are the Hugging Face causal-LM kind: the input ids themselves,
        which the logits of the previous position predict (a dict batch of a language model).
        """
        return isinstance(batch, dict) and self.parts.task == "language_model"

    def _forward_loss(self, batch: Batch) -> Tensor:
        """The model's loss on one micro-batch: ``model(x)`` of ``(x, y)``, or ``model(**inputs)`` of a
        dict batch (every key but ``labels``); an output with ``.logits`` (a ModelOutput) gives those.
        """
        try:
            logits = model_logits(self.parts.model, batch)
        except TypeError as exc:
            raise JobError(
                f"model.name: {self.job.model.name!r} returned a {exc}; expected a "
                "tensor of logits or an output with a .logits tensor (a transformers ModelOutput)",
                path="model.name",
            ) from None
        return self._loss(logits, batch_labels(batch), shift=self._shifts(batch))

    def train_step(
        self, batch: Batch | Tensor, y: Tensor | None = None, *, stop: bool = False
    ) -> StepOutcome:
        """One optimizer step over ``batch.accumulation`` micro-batches of ``batch``, unless it is skipped.

        ``batch`` is ``(x, y)`` or a dict of tensors with ``labels`` (``train_step(x, y)`` works too).
        It is skipped on every rank when any rank's loss, or the gradients, hold NaN or inf (or the
        preconditioner finds them so after averaging): then no rank steps its optimizer,
        preconditioner or LR schedule, and ``self.step`` stays. ``stop`` (this rank was asked to
        stop) travels with the step's flags in its one all-reduce (:meth:`_agree`).
        """
        if y is not None:
            assert isinstance(batch, Tensor)
            batch = (batch, y)
        assert not isinstance(batch, Tensor), "train_step takes (x, y), a dict batch, or x and y"
        p = self.parts
        if p.engine is not None:
            if isinstance(batch, dict):
                raise JobError(
                    "data: dict batches (model(**inputs)) are not supported under --launcher deepspeed; "
                    "expected (inputs, targets) items, or launch with torchrun or mpirun",
                    path="data",
                )
            loss = p.engine.backward(batch[0], batch[1], self._loss, clock=p.clock)
        else:
            loss = self._backward(batch)
        outcome = self._agree(loss, stop=stop, samples=batch_rows(batch), tokens=self._tokens(batch))
        checked = p.engine is None  # DDP averaged the gradients that _agree found finite on every rank
        if outcome.skipped is None and p.precond is not None and not p.precond.step(checked_finite=checked):
            outcome = dataclasses.replace(
                outcome, skipped=NONFINITE_GRADIENT, why="non-finite gradients once averaged over the ranks"
            )
        elif outcome.skipped is not None and p.precond is not None:
            p.precond.discard_step()
        if outcome.skipped is not None:
            if p.engine is not None:
                p.engine.discard()
            p.scaler.update()  # after unscale_: an overflow lowers the loss scale (no-op when disabled)
            return outcome
        if p.engine is not None:
            # the preconditioner averaged the gradients: DeepSpeed need not again (ZeRO stage 0)
            p.engine.hand_over(clock=p.clock, averaged=p.precond is not None)
        else:
            with p.clock("optimizer"):
                p.scaler.step(p.optimizer)
                p.scaler.update()
        p.scheduler.step()
        self.step += 1
        return outcome

    def _backward(self, batch: Batch) -> float:
        """Forward and backward of every micro-batch (DDP averages the gradients over the ranks);
        the gradients unscaled in ``.grad``; returns this rank's mean loss.
        """
        job, p = self.job, self.parts
        chunks = job.batch.accumulation
        p.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        try:
            micro_batches = chunk_batch(batch, chunks)
        except DataError as exc:
            raise JobError(f"data: {exc}", path="data") from exc
        for i, micro in enumerate(micro_batches):
            sync = i == chunks - 1 or not isinstance(p.model, DistributedDataParallel)
            context = p.model.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
            with context:
                with p.clock("forward"), torch.autocast(
                    self.env.device.type, dtype=job.precision.torch_dtype, enabled=job.precision.autocast
                ):
                    loss = self._forward_loss(micro)
                with p.clock("backward"):
                    p.scaler.scale(loss).backward()
            total += float(loss.detach())
        if chunks > 1:  # each micro-batch's loss is a mean over its own rows: average them
            for param in p.model.parameters():
                if param.grad is not None:
                    param.grad.div_(chunks)
        p.scaler.unscale_(p.optimizer)
        return total / chunks

    def _agree(self, loss: float, *, stop: bool, samples: int, tokens: int) -> StepOutcome:
        """What every rank decides about the step: whether any rank's loss or gradients are not
        finite, whether any asks to stop, and the samples and tokens summed over the ranks.

        One all-reduce per step carries it all (a SUM: each flag adds up to the number of ranks that
        raised it); the gradient flag is computed on the device and read with the result, so the
        check adds no host sync of its own. With DDP (or the preconditioner's averaging) every rank
        holds the same gradients, so a NaN on one rank is in everyone's flag.
        """
        grads = [q.grad for q in self.parts.base_model.parameters() if q.grad is not None]
        device = self.env.device
        counts = torch.tensor([int(stop), samples, tokens, int(not math.isfinite(loss))], device=device)
        finite = finite_flag(grads)
        flags = torch.cat([counts, (~finite).to(device=device, dtype=counts.dtype).reshape(1)])
        if self.env.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        stops, total_samples, total_tokens, bad_loss, bad_grad = (int(v) for v in flags.tolist())
        ranks = self.env.world_size
        skipped, why = None, ""
        if bad_loss:
            skipped, why = NONFINITE_LOSS, f"non-finite loss on {bad_loss} of {ranks} rank(s)"
        elif bad_grad:
            skipped, why = NONFINITE_GRADIENT, f"non-finite gradients on {bad_grad} of {ranks} rank(s)"
        return StepOutcome(
            loss=loss, skipped=skipped, why=why, stop=stops > 0, samples=total_samples, tokens=total_tokens
        )

    def _mean_over_ranks(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM) / self.env.world_size

    def _tokens(self, batch: Batch) -> int:
        """Tokens that carry a loss in ``batch``: labels other than -100 (after the causal-LM shift
        of a dict batch); 0 unless the task is a language model.
        """
        if self.parts.task != "language_model":
            return 0
        labels = batch_labels(batch)
        if self._shifts(batch):
            labels = labels[:, 1:]
        return int((labels != IGNORE_INDEX).sum())

    def run(self, preemption: PreemptionHandler | None = None) -> TrainResult:
        """Train to ``train.steps`` applied steps (or until preempted); checkpoint as configured.

        Saves every ``checkpoint.every`` steps, at the last step, and when asked to stop. Raises
        :class:`TrainingDiverged` after ``train.max_bad_steps`` skipped steps in a row.
        ``preemption``: a handler the caller entered before the set-up (a signal then already counts);
        None: one entered for the loop alone.
        """
        job, report = self.job, self.report
        resumed = self.resume()
        if resumed is not None:
            log.info("resumed from step %d", resumed)
        batches = self.parts.loader.forever()
        metrics = open_exporter(job.metrics, self.env)  # first: a taken port stops the job in one line
        if self.parts.precond is not None:
            log.info("%s", self.parts.precond.summary())
        record = RunRecord(
            job.checkpoint.dir, enabled=self.env.rank == 0, tensorboard=job.metrics.tensorboard
        )
        record.start(job_to_yaml(job), resumed)
        bar = Progress(job.train.steps, self.step, enabled=self.env.rank == 0)
        first = last = math.nan
        preempted = False
        start, start_step = time.perf_counter(), self.step
        every, limit = job.checkpoint.every, job.train.max_bad_steps
        global_batch = self.parts.global_batch
        processed = 0
        skipped: Counter[str] = Counter()
        in_a_row = 0
        saved_at = resumed
        evaluation: Evaluation | None = None
        evaluated_at: int | None = None
        handler: contextlib.AbstractContextManager[PreemptionHandler] = (
            worker_preemption(signals_arrive_twice=self.parts.engine is not None)
            if preemption is None
            else contextlib.nullcontext(preemption)
        )
        with metrics, handler as preempt, contextlib.closing(bar), contextlib.closing(record):
            preempt.loop_started()
            while self.step < job.train.steps:
                try:
                    batch = next(batches)
                except DataError as exc:
                    raise JobError(f"data: {exc}", path="data") from exc
                snapshot = report.snapshot(metrics, self.step + 1)
                step_start = time.perf_counter()
                outcome = self.train_step(batch, stop=preempt.requested)
                seconds = time.perf_counter() - step_start
                processed += 1
                if outcome.skipped is not None:
                    skipped[outcome.skipped] += 1
                    in_a_row += 1
                    report.skipped(metrics, reason=outcome.skipped, loss=outcome.loss)
                    if self.env.rank == 0:
                        log.warning(
                            "step %d skipped: %s (%d in a row; train.max_bad_steps=%d)",
                            self.step + 1, outcome.why, in_a_row, limit,
                        )  # fmt: skip
                    if in_a_row >= limit:
                        raise TrainingDiverged(
                            f"train.max_bad_steps={limit}: {in_a_row} steps in a row skipped at step "
                            f"{self.step + 1} (the last: {outcome.why}); likely cause: non-finite inputs "
                            "(NaN/inf in the data) or a learning rate too high (the run diverged): check "
                            "the data or lower optimizer.lr, then resume from the last checkpoint"
                        )
                else:
                    in_a_row = 0
                    loss = outcome.loss
                    tokens = self._tokens(batch)
                    report.observe(
                        metrics, step=self.step, samples=batch_rows(batch), tokens=tokens, loss=loss,
                        seconds=seconds,
                    )
                    report.measure_quality(metrics, snapshot)
                    first = loss if self.step == start_step + 1 else first
                    last = loss
                    if self.step % job.train.log_every == 0 or self.step == job.train.steps:
                        mean = self._mean_over_ranks(loss)
                        rate = processed * global_batch / max(time.perf_counter() - start, 1e-9)
                        bar.update_to(self.step, loss=mean, rate=rate, gamma=report.last_gamma)
                        if self.env.rank != 0:
                            log.debug("step %d loss %.4f", self.step, loss)
                        wall = record.wall_offset + time.perf_counter() - start
                        record.write(self._record(mean, wall, report))
                    metrics.observe_job(samples=outcome.samples, tokens=outcome.tokens, seconds=seconds)
                due = (every and self.step % every == 0) or self.step == job.train.steps
                if (outcome.stop or (due and outcome.skipped is None)) and saved_at != self.step:
                    self.save()
                    saved_at = self.step
                    metrics.mark_checkpoint()
                eval_every = job.train.eval_every
                ends = self.step == job.train.steps
                if (
                    self.parts.held_out is not None
                    and not outcome.stop
                    and evaluated_at != self.step
                    and (ends or self.step % eval_every == 0)
                ):
                    with self.parts.clock("evaluation"):
                        evaluation = self.evaluate()
                    evaluated_at = self.step
                    metrics.observe_eval(evaluation)
                    if self.env.rank == 0:
                        log.info("step %d: %s", self.step, evaluation.text())
                    wall = record.wall_offset + time.perf_counter() - start
                    record.write({"event": "eval", "step": self.step, "wall_s": wall, **evaluation.fields()})
                if outcome.stop:
                    preempted = True
                    log.warning(
                        "stopping at step %d (%s); checkpoint saved",
                        self.step,
                        preempt.signal_name or "signal",
                    )
                    break
        seconds = time.perf_counter() - start
        return TrainResult(
            steps=self.step,
            applied=self.step - start_step,
            first_loss=self._mean_over_ranks(first),
            last_loss=self._mean_over_ranks(last),
            seconds=seconds,
            samples_per_second=processed * global_batch / max(seconds, 1e-9),
            resumed_from=resumed,
            preempted=preempted,
            skipped=dict(skipped),
            evaluation=evaluation if evaluated_at == self.step else None,
        )

    def evaluate(self) -> Evaluation:
        """Evaluate on the held-out data (``data.holdout``) over every rank; the same on each."""
        p, job = self.parts, self.job
        assert p.held_out is not None
        return evaluate(
            p.base_model,
            p.held_out,
            rank=self.env.rank,
            world_size=self.env.world_size,
            batch_size=job.batch.per_rank,
            device=self.env.device,
            language_model=p.task == "language_model",
            autocast_dtype=job.precision.torch_dtype if job.precision.autocast else None,
        )

    def _record(self, loss: float, wall: float, report: StepReport) -> dict[str, Any]:
        """One ``metrics.jsonl`` line for the step just logged (see :mod:`ngd_dist.service.records`)."""
        stats = self.parts.precond.stats if self.parts.precond is not None else None
        return {
            "step": self.step,
            "samples": self.step * self.parts.global_batch,
            "wall_s": wall,
            "loss": loss,
            "lr": float(self.parts.scheduler.get_last_lr()[0]),
            "damping": stats.damping if stats is not None else None,
            "kl_scale": stats.kl_scale if stats is not None else None,
            "gamma": report.last_gamma,
            "phases": dict(self.parts.clock.totals),
        }


def run_job(
    job: Job,
    *,
    job_dir: Path | None = None,
    deepspeed: bool = False,
    preemption: PreemptionHandler | None = None,
) -> TrainResult:
    """Set up the distributed environment, train ``job``, print the summary on rank 0.

    ``deepspeed``: train through DeepSpeed's engine (the workers were started by its launcher).
    ``preemption``: the caller's entered handler (see :meth:`Worker.run`).
    When training ends, every rank leaves the process group together (:func:`teardown`); when it
    raises, the process group is left as it is and the caller should exit the process at once.
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
        result = worker.run(preemption)
        if env.rank == 0:
            print(summary_line(result, total=job.train.steps, ranks=env.world_size), flush=True)
            if worker.parts.precond is not None:
                s = worker.parts.precond.stats
                log.info(
                    "preconditioner: %d refreshes, %d decompositions on rank 0, %d rejected, kl_scale %.3f",
                    s.factor_refreshes,
                    s.decompositions,
                    s.nonfinite_rejected,
                    s.kl_scale,
                )
    except BaseException:
        # No teardown on an error path: its barrier would wait for ranks that may be blocked in another
        # collective, until the collective timeout. The process group is left to the process's exit,
        # which `ngd-dist train` makes at once (ngd_dist.cli._worker_failed); the launcher stops the rest.
        raise
    # DDP and the preconditioner hold the process group: release them before destroying it
    del worker
    gc.collect()
    teardown()
    return result

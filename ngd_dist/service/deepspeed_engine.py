"""Training a job through DeepSpeed (``ngd-dist launch --launcher deepspeed``) with K-FAC active.

DeepSpeed's engine owns the optimizer step: bf16 weights with float32 master copies, ZeRO stage 1
(optimizer states partitioned over the ranks), its gradient averaging. The K-FAC preconditioner
needs each layer's whole, rank-averaged gradient *before* the optimizer sees it, but DeepSpeed's
optimizers take the gradients in hooks during ``engine.backward`` (``.grad`` is None afterwards:
they are already in DeepSpeed's buffers and partitions). So one step runs in three parts:

1. **Real gradient.** The forward pass runs on the bare module (``engine.module``, not the engine:
   the engine's forward registers hooks that would start its reduction on any backward) under the
   job's autocast; ``torch.autograd.grad(loss, params)`` returns the gradients without running the
   parameters' accumulation hooks, so DeepSpeed sees nothing yet. The preconditioner's statistics
   hooks are module and tensor hooks, which fire as in any backward. Micro-batches
   (``batch.accumulation``) are summed in float32 and averaged.
2. **Preconditioning**, exactly as without DeepSpeed: the gradients go into ``.grad``, and
   :meth:`KFACPreconditioner.step` averages them over the ranks (the bare module is not DDP),
   reduces the factors, decomposes what is due, preconditions and KL-clips.
3. **Hand-over.** ``.grad`` is cleared, and ``engine.backward`` runs on the surrogate
   ``sum((p - p.detach()) * u)``, whose value is 0 and whose gradient with respect to each ``p``
   is the preconditioned ``u``: DeepSpeed's hooks collect ``u`` into its buffers and partitions,
   its averaging turns identical values into themselves, and ``engine.step()`` applies them to the
   float32 masters and copies the result to the bf16 weights, all unchanged.

Between parts 1 and 2 the worker checks the step as it does without DeepSpeed (a non-finite loss on
any rank, or non-finite gradients: every rank skips it, :meth:`DeepSpeedEngine.discard` clears the
gradients and DeepSpeed sees nothing of that step); the preconditioner's ``step()`` returning False
(gradients that overflow when averaged) skips it too.

DeepSpeed therefore sees one backward per optimizer step: its ``gradient_accumulation_steps`` is
1 (it would otherwise divide the surrogate by the accumulation count and step only every that many
calls) and its micro-batch is ``batch.per_rank x batch.accumulation``. The gradients cross the
network once per step at ZeRO stage 0: the preconditioner's average is the only one, and the
surrogate backward runs under ``engine.no_sync()`` (its values are already the same on every
rank), so the cost over plain K-FAC is the surrogate backward (one multiply per parameter). Under
ZeRO-1 DeepSpeed reduces the already averaged gradients once more, into each rank's partition of
the optimizer: that is how its optimizer receives them. (Preconditioning the local gradients and
letting DeepSpeed average them instead would be exact for the update, which is linear in the
gradient, but not for the KL clip, which needs ``<P g, g>`` of the *averaged* gradient ``g``, and
under ZeRO-1 no rank holds all of the averaged update to compute it from.) Without the
preconditioner (``preconditioner.enabled: false``) DeepSpeed's all-reduce is the only one.

What is supported, and why the rest is not:

- ZeRO stage 0 and 1, in float32 or with ``deepspeed.bf16`` (then ``precision.dtype: bfloat16``).
  Stage 2 only with the preconditioner off (it partitions the gradients; the schema says so).
- Stage 3 is refused: it partitions the parameters themselves, which the bare-module forward,
  the preconditioner's layers and the per-rank checkpoints all need whole.
- float16 (GradScaler) is refused: DeepSpeed would own the loss scale; use bf16.
- LARS and LAMB are refused with ZeRO >= 1: ZeRO gives the optimizer one flat partition of all
  parameters per rank, and their layer-wise trust ratios need each parameter whole (stage 0 keeps
  one float32 master per parameter, so they work there).
- ``metrics.quality_every`` works with ``deepspeed.bf16``: the probe widens the bf16 weights and
  their step to float32 before it evaluates γ.
- Dict batches (``model(**inputs)``: the Hugging Face models, ``data.args.format: dict``) are
  refused in one line: the engine's step takes ``(inputs, targets)`` batches. :func:`check_job`
  refuses the built-ins that give them before launch; a user Dataset with dict items is refused at
  its first batch.
- Checkpoints are the worker's usual per-rank files: the module's weights, and under ``optimizer``
  this rank's float32 masters and its optimizer state (a partition of them under ZeRO-1), so a run
  resumes only with the same world size, ZeRO stage and bf16 setting (a mismatch is one line).
  DeepSpeed's own checkpoint format is not used.

Each worker compiles DeepSpeed's CPU communication op (``deepspeed_shm_comm``) on first use, under
a lock in the torch extensions cache: :func:`ensure_extensions_dir` points ``TORCH_EXTENSIONS_DIR``
at ``.cache/torch_extensions`` of the working directory when it is not set, so the build is
shared by this project's runs and never waits on another project's lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ngd_dist.kfac.timing import PhaseClock
from ngd_dist.service.jobs import Job, JobError

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
"""Where torch (and DeepSpeed) build and cache JIT-compiled extensions."""

_PRINT_NEVER = 2**31 - 1
LAYERWISE = ("lars", "lamb")
"""Optimizers whose step depends on each parameter's shape and norm (not element-wise)."""


def default_extensions_dir() -> Path:
    """``.cache/torch_extensions`` under the working directory (the project's checkout)."""
    return Path.cwd() / ".cache" / "torch_extensions"


def ensure_extensions_dir(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to :func:`default_extensions_dir` unless it is set; return it."""
    env = os.environ if environ is None else environ
    if not env.get(EXTENSIONS_ENV):
        env[EXTENSIONS_ENV] = str(default_extensions_dir())
    return env[EXTENSIONS_ENV]


def check_job(job: Job) -> None:
    """Raise JobError (one line naming the key) for what a job cannot do under DeepSpeed."""
    if job.deepspeed.zero_stage == 3:
        raise JobError.invalid(
            "deepspeed.zero_stage",
            3,
            "0, 1 or 2 under the ngd_dist worker: ZeRO stage 3 partitions the parameters themselves, "
            "and the worker's forward pass, preconditioner and checkpoints need them whole",
        )
    if job.deepspeed.zero_stage >= 1 and job.optimizer.name in LAYERWISE:
        raise JobError.invalid(
            "optimizer.name",
            job.optimizer.name,
            f"sgd or adamw with deepspeed.zero_stage={job.deepspeed.zero_stage}: ZeRO hands the optimizer "
            "one flat partition of all parameters per rank, so the layer-wise trust ratio of lars/lamb "
            "would be computed over that (use zero_stage 0)",
        )
    if job.model.name in ("hf_causal_lm", "hf_sequence_classification"):
        raise JobError.invalid(
            "model.name",
            job.model.name,
            "a model taking (inputs, targets) batches under --launcher deepspeed: the Hugging Face "
            "models take dict batches, which the DeepSpeed step does not support (launch with torchrun)",
        )
    if job.data.args.get("format") == "dict":
        raise JobError.invalid(
            "data.args.format",
            "dict",
            "pairs under --launcher deepspeed: the DeepSpeed step takes (inputs, targets) batches, not "
            "dicts (launch with torchrun)",
        )
    if job.precision.use_grad_scaler:
        raise JobError.invalid(
            "precision.dtype" if job.precision.dtype == "float16" else "precision.grad_scaler",
            job.precision.dtype if job.precision.dtype == "float16" else job.precision.grad_scaler,
            "bfloat16 (with deepspeed.bf16) or float32 under --launcher deepspeed: a GradScaler "
            "(float16) cannot scale the loss of DeepSpeed's engine",
        )


def deepspeed_config(job: Job) -> dict[str, Any]:
    """The DeepSpeed config dict of ``job`` (see the module docstring for the batch sizes)."""
    return {
        "train_micro_batch_size_per_gpu": job.batch.per_rank * job.batch.accumulation,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": job.deepspeed.bf16},
        "zero_optimization": {"stage": job.deepspeed.zero_stage},
        # ZeRO with an optimizer DeepSpeed has not tested (ours: SGD, AdamW, LARS, LAMB)
        "zero_allow_untested_optimizer": True,
        # the job has no gradient clipping; K-FAC's KL clip already bounds the update
        "gradient_clipping": 0.0,
        "steps_per_print": _PRINT_NEVER,
        "wall_clock_breakdown": False,
    }


class LearningRates:
    """The model's parameters grouped as the optimizer groups them, with each group's current lr.

    What :class:`KFACPreconditioner` reads of an optimizer (for the KL clip). Under DeepSpeed the
    client optimizer's groups hold DeepSpeed's float32 masters (flat partitions under ZeRO-1), not
    the model's parameters, so the preconditioner is given this view instead.
    """

    def __init__(self, groups: list[list[nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
        """``groups[i]``: the model parameters of the optimizer's group ``i``."""
        self._groups = groups
        self._optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """``[{"params": [...], "lr": ...}, ...]``, the learning rates read from the optimizer now."""
        return [
            {"params": params, "lr": group["lr"]}
            for params, group in zip(self._groups, self._optimizer.param_groups, strict=True)
        ]


def _sizes(tensors: list[Tensor]) -> str:
    """``"3 tensors of 1234 values"``: what a rank's optimizer masters look like, in short."""
    return f"{len(tensors)} tensor(s) of {sum(t.numel() for t in tensors)} values"


def _quiet_deepspeed_logs() -> None:
    """DeepSpeed logs its whole config at INFO on every rank: keep its warnings only."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class DeepSpeedEngine:
    """One rank's DeepSpeed engine around the worker's model and optimizer, stepping as described above."""

    def __init__(self, job: Job, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``model`` and ``optimizer`` with ``deepspeed.initialize`` (casts the model to bf16 if asked).

        torch.distributed must already be initialised (the worker's environment does it under
        DeepSpeed's launcher); DeepSpeed uses that process group.
        """
        check_job(job)
        if not dist.is_initialized():
            raise JobError(
                "--deepspeed: no torch.distributed process group; start the workers with "
                "`ngd-dist launch CONFIG --launcher deepspeed --nproc N`"
            )
        ensure_extensions_dir()
        import deepspeed

        _quiet_deepspeed_logs()
        self.job = job
        self.optimizer = optimizer
        groups = list(optimizer.param_groups)
        self._model_groups: list[list[nn.Parameter]] = [list(g["params"]) for g in groups]
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(job), dist_init_required=False
        )
        if any(a is not b for a, b in zip(groups, optimizer.param_groups, strict=True)):
            raise RuntimeError("DeepSpeed replaced the optimizer's param groups (the LR schedule sets them)")
        self.module: nn.Module = self.engine.module
        self.params = [p for group in self._model_groups for p in group]
        self.learning_rates = LearningRates(self._model_groups, optimizer)
        """What the preconditioner reads for the KL clip (the model's parameters and their lr)."""

    # -- one step ------------------------------------------------------------------------------

    def backward(
        self,
        x: Tensor,
        y: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        clock: PhaseClock | None = None,
    ) -> float:
        """Part 1: this rank's gradient of ``batch.accumulation`` micro-batches of ``(x, y)`` into
        each parameter's ``.grad`` (not yet averaged over the ranks); returns the mean loss.

        Then either the preconditioner's ``step()`` and :meth:`hand_over`, or :meth:`discard` to
        skip the step. ``clock`` gets the forward and backward times (when it is the
        preconditioner's clock too, the statistics its hooks compute count only as theirs).
        """
        clock = clock if clock is not None else PhaseClock()
        job = self.job
        chunks = job.batch.accumulation
        sums: list[Tensor | None] = [None] * len(self.params)
        total = 0.0
        device = x.device.type
        for xm, ym in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            with clock("forward"):
                with torch.autocast(device, dtype=job.precision.torch_dtype, enabled=job.precision.autocast):
                    logits = self.module(xm)
                loss = loss_fn(logits, ym)
            with clock("backward"):
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    s = sums[i]
                    sums[i] = g.float() if s is None else s.add_(g)
            total += float(loss.detach())
        for p, s in zip(self.params, sums, strict=True):
            p.grad = None if s is None else s.div_(chunks).to(p.dtype)
        return total / chunks

    def hand_over(self, *, clock: PhaseClock | None = None, averaged: bool = False) -> None:
        """Part 3: hand ``.grad`` (preconditioned, or as :meth:`backward` left it) to DeepSpeed, which
        applies it; ``.grad`` is cleared.

        ``averaged``: ``.grad`` is already the same on every rank (the preconditioner averaged the
        gradients before preconditioning them). Then, at ZeRO stage 0, DeepSpeed's own all-reduce is
        skipped (the surrogate backward runs under ``engine.no_sync()``): the gradients cross the
        network once per step. ZeRO-1 reduces them again, into each rank's partition, which is how
        its optimizer receives them. Without ``averaged`` DeepSpeed averages them.

        ``clock`` gets the surrogate backward with DeepSpeed's averaging, if any
        (``gradient_communication``), and its optimizer step.
        """
        clock = clock if clock is not None else PhaseClock()
        updates = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.discard()
        surrogate = torch.stack(
            [((p - p.detach()) * u.detach()).sum().float() for p, u in zip(self.params, updates, strict=True)]
        ).sum()
        with clock("gradient_communication"):
            if averaged and self.reduces_once:
                with self.engine.no_sync():
                    self.engine.backward(surrogate)
            else:
                self.engine.backward(surrogate)
        with clock("optimizer"):
            self.engine.step()

    @property
    def reduces_once(self) -> bool:
        """Whether :meth:`hand_over` of averaged gradients skips DeepSpeed's all-reduce (ZeRO stage 0)."""
        return self.job.deepspeed.zero_stage == 0

    def discard(self) -> None:
        """Forget :meth:`backward`'s gradients: the step is skipped, DeepSpeed sees nothing of it."""
        for p in self.params:
            p.grad = None

    # -- checkpoints ---------------------------------------------------------------------------

    def _masters(self) -> list[Tensor]:
        """The tensors the optimizer updates: float32 masters (flat partitions under ZeRO-1)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """This rank's float32 masters and optimizer state (plain tensors and dicts)."""
        return {
            "deepspeed": {"zero_stage": self.job.deepspeed.zero_stage, "bf16": self.job.deepspeed.bf16},
            "masters": [m.detach().clone() for m in self._masters()],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after the module's weights were loaded)."""
        saved = state.get("deepspeed") if isinstance(state, dict) else None
        mine = {"zero_stage": self.job.deepspeed.zero_stage, "bf16": self.job.deepspeed.bf16}
        if saved is None:
            raise JobError(
                "checkpoint.resume: the checkpoint was written without --launcher deepspeed; resume it "
                "with the launcher that wrote it, or set checkpoint.resume=never"
            )
        masters = self._masters()
        shapes = [tuple(t.shape) for t in state["masters"]]
        if saved != mine or shapes != [tuple(m.shape) for m in masters]:
            raise JobError(
                "checkpoint.resume: the checkpoint holds DeepSpeed state of zero_stage="
                f"{saved['zero_stage']} bf16={saved['bf16']} in {_sizes(state['masters'])}; this run "
                f"(zero_stage={mine['zero_stage']} bf16={mine['bf16']}, {dist.get_world_size()} ranks) has "
                f"{_sizes(masters)}: resume with the world size and deepspeed settings that wrote it, or set "
                "checkpoint.resume=never"
            )
        with torch.no_grad():
            for m, t in zip(masters, state["masters"], strict=True):
                m.copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])

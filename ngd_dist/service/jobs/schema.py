"""The sections of a training job, their defaults, and how a mapping (parsed YAML) becomes a ``Job``.

Every section is a frozen dataclass; each field is declared once, with its default, YAML key and
check (:mod:`ngd_dist.service.jobs.fields`). ``job_from_dict`` checks each key (unknown keys, types,
ranges, and the rules that span fields or sections) and raises ``JobError`` with a one-line message
naming the key path, the value and what is allowed. ``job_to_dict`` writes a job back as plain YAML
types; ``job_from_dict(job_to_dict(job)) == job``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.service import catalog as _registry
from ngd_dist.service import optim
from ngd_dist.service.jobs.checks import PLAIN, Section, check_number, join, one_of, plain
from ngd_dist.service.jobs.errors import JobError, suggestion
from ngd_dist.service.jobs.fields import (
    INLINE,
    SECTION,
    Read,
    Spec,
    checked,
    choice,
    flag,
    integer,
    mapping,
    number,
    optional_integer,
    optional_text,
    read_fields,
    text,
    to_plain,
    yaml_keys,
)

OptimizerName = Literal["sgd", "adamw", "lamb", "lars"]
ScheduleName = Literal["constant", "cosine", "linear", "step"]
DtypeName = Literal["float32", "bfloat16", "float16"]
Backend = Literal["auto", "gloo", "nccl"]
TransportName = Literal["torch", "mpi"]

BUILTIN_MODELS: tuple[str, ...] = tuple(_registry.BUILTIN_MODELS)
BUILTIN_DATA: tuple[str, ...] = tuple(_registry.BUILTIN_DATASETS)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
DTYPES: tuple[str, ...] = get_args(DtypeName)
BACKENDS: tuple[str, ...] = get_args(Backend)
TRANSPORTS: tuple[str, ...] = get_args(TransportName)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_PATTERN = rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*"
"""``package.module:factory``: a module to import and the attribute of it to call."""

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_STEP_NEEDS_DECAY = "an integer >= 1 (the step schedule needs it)"


def _factory_name(builtins: tuple[str, ...]) -> Read:
    """Check of a ``name`` key: one of ``builtins`` or ``"package.module:factory"``."""

    def read(s: Section, key: str, default: str) -> str:
        value = s.data.get(key, default)
        if isinstance(value, str) and (value in builtins or re.fullmatch(FACTORY_PATTERN, value)):
            return value
        expected = f"{one_of(value, builtins).split(';')[0]}, or 'package.module:factory'"
        guess = suggestion(value, builtins) if isinstance(value, str) else None
        if guess is not None:
            expected += f"; did you mean {guess!r}?"
        raise JobError.invalid(s.where(key), value, expected)

    return read


@dataclass(frozen=True, kw_only=True)
class _FactorySpec(Spec):
    """A built-in name or ``"package.module:factory"``, called with ``args``."""

    name: str = ""
    """Declared again by each subclass, with its default and built-ins."""

    args: dict[str, Any] = field(default_factory=dict, metadata=mapping())
    """Keyword arguments of the factory (plain YAML values)."""

    @property
    def factory(self) -> tuple[str, str] | None:
        """``("package.module", "factory")`` for a user factory; None for a built-in."""
        if ":" not in self.name:
            return None
        module, attr = self.name.split(":", 1)
        return module, attr


@dataclass(frozen=True, kw_only=True)
class ModelSpec(_FactorySpec):
    """Which model to build: a built-in name or ``"package.module:factory"``, called with ``args``."""

    name: str = field(default="mlp", metadata=checked(_factory_name(BUILTIN_MODELS)))
    """``"mlp"``, ``"small_cnn"``, ``"resnet18"``, ``"gpt"``, the Hugging Face ``"hf_causal_lm"`` and
    ``"hf_sequence_classification"`` (need the ``hf`` extra), or ``"package.module:factory"``."""

    def check_fields(self, s: Section) -> None:
        """A Hugging Face built-in needs ``transformers`` installed (the ``hf`` extra)."""
        missing = _registry.needs_hf_extra(self.name)
        if missing is not None:
            raise JobError(missing, path=s.where("name"))


@dataclass(frozen=True, kw_only=True)
class DataSpec(_FactorySpec):
    """Which data set to read: a built-in name or ``"package.module:factory"``, called with ``args``."""

    name: str = field(default="digits", metadata=checked(_factory_name(BUILTIN_DATA)))
    """``"digits"`` (embedded), ``"synthetic_images"``, ``"synthetic_tokens"``, ``"text"``,
    ``"tensor_file"`` (a .pt of images and labels, ``args.path``), ``"image_folder"`` (``args.path``:
    ``root/<class>/<image>``, read item by item; the ``images`` extra), ``"cifar10"`` (``args.path``:
    CIFAR-10's binary version, memory-mapped; ``args.augment``: random crops and flips),
    ``"hf_files"`` (``args.files``: local json, csv, parquet or text files read with Hugging Face
    ``datasets``; the ``datasets`` extra), or ``"package.module:factory"``
    returning tensors or a ``torch.utils.data.Dataset`` (docs/data.md). ``synthetic_tokens`` and
    ``text`` take ``args.format: dict`` for Hugging Face style dict batches."""

    num_workers: int = field(default=0, metadata=integer(minimum=0))
    """Worker processes of each rank's ``torch.utils.data.DataLoader``, >= 0; 0 loads in the
    training process. Items are read and transformed (``Dataset.__getitem__``) in the workers."""

    pin_memory: bool = field(default=False, metadata=flag())
    """Copy batches into page-locked memory for faster host-to-GPU transfer (CUDA only; ignored on CPU)."""

    prefetch_factor: int | None = field(default=None, metadata=optional_integer(minimum=1))
    """Batches each worker loads ahead, >= 1; null: torch's default (2). Needs ``num_workers`` >= 1."""

    holdout: float = field(default=0.0, metadata=number(low=0.0, high=0.5))
    """Fraction of a map-style dataset held out to evaluate on (``train.eval_every``), in [0, 0.5]:
    a fixed choice of items drawn from the job's seed; used only when ``train.eval_every`` > 0, so
    a run without evaluation trains on all the data."""

    def check_fields(self, s: Section) -> None:
        """``prefetch_factor`` only with worker processes."""
        if self.prefetch_factor is not None and self.num_workers == 0:
            raise JobError.invalid(
                s.where("prefetch_factor"),
                self.prefetch_factor,
                "null unless data.num_workers >= 1 (it is the batches each worker process loads ahead)",
            )


@dataclass(frozen=True, kw_only=True)
class BatchSpec(Spec):
    """Samples per step: per rank, per optimizer step in total, and micro-batches accumulated."""

    per_rank: int = field(default=256, metadata=integer(minimum=1))
    """Samples in one forward/backward on one rank (one micro-batch)."""

    global_: int | None = field(default=None, metadata=optional_integer(minimum=1, key="global"))
    """YAML key ``global``: samples per optimizer step over all ranks; when given it must equal
    ``per_rank * world_size * accumulation`` (checked at launch by :meth:`check_world`)."""

    accumulation: int = field(default=1, metadata=integer(minimum=1))
    """Micro-batches accumulated (forward/backward each) before one optimizer step."""

    @property
    def world_size(self) -> int | None:
        """The world size ``global`` implies, or None when ``global`` is not given."""
        if self.global_ is None:
            return None
        return self.global_ // (self.per_rank * self.accumulation)

    def check_world(self, world_size: int) -> int:
        """The global batch on ``world_size`` ranks; JobError naming ``batch.global`` if it disagrees."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise JobError.invalid("world_size", world_size, "an integer >= 1")
        total = self.per_rank * world_size * self.accumulation
        if self.global_ is not None and self.global_ != total:
            raise JobError(
                f"batch.global: got {self.global_}; expected per_rank x world size x accumulation = "
                f"{self.per_rank} x {world_size} x {self.accumulation} = {total} on {world_size} "
                f"rank(s) (or launch {self.world_size} ranks, or leave batch.global out)",
                path="batch.global",
            )
        return total

    def check_fields(self, s: Section) -> None:
        """``global`` is a multiple of ``per_rank x accumulation``."""
        per_step = self.per_rank * self.accumulation
        if self.global_ is not None and self.global_ % per_step:
            raise JobError.invalid(
                s.where("global"),
                self.global_,
                f"a multiple of per_rank x accumulation = {self.per_rank} x {self.accumulation} = "
                f"{per_step} (one per rank)",
            )


@dataclass(frozen=True, kw_only=True)
class TrainSpec(Spec):
    """How long to train and how often to log and evaluate."""

    steps: int = field(default=100, metadata=integer(minimum=1))
    """Optimizer steps in the whole run. A skipped step (below) is not one: the run takes another
    batch, so it still ends after ``steps`` applied steps."""

    max_bad_steps: int = field(default=10, metadata=integer(minimum=1))
    """Consecutive skipped steps after which the job stops, on every rank, with one line and exit
    code 3 (diverged). A step is skipped on every rank, with no optimizer, preconditioner or
    schedule step, when the loss of any rank or the (averaged) gradients hold NaN or inf (a
    float16 GradScaler overflow too)."""

    log_every: int = field(default=10, metadata=integer(minimum=1))
    """Log the loss every this many steps."""

    eval_every: int = field(default=0, metadata=integer(minimum=0))
    """Evaluate on held-out data every this many steps; 0 disables evaluation."""


def _betas(s: Section, key: str, default: tuple[float, float]) -> tuple[float, float]:
    """Check of ``optimizer.betas``: a list of two numbers in [0, 1)."""
    betas = s.data.get(key, default)
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise JobError.invalid(s.where(key), betas, "a list of two numbers in [0, 1)")
    b1, b2 = (check_number(f"{s.where(key)}[{i}]", b, 0.0, 1.0, False, True) for i, b in enumerate(betas))
    return b1, b2


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec(Spec):
    """The base optimizer that applies the (preconditioned) gradients."""

    name: OptimizerName = field(default="sgd", metadata=choice(OPTIMIZERS))
    """``"sgd"`` (with momentum), ``"adamw"``, or for large batches ``"lamb"`` / ``"lars"``."""

    lr: float = field(default=0.1, metadata=number(low=0.0, open_low=True))
    """Peak learning rate (reached at the end of the warm-up)."""

    momentum: float = field(default=0.9, metadata=number(low=0.0, high=1.0, open_high=True))
    """Momentum of sgd and lars, in [0, 1)."""

    weight_decay: float = field(default=0.0, metadata=number(low=0.0))
    """Decoupled (adamw, lamb) or L2 (sgd, lars) weight decay, >= 0."""

    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=checked(_betas))
    """Adam moment decays of adamw and lamb, each in [0, 1)."""

    eps: float = field(default=1e-8, metadata=number(low=0.0, open_low=True))
    """Denominator epsilon of adamw and lamb, > 0."""

    trust_coefficient: float = field(default=0.001, metadata=number(low=0.0, open_low=True))
    """LARS trust ratio coefficient eta, > 0."""


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec(Spec):
    """Learning-rate schedule: a linear warm-up, then constant, cosine, linear or step decay.

    The learning rate it gives at each step: :func:`ngd_dist.service.optim.lr_at`.
    """

    name: ScheduleName = field(default="cosine", metadata=choice(SCHEDULES))
    """Shape after the warm-up: ``"constant"``, ``"cosine"`` or ``"linear"`` (from lr down to
    min_lr at train.steps), ``"step"`` (times gamma every decay_steps, floored at min_lr)."""

    warmup_steps: int = field(default=0, metadata=integer(minimum=0))
    """Steps of linear warm-up from lr / warmup_steps to lr; at most train.steps."""

    min_lr: float = field(default=0.0, metadata=number(low=0.0))
    """Learning rate at the end of cosine / linear decay, floor of step decay; <= optimizer.lr."""

    decay_steps: int | None = field(default=None, metadata=optional_integer(minimum=1))
    """Step schedule: multiply by gamma every this many steps after the warm-up (required there)."""

    gamma: float = field(default=0.1, metadata=number(low=0.0, high=1.0, open_low=True))
    """Step schedule: the decay factor, in (0, 1]."""

    def check_fields(self, s: Section) -> None:
        """The step schedule needs ``decay_steps`` (its bounds against other sections: ``Job``)."""
        if self.name == "step" and self.decay_steps is None:
            raise JobError.invalid(s.where("decay_steps"), None, _STEP_NEEDS_DECAY)


@dataclass(frozen=True, kw_only=True)
class PreconditionerSpec(Spec):
    """The K-FAC preconditioner: on or off, and its ``ngd_dist.KFACConfig``.

    In YAML the KFACConfig fields sit next to ``enabled`` (``preconditioner: {curvature: ief,
    damping: 1.0e-3}``); after loading, ``kfac`` is the KFACConfig they describe, with ``seed``
    defaulting to the job seed and ``transport`` to ``distributed.transport``.
    """

    enabled: bool = field(default=True, metadata=flag())
    """False trains with the base optimizer alone."""

    kfac: KFACConfig = field(default_factory=KFACConfig, metadata=INLINE)
    """The preconditioner's configuration (default: KFACConfig's defaults)."""

    @classmethod
    def parse(
        cls, data: object, path: str = "preconditioner", *, seed: int = 0, transport: str = "torch"
    ) -> PreconditionerSpec:
        """Check the ``preconditioner`` section: build the KFACConfig, relabelling its errors."""
        s = Section(data, path, yaml_keys(cls))
        values = read_fields(cls, s)
        given: dict[str, Any] = {}
        for key, value in s.data.items():
            if key in values:
                continue
            if callable(value):
                raise JobError.invalid(s.where(key), value, f"{PLAIN} (schedules cannot be written in a job)")
            given[key] = value if isinstance(value, torch.dtype) else plain(value, s.where(key))
        if "transport" in given and given["transport"] != transport:
            raise JobError.invalid(
                s.where("transport"),
                given["transport"],
                f"{transport!r} to match distributed.transport (set distributed.transport instead)",
            )
        given.setdefault("transport", transport)
        given.setdefault("seed", seed)
        try:
            config = KFACConfig(**given)
        except (ValueError, TypeError) as exc:
            raise _relabel(str(exc), path) from None
        return cls(kfac=config, **values)


def _relabel(message: str, path: str) -> JobError:
    """A KFACConfig error (``"KFACConfig.damping: got ..."``) as ``"preconditioner.damping: got ..."``."""
    match = re.match(r"KFACConfig\.(\w+): (.*)", message, re.DOTALL)
    if match is None:
        return JobError(f"{path}: {message}", path=path)
    key = join(path, match.group(1))
    return JobError(f"{key}: {match.group(2)}", path=key)


def _grad_scaler(s: Section, key: str, default: str | bool) -> str | bool:
    """Check of ``precision.grad_scaler``: ``auto``, true or false."""
    scaler = s.data.get(key, default)
    if scaler != "auto" and not isinstance(scaler, bool):
        raise JobError.invalid(s.where(key), scaler, "auto, true or false")
    return scaler


@dataclass(frozen=True, kw_only=True)
class PrecisionSpec(Spec):
    """Autocast dtype of the forward/backward passes, and gradient scaling."""

    dtype: DtypeName = field(default="float32", metadata=choice(DTYPES, _DTYPE_ALIASES))
    """``"float32"`` (no autocast), ``"bfloat16"`` or ``"float16"`` (autocast); aliases fp32, bf16,
    fp16 are accepted and stored as the full names."""

    grad_scaler: Literal["auto"] | bool = field(default="auto", metadata=checked(_grad_scaler))
    """Use ``torch.amp.GradScaler``: ``"auto"`` means only for float16."""

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return _TORCH_DTYPES[self.dtype]

    @property
    def autocast(self) -> bool:
        """Whether forward/backward run under autocast (any dtype but float32)."""
        return self.dtype != "float32"

    @property
    def use_grad_scaler(self) -> bool:
        """Whether to build a GradScaler (``grad_scaler`` resolved)."""
        return self.dtype == "float16" if self.grad_scaler == "auto" else bool(self.grad_scaler)


_RESUME_EXPECTED = (
    "auto, never, a step of checkpoint.dir (e.g. 40), a directory of checkpoints "
    "or a checkpoint file"
)


def _resume(s: Section, key: str, default: str | int) -> str | int:
    """Check of ``checkpoint.resume``: ``auto``, ``never``, a step (an int >= 0, or its digits), or a path."""
    value = s.data.get(key, default)
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,18}", value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise JobError.invalid(s.where(key), value, _RESUME_EXPECTED)


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec(Spec):
    """Where and how often to save, how many to keep, and what to resume from."""

    dir: str | None = field(default=None, metadata=optional_text())
    """Directory of the checkpoints; None saves nothing."""

    every: int = field(default=0, metadata=integer(minimum=0))
    """Save every this many steps (needs ``dir``); 0: no periodic saves. With ``dir`` set, the last
    step (``train.steps``) is always saved too, and so is the current one on SIGTERM/SIGINT: steps
    45, every 20 saves steps 20, 40 and 45; every 0 saves step 45 only."""

    keep: int = field(default=3, metadata=integer(minimum=1))
    """Newest checkpoints kept in ``dir``; older ones are deleted."""

    resume: str | int = field(default="auto", metadata=checked(_resume))
    """What to resume from; each rank loads its own rank's file of one step:

    - ``"auto"``: the newest step in ``dir`` whose files load on every rank; none: start afresh.
    - ``"never"``: start afresh.
    - a step, ``40`` (or ``"40"``): step 40 in ``dir``.
    - a directory of a run's per-rank files: its newest step that loads on every rank (the run
      then saves in ``dir``, which may be another directory).
    - one of those files, ``DIR/step-00000040.rank0-of2.pt``: step 40 of ``DIR``.

    An explicit step, directory or file that is missing, lacks a rank's file or was written by
    another number of ranks is a one-line error (``ngd-dist validate`` checks it too). Before
    anything is restored the job the checkpoint recorded is compared with this one: only
    ``train.steps``, ``train.log_every``, ``train.eval_every``, ``train.max_bad_steps``, ``name``,
    ``checkpoint.*``, ``metrics.*`` and ``distributed.timeout_s`` may differ; any other change (the
    model, data, batch, optimizer, schedule, preconditioner, precision, ...) or another world size
    is refused in one line listing the fields (:mod:`ngd_dist.service.resume`)."""

    def check_fields(self, s: Section) -> None:
        """Periodic saves need a directory, and so does resuming from a step."""
        if self.every and self.dir is None:
            raise JobError.invalid(
                s.where("dir"), None, f"a directory, since checkpoint.every={self.every} asks for saves"
            )
        if isinstance(self.resume, int) and self.dir is None:
            raise JobError.invalid(
                s.where("resume"),
                self.resume,
                f"a directory or a checkpoint file, or set checkpoint.dir: a step ({self.resume}) needs "
                "checkpoint.dir to find it in",
            )


@dataclass(frozen=True, kw_only=True)
class MetricsSpec(Spec):
    """The Prometheus exporter and the health checks behind it."""

    enabled: bool = field(default=True, metadata=flag())
    """False exports nothing."""

    host: str = field(default="127.0.0.1", metadata=text(pattern=r"\S+", expected="a host name or address"))
    """Address the HTTP exporter listens on."""

    port: int = field(
        default=9400, metadata=integer(minimum=0, maximum=65535, expected="0 (off) or a port in [1, 65535]")
    )
    """Port of rank 0's exporter (others add their rank); 0 disables the HTTP endpoint."""

    stall_seconds: float = field(default=120.0, metadata=number(low=0.0, open_low=True))
    """A step taking longer than this marks the job stalled, > 0."""

    quality_every: int = field(default=0, metadata=integer(minimum=0))
    """Every this many steps, measure the update-quality indicator γ of the iEF paper (Eq. 15) of the
    step's update on a fixed probe batch and export it as ``ngd_quality_gamma``
    (:mod:`ngd_dist.kfac.quality`); 0 disables it. Needs the exporter (``enabled`` and a port);
    costs about one forward and one forward-mode pass over the probe per measurement."""

    quality_probe: int = field(
        default=32, metadata=integer(minimum=1, expected="an integer >= 1 (samples in the probe batch)")
    )
    """Samples in each rank's probe batch for ``quality_every`` (drawn once from the training data,
    different on each rank), >= 1."""

    tensorboard: bool = field(default=False, metadata=flag())
    """Also write TensorBoard event files into the run directory (``checkpoint.dir``, which must be
    set): the scalars of each ``metrics.jsonl`` record (rank 0). Needs the ``tensorboard`` extra."""

    synchronize_phases: bool = field(default=False, metadata=flag())
    """On a GPU, wait for the device at every phase boundary, so that each phase of
    ``ngd_phase_seconds`` (and of ``metrics.jsonl``) is charged with the device work it queued; off,
    asynchronous work lands in whichever later phase waits for it, and measuring adds nothing to the
    step. No effect on the CPU, whose work is synchronous."""


@dataclass(frozen=True, kw_only=True)
class DistributedSpec(Spec):
    """How ranks talk: the torch.distributed backend and the preconditioner's transport."""

    backend: Backend = field(default="auto", metadata=choice(BACKENDS))
    """Process-group backend; ``"auto"``: nccl on CUDA, gloo otherwise."""

    transport: TransportName = field(default="torch", metadata=choice(TRANSPORTS))
    """Collectives of the preconditioner: over torch.distributed or mpi4py (under mpirun)."""

    timeout_s: float = field(default=300.0, metadata=number(low=0.0, open_low=True))
    """Collective timeout in seconds, > 0."""


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSpec(Spec):
    """Settings used when the job is launched with ``--launcher deepspeed``."""

    zero_stage: int = field(default=0, metadata=integer(minimum=0, maximum=3))
    """ZeRO stage 0 or 1 (optimizer states partitioned). Stages 2 and 3 partition gradients across
    ranks, so no rank holds a layer's full reduced gradient to precondition: rejected while the
    preconditioner is enabled. At launch (``ngd_dist.service.deepspeed_engine.check_job``) stage 3 is
    refused altogether, and stages >= 1 with the layer-wise optimizers lars and lamb."""

    bf16: bool = field(default=False, metadata=flag())
    """DeepSpeed's bf16 mode; requires precision.dtype bfloat16."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """A whole training job: what to train, on what, how, and where its outputs go."""

    seed: int = field(default=0, metadata=integer(minimum=0))
    """Seed of model initialisation and data order (and of the preconditioner unless it sets one)."""

    name: str = field(
        default="job", metadata=text(pattern=_NAME_PATTERN, expected="letters, digits, '.', '_', '-'")
    )
    """Name of the job in logs, metrics and checkpoints: letters, digits, ``.``, ``_``, ``-``."""

    model: ModelSpec = field(default_factory=ModelSpec, metadata=SECTION)
    data: DataSpec = field(default_factory=DataSpec, metadata=SECTION)
    batch: BatchSpec = field(default_factory=BatchSpec, metadata=SECTION)
    train: TrainSpec = field(default_factory=TrainSpec, metadata=SECTION)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec, metadata=SECTION)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec, metadata=SECTION)
    preconditioner: PreconditionerSpec = field(default_factory=PreconditionerSpec)
    """Read by :meth:`parse` after the other sections: its defaults come from ``seed`` and
    ``distributed.transport``."""
    precision: PrecisionSpec = field(default_factory=PrecisionSpec, metadata=SECTION)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec, metadata=SECTION)
    metrics: MetricsSpec = field(default_factory=MetricsSpec, metadata=SECTION)
    distributed: DistributedSpec = field(default_factory=DistributedSpec, metadata=SECTION)
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec, metadata=SECTION)

    def kfac_config(self) -> KFACConfig | None:
        """A copy of the preconditioner's ``KFACConfig``, or None when the preconditioner is disabled.

        A copy, so that whatever the caller sets on it leaves the job as it was loaded.
        """
        return copy.copy(self.preconditioner.kfac) if self.preconditioner.enabled else None

    def lr_at(self, step: int) -> float:
        """Learning rate of the 0-based optimizer ``step`` under the schedule."""
        return optim.lr_at(self.schedule, step, base_lr=self.optimizer.lr, total_steps=self.train.steps)

    @classmethod
    def parse(cls, data: object) -> Job:
        """Check a whole job mapping (sections, then the rules that span them)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise JobError.invalid("", data, "a mapping of sections (model, data, batch, ...)")
        top = Section(data, "", yaml_keys(cls))
        values = read_fields(cls, top)
        values["preconditioner"] = PreconditionerSpec.parse(
            data.get("preconditioner"), seed=values["seed"], transport=values["distributed"].transport
        )
        job = cls(**values)
        job._check_across()
        return job

    def _check_across(self) -> None:
        if self.metrics.tensorboard and not self.checkpoint.dir:
            raise JobError.invalid(
                "metrics.tensorboard",
                True,
                "false unless checkpoint.dir is set (the run directory the event files are written into)",
            )
        evaluates = self.train.eval_every > 0 and self.data.holdout > 0
        if evaluates and self.data.name == "cifar10" and self.data.args.get("augment") is True:
            raise JobError.invalid(
                "data.args.augment",
                True,
                "false with data.holdout and train.eval_every > 0: the held-out images would be augmented "
                "too (evaluate without augmentation, or set train.eval_every to 0)",
            )
        if self.train.eval_every > 0 and self.data.holdout == 0:
            raise JobError.invalid(
                "train.eval_every",
                self.train.eval_every,
                "0 unless data.holdout > 0 (the fraction of the data held out to evaluate on, e.g. 0.1)",
            )
        if self.schedule.warmup_steps > self.train.steps:
            raise JobError.invalid(
                "schedule.warmup_steps",
                self.schedule.warmup_steps,
                f"an integer in [0, train.steps={self.train.steps}]",
            )
        if self.schedule.min_lr > self.optimizer.lr:
            raise JobError.invalid(
                "schedule.min_lr",
                self.schedule.min_lr,
                f"a number in [0, optimizer.lr={self.optimizer.lr:g}]",
            )
        if self.preconditioner.enabled and self.deepspeed.zero_stage >= 2:
            raise JobError.invalid(
                "deepspeed.zero_stage",
                self.deepspeed.zero_stage,
                "0 or 1 with the preconditioner enabled: ZeRO stages 2 and 3 partition gradients across "
                "ranks, so no rank holds a layer's full reduced gradient for K-FAC preconditioning",
            )
        if self.deepspeed.bf16 and self.precision.dtype != "bfloat16":
            raise JobError.invalid(
                "deepspeed.bf16",
                True,
                f"false unless precision.dtype is bfloat16 (it is {self.precision.dtype})",
            )


def job_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Job:
    """Check a job given as a mapping (parsed YAML, or a recorded ``job_to_dict``) and build it.

    Raises ``JobError`` (one line, prefixed with ``source``) on the first problem found.
    """
    try:
        return Job.parse(data)
    except JobError as err:
        raise err.with_source(source) from None


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job as plain YAML types (fit for ``yaml.safe_dump``, logs and checkpoints).

    Every key is written, defaults included, the KFACConfig's dtypes by name and its options by
    value; ``job_from_dict(job_to_dict(job)) == job``.
    """
    out: dict[str, Any] = to_plain(job)
    return out

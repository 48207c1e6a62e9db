"""The sections of a training job, their defaults, and how a mapping (parsed YAML) becomes a ``Job``.

Every section is a frozen dataclass whose field defaults are the job defaults; ``job_from_dict``
checks each key (unknown keys, types, ranges, and the rules that span sections) and raises
``JobError`` with a one-line message naming the key path, the value and what is allowed.
``job_to_dict`` writes a job back as plain YAML types; ``job_from_dict(job_to_dict(job)) == job``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.service import catalog as _registry
from ngd_dist.service.jobs.checks import PLAIN, Section, check_number, join, one_of, plain
from ngd_dist.service.jobs.errors import JobError, suggestion

BUILTIN_MODELS: tuple[str, ...] = tuple(_registry.BUILTIN_MODELS)
BUILTIN_DATA: tuple[str, ...] = tuple(_registry.BUILTIN_DATASETS)
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw", "lamb", "lars")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear", "step")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
TRANSPORTS: tuple[str, ...] = ("torch", "mpi")
KFAC_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(KFACConfig))

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_PATTERN = rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*"
"""``package.module:factory``: a module to import and the attribute of it to call."""

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def _keys(cls: type) -> list[str]:
    """The YAML keys of a section dataclass (``global_`` is written ``global``)."""
    return [f.metadata.get("key", f.name) for f in dataclasses.fields(cls)]


def _factory_name(section: Section, default: str, builtins: tuple[str, ...]) -> str:
    value = section.data.get("name", default)
    if isinstance(value, str) and (value in builtins or re.fullmatch(FACTORY_PATTERN, value)):
        return value
    expected = f"{one_of(value, builtins).split(';')[0]}, or 'package.module:factory'"
    guess = suggestion(value, builtins) if isinstance(value, str) else None
    if guess is not None:
        expected += f"; did you mean {guess!r}?"
    raise JobError.invalid(section.where("name"), value, expected)


def _split_factory(name: str) -> tuple[str, str] | None:
    if ":" not in name:
        return None
    module, attr = name.split(":", 1)
    return module, attr


_Spec = TypeVar("_Spec", bound="_FactorySpec")


@dataclass(frozen=True, kw_only=True)
class _FactorySpec:
    """A built-in name or ``"package.module:factory"``, called with ``args``."""

    name: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory (plain YAML values)."""

    BUILTINS: ClassVar[tuple[str, ...]] = ()
    SECTION: ClassVar[str] = ""

    @property
    def factory(self) -> tuple[str, str] | None:
        """``("package.module", "factory")`` for a user factory; None for a built-in."""
        return _split_factory(self.name)

    @classmethod
    def parse(cls: type[_Spec], data: object, path: str | None = None) -> _Spec:
        """Check the section of a job this spec describes."""
        s = Section(data, path or cls.SECTION, _keys(cls))
        return cls(name=_factory_name(s, cls.name, cls.BUILTINS), args=s.mapping("args"))


@dataclass(frozen=True, kw_only=True)
class ModelSpec(_FactorySpec):
    """Which model to build: a built-in name or ``"package.module:factory"``, called with ``args``."""

    name: str = "mlp"
    """``"mlp"``, ``"small_cnn"``, ``"resnet18"``, ``"gpt"``, or ``"package.module:factory"``."""

    BUILTINS: ClassVar[tuple[str, ...]] = BUILTIN_MODELS
    SECTION: ClassVar[str] = "model"


@dataclass(frozen=True, kw_only=True)
class DataSpec(_FactorySpec):
    """Which data set to read: a built-in name or ``"package.module:factory"``, called with ``args``."""

    name: str = "digits"
    """``"digits"`` (embedded), ``"synthetic_images"``, ``"synthetic_tokens"``, ``"text"``,
    ``"tensor_file"`` (a .pt of images and labels, ``args.path``), or ``"package.module:factory"``."""

    BUILTINS: ClassVar[tuple[str, ...]] = BUILTIN_DATA
    SECTION: ClassVar[str] = "data"


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """Samples per step: per rank, per optimizer step in total, and micro-batches accumulated."""

    per_rank: int = 256
    """Samples in one forward/backward on one rank (one micro-batch)."""

    global_: int | None = field(default=None, metadata={"key": "global"})
    """YAML key ``global``: samples per optimizer step over all ranks; when given it must equal
    ``per_rank * world_size * accumulation`` (checked at launch by :meth:`check_world`)."""

    accumulation: int = 1
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

    @classmethod
    def parse(cls, data: object, path: str = "batch") -> BatchSpec:
        """Check the ``batch`` section of a job."""
        s = Section(data, path, _keys(cls))
        d = cls()
        per_rank = s.integer("per_rank", d.per_rank, minimum=1)
        accumulation = s.integer("accumulation", d.accumulation, minimum=1)
        total = s.optional_integer("global", d.global_)
        if total is not None and total % (per_rank * accumulation):
            raise JobError.invalid(
                s.where("global"),
                total,
                f"a multiple of per_rank x accumulation = {per_rank} x {accumulation} = "
                f"{per_rank * accumulation} (one per rank)",
            )
        return cls(per_rank=per_rank, global_=total, accumulation=accumulation)


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """How long to train and how often to log and evaluate."""

    steps: int = 100
    """Optimizer steps in the whole run."""

    log_every: int = 10
    """Log the loss every this many steps."""

    eval_every: int = 0
    """Evaluate on held-out data every this many steps; 0 disables evaluation."""

    @classmethod
    def parse(cls, data: object, path: str = "train") -> TrainSpec:
        """Check the ``train`` section of a job."""
        s = Section(data, path, _keys(cls))
        d = cls()
        return cls(
            steps=s.integer("steps", d.steps, minimum=1),
            log_every=s.integer("log_every", d.log_every, minimum=1),
            eval_every=s.integer("eval_every", d.eval_every, minimum=0),
        )


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """The base optimizer that applies the (preconditioned) gradients."""

    name: Literal["sgd", "adamw", "lamb", "lars"] = "sgd"
    """``"sgd"`` (with momentum), ``"adamw"``, or for large batches ``"lamb"`` / ``"lars"``."""

    lr: float = 0.1
    """Peak learning rate (reached at the end of the warm-up)."""

    momentum: float = 0.9
    """Momentum of sgd and lars, in [0, 1)."""

    weight_decay: float = 0.0
    """Decoupled (adamw, lamb) or L2 (sgd, lars) weight decay, >= 0."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decays of adamw and lamb, each in [0, 1)."""

    eps: float = 1e-8
    """Denominator epsilon of adamw and lamb, > 0."""

    trust_coefficient: float = 0.001
    """LARS trust ratio coefficient eta, > 0."""

    @classmethod
    def parse(cls, data: object, path: str = "optimizer") -> OptimizerSpec:
        """Check the ``optimizer`` section of a job."""
        s = Section(data, path, _keys(cls))
        d = cls()
        betas = s.data.get("betas", d.betas)
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise JobError.invalid(s.where("betas"), betas, "a list of two numbers in [0, 1)")
        b1, b2 = (
            check_number(f"{s.where('betas')}[{i}]", b, 0.0, 1.0, False, True) for i, b in enumerate(betas)
        )
        return cls(
            name=s.choice("name", d.name, OPTIMIZERS),  # type: ignore[arg-type]
            lr=s.number("lr", d.lr, low=0.0, open_low=True),
            momentum=s.number("momentum", d.momentum, low=0.0, high=1.0, open_high=True),
            weight_decay=s.number("weight_decay", d.weight_decay, low=0.0),
            betas=(b1, b2),
            eps=s.number("eps", d.eps, low=0.0, open_low=True),
            trust_coefficient=s.number("trust_coefficient", d.trust_coefficient, low=0.0, open_low=True),
        )


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """Learning-rate schedule: a linear warm-up, then constant, cosine, linear or step decay."""

    name: Literal["constant", "cosine", "linear", "step"] = "cosine"
    """Shape after the warm-up: ``"constant"``, ``"cosine"`` or ``"linear"`` (from lr down to
    min_lr at train.steps), ``"step"`` (times gamma every decay_steps, floored at min_lr)."""

    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr; at most train.steps."""

    min_lr: float = 0.0
    """Learning rate at the end of cosine / linear decay, floor of step decay; <= optimizer.lr."""

    decay_steps: int | None = None
    """Step schedule: multiply by gamma every this many steps after the warm-up (required there)."""

    gamma: float = 0.1
    """Step schedule: the decay factor, in (0, 1]."""

    def lr_at(self, step: int, *, base_lr: float, total_steps: int) -> float:
        """Learning rate of the 0-based optimizer ``step`` of a ``total_steps`` run peaking at ``base_lr``."""
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        after = step - self.warmup_steps
        if self.name == "constant":
            return base_lr
        if self.name == "step":
            if self.decay_steps is None:
                raise JobError.invalid(
                    "schedule.decay_steps", None, "an integer >= 1 (the step schedule needs it)"
                )
            return max(self.min_lr, base_lr * self.gamma ** (after // self.decay_steps))
        span = max(1, total_steps - self.warmup_steps)
        t = min(1.0, after / span)
        if self.name == "cosine":
            return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        return base_lr + (self.min_lr - base_lr) * t

    @classmethod
    def parse(cls, data: object, path: str = "schedule") -> ScheduleSpec:
        """Check the ``schedule`` section of a job (its bounds against other sections: ``Job``)."""
        s = Section(data, path, _keys(cls))
        d = cls()
        name = s.choice("name", d.name, SCHEDULES)
        decay_steps = s.optional_integer("decay_steps", d.decay_steps)
        if name == "step" and decay_steps is None:
            raise JobError.invalid(
                s.where("decay_steps"), None, "an integer >= 1 (the step schedule needs it)"
            )
        return cls(
            name=name,  # type: ignore[arg-type]
            warmup_steps=s.integer("warmup_steps", d.warmup_steps, minimum=0),
            min_lr=s.number("min_lr", d.min_lr, low=0.0),
            decay_steps=decay_steps,
            gamma=s.number("gamma", d.gamma, low=0.0, high=1.0, open_low=True),
        )


def _kfac_value(value: object) -> Any:
    """A KFACConfig attribute as a job value: dtypes by name, lists as tuples."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, list):
        return tuple(value)
    return value


def _resolved_kfac(config: KFACConfig) -> dict[str, Any]:
    """Every field of ``config`` as a job value."""
    return {name: _kfac_value(getattr(config, name)) for name in KFAC_FIELDS}


@dataclass(frozen=True, kw_only=True)
class PreconditionerSpec:
    """The K-FAC preconditioner: on or off, and every ``ngd_dist.KFACConfig`` field.

    In YAML the KFACConfig fields sit next to ``enabled`` (``preconditioner: {curvature: ief,
    damping: 1.0e-3}``); after loading, ``kfac`` holds all of them, resolved: ``seed`` defaults to
    the job seed and ``transport`` to ``distributed.transport``, dtypes are names, lists tuples.
    """

    enabled: bool = True
    """False trains with the base optimizer alone."""

    kfac: dict[str, Any] = field(default_factory=lambda: _resolved_kfac(KFACConfig()))
    """Keyword arguments of ``KFACConfig``, every field given (default: KFACConfig's defaults)."""

    def to_kfac_config(self) -> KFACConfig:
        """The ``KFACConfig`` these fields describe."""
        return KFACConfig(**self.kfac)

    @classmethod
    def parse(
        cls, data: object, path: str = "preconditioner", *, seed: int = 0, transport: str = "torch"
    ) -> PreconditionerSpec:
        """Check the ``preconditioner`` section: build the KFACConfig, relabelling its errors."""
        s = Section(data, path, ["enabled", *KFAC_FIELDS])
        enabled = s.flag("enabled", cls.enabled)
        given: dict[str, Any] = {}
        for key, value in s.data.items():
            if key == "enabled":
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
        return cls(enabled=enabled, kfac=_resolved_kfac(config))


def _relabel(message: str, path: str) -> JobError:
    """A KFACConfig error (``"KFACConfig.damping: got ..."``) as ``"preconditioner.damping: got ..."``."""
    match = re.match(r"KFACConfig\.(\w+): (.*)", message, re.DOTALL)
    if match is None:
        return JobError(f"{path}: {message}", path=path)
    key = join(path, match.group(1))
    return JobError(f"{key}: {match.group(2)}", path=key)


@dataclass(frozen=True, kw_only=True)
class PrecisionSpec:
    """Autocast dtype of the forward/backward passes, and gradient scaling."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """``"float32"`` (no autocast), ``"bfloat16"`` or ``"float16"`` (autocast); aliases fp32, bf16,
    fp16 are accepted and stored as the full names."""

    grad_scaler: Literal["auto"] | bool = "auto"
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

    @classmethod
    def parse(cls, data: object, path: str = "precision") -> PrecisionSpec:
        """Check the ``precision`` section of a job."""
        s = Section(data, path, _keys(cls))
        dtype = s.choice("dtype", cls.dtype, DTYPES, _DTYPE_ALIASES)
        scaler = s.data.get("grad_scaler", cls.grad_scaler)
        if scaler != "auto" and not isinstance(scaler, bool):
            raise JobError.invalid(s.where("grad_scaler"), scaler, "auto, true or false")
        return cls(dtype=dtype, grad_scaler=scaler)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """Where and how often to save, how many to keep, and what to resume from."""

    dir: str | None = None
    """Directory of the checkpoints; None saves nothing."""

    every: int = 0
    """Save every this many steps; 0 disables periodic saves (needs ``dir`` otherwise)."""

    keep: int = 3
    """Newest checkpoints kept in ``dir``; older ones are deleted."""

    resume: str = "auto"
    """``"auto"``: resume from the newest checkpoint in ``dir`` if there is one; ``"never"``: start
    afresh; anything else: the path of a checkpoint to resume from (missing is an error at launch)."""

    @classmethod
    def parse(cls, data: object, path: str = "checkpoint") -> CheckpointSpec:
        """Check the ``checkpoint`` section of a job."""
        s = Section(data, path, _keys(cls))
        d = cls()
        directory = s.optional_text("dir", d.dir)
        every = s.integer("every", d.every, minimum=0)
        if every and directory is None:
            raise JobError.invalid(
                s.where("dir"), None, f"a directory, since checkpoint.every={every} asks for saves"
            )
        resume = s.text("resume", d.resume, expected="auto, never, or the path of a checkpoint")
        return cls(dir=directory, every=every, keep=s.integer("keep", d.keep, minimum=1), resume=resume)


@dataclass(frozen=True, kw_only=True)
class MetricsSpec:
    """The Prometheus exporter and the health checks behind it."""

    enabled: bool = True
    """False exports nothing."""

    host: str = "127.0.0.1"
    """Address the HTTP exporter listens on."""

    port: int = 9400
    """Port of rank 0's exporter (others add their rank); 0 disables the HTTP endpoint."""

    stall_seconds: float = 120.0
    """A step taking longer than this marks the job stalled, > 0."""

    quality_every: int = 0
    """Every this many steps, measure the update-quality indicator γ of the iEF paper (Eq. 15) of the
    step's update on a fixed probe batch and export it as ``ngd_quality_gamma``
    (:mod:`ngd_dist.kfac.quality`); 0 disables it. Needs the exporter (``enabled`` and a port);
    costs about one forward and one forward-mode pass over the probe per measurement."""

    quality_probe: int = 32
    """Samples in each rank's probe batch for ``quality_every`` (drawn once from the training data,
    different on each rank), >= 1."""

    @classmethod
    def parse(cls, data: object, path: str = "metrics") -> MetricsSpec:
        """Check the ``metrics`` section of a job."""
        s = Section(data, path, _keys(cls))
        d = cls()
        return cls(
            enabled=s.flag("enabled", d.enabled),
            host=s.text("host", d.host, pattern=r"\S+", expected="a host name or address"),
            port=s.integer(
                "port", d.port, minimum=0, maximum=65535, expected="0 (off) or a port in [1, 65535]"
            ),
            stall_seconds=s.number("stall_seconds", d.stall_seconds, low=0.0, open_low=True),
            quality_every=s.integer("quality_every", d.quality_every, minimum=0),
            quality_probe=s.integer(
                "quality_probe",
                d.quality_probe,
                minimum=1,
                expected="an integer >= 1 (samples in the probe batch)",
            ),
        )


@dataclass(frozen=True, kw_only=True)
class DistributedSpec:
    """How ranks talk: the torch.distributed backend and the preconditioner's transport."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; ``"auto"``: nccl on CUDA, gloo otherwise."""

    transport: Literal["torch", "mpi"] = "torch"
    """Collectives of the preconditioner: over torch.distributed or mpi4py (under mpirun)."""

    timeout_s: float = 300.0
    """Collective timeout in seconds, > 0."""

    @classmethod
    def parse(cls, data: object, path: str = "distributed") -> DistributedSpec:
        """Check the ``distributed`` section of a job."""
        s = Section(data, path, _keys(cls))
        d = cls()
        return cls(
            backend=s.choice("backend", d.backend, BACKENDS),  # type: ignore[arg-type]
            transport=s.choice("transport", d.transport, TRANSPORTS),  # type: ignore[arg-type]
            timeout_s=s.number("timeout_s", d.timeout_s, low=0.0, open_low=True),
        )


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSpec:
    """Settings used when the job is launched with ``--launcher deepspeed``."""

    zero_stage: int = 0
    """ZeRO stage 0 or 1 (optimizer states partitioned). Stages 2 and 3 partition gradients across
    ranks, so no rank holds a layer's full reduced gradient to precondition: rejected while the
    preconditioner is enabled. At launch (``ngd_dist.service.deepspeed_engine.check_job``) stage 3 is
    refused altogether, and stages >= 1 with the layer-wise optimizers lars and lamb."""

    bf16: bool = False
    """DeepSpeed's bf16 mode; requires precision.dtype bfloat16."""

    @classmethod
    def parse(cls, data: object, path: str = "deepspeed") -> DeepSpeedSpec:
        """Check the ``deepspeed`` section of a job (the stage against the preconditioner: ``Job``)."""
        s = Section(data, path, _keys(cls))
        d = cls()
        return cls(
            zero_stage=s.integer("zero_stage", d.zero_stage, minimum=0, maximum=3),
            bf16=s.flag("bf16", d.bf16),
        )


@dataclass(frozen=True, kw_only=True)
class Job:
    """A whole training job: what to train, on what, how, and where its outputs go."""

    seed: int = 0
    """Seed of model initialisation and data order (and of the preconditioner unless it sets one)."""

    name: str = "job"
    """Name of the job in logs, metrics and checkpoints: letters, digits, ``.``, ``_``, ``-``."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    preconditioner: PreconditionerSpec = field(default_factory=PreconditionerSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)

    def kfac_config(self) -> KFACConfig | None:
        """The preconditioner's ``KFACConfig``, or None when the preconditioner is disabled."""
        return self.preconditioner.to_kfac_config() if self.preconditioner.enabled else None

    def lr_at(self, step: int) -> float:
        """Learning rate of the 0-based optimizer ``step`` under the schedule."""
        return self.schedule.lr_at(step, base_lr=self.optimizer.lr, total_steps=self.train.steps)

    @classmethod
    def parse(cls, data: object) -> Job:
        """Check a whole job mapping (sections, then the rules that span them)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise JobError.invalid("", data, "a mapping of sections (model, data, batch, ...)")
        top = Section(data, "", _keys(cls))
        seed = top.integer("seed", cls.seed, minimum=0)
        distributed = DistributedSpec.parse(data.get("distributed"))
        job = cls(
            seed=seed,
            name=top.text("name", cls.name, pattern=_NAME_PATTERN, expected="letters, digits, '.', '_', '-'"),
            model=ModelSpec.parse(data.get("model")),
            data=DataSpec.parse(data.get("data")),
            batch=BatchSpec.parse(data.get("batch")),
            train=TrainSpec.parse(data.get("train")),
            optimizer=OptimizerSpec.parse(data.get("optimizer")),
            schedule=ScheduleSpec.parse(data.get("schedule")),
            preconditioner=PreconditionerSpec.parse(
                data.get("preconditioner"), seed=seed, transport=distributed.transport
            ),
            precision=PrecisionSpec.parse(data.get("precision")),
            checkpoint=CheckpointSpec.parse(data.get("checkpoint")),
            metrics=MetricsSpec.parse(data.get("metrics")),
            distributed=distributed,
            deepspeed=DeepSpeedSpec.parse(data.get("deepspeed")),
        )
        job._check_across()
        return job

    def _check_across(self) -> None:
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


def _to_plain(value: object) -> Any:
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job as plain YAML types (fit for ``yaml.safe_dump``, logs and checkpoints).

    Every key is written, defaults included; ``job_from_dict(job_to_dict(job)) == job``.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if isinstance(value, PreconditionerSpec):
            out[f.name] = {"enabled": value.enabled, **_to_plain(value.kfac)}
        elif dataclasses.is_dataclass(value):
            out[f.name] = {
                g.metadata.get("key", g.name): _to_plain(getattr(value, g.name))
                for g in dataclasses.fields(value)
            }
        else:
            out[f.name] = value
    return out

"""What ``ngd-dist validate`` checks beyond the schema, and ``train`` and ``launch`` check before they start.

The schema (:mod:`ngd_dist.service.jobs.schema`) reads each key on its own. These checks look at
what the keys name, so that a job that passes ``validate`` does not fail at launch with a
traceback:

- **the machine** (:class:`Machine`): ``distributed.backend: nccl`` needs CUDA; a job that autocasts
  on a machine without CUDA runs (PyTorch's CPU autocast), but slowly: that is a note, not an error.
  Nothing here initialises CUDA (only ``torch.cuda.is_available()`` is asked). ``--target gpu`` or
  ``--target cpu`` checks for another machine instead: this one's CUDA and installed extras are not
  looked at.
- **the optional extras**: ``distributed.transport: mpi`` and ``--launcher mpirun`` need mpi4py (the
  ``mpi`` extra), ``--launcher deepspeed`` needs DeepSpeed (the ``deepspeed`` extra),
  ``metrics.tensorboard: true`` the ``tensorboard`` extra.
- **the model**: the factory is imported and called with ``model.args`` on PyTorch's ``meta``
  device, which allocates no memory and initialises nothing, so a model of any size is built
  without memory, usually in milliseconds (a built-in's arguments are checked by name and type
  first). A factory that cannot
  run on the meta device (it reads tensor values, e.g. ``.item()``) is built on the CPU for real
  by ``validate`` (costing what the training's own build costs) and left to the training's build by
  ``train`` and ``launch``. ``preconditioner.output_module`` must name one of the built model's
  submodules (or the model must declare one, when the curvature needs the logits).
- **the data**: a ``package.module:factory`` is imported and its arguments checked against its
  signature (a built-in's by name and type); the data itself is not read. On this machine, a
  built-in's extra is checked (``image_folder``: Pillow, ``hf_files``: ``datasets``) and
  ``hf_files``' files must exist; other missing data files are the workers' one-line error, at
  their start.

Every problem is a :class:`~ngd_dist.service.jobs.errors.JobError` naming the key: one line, exit 2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ngd_dist.service import catalog
from ngd_dist.service.jobs.errors import JobError, clip
from ngd_dist.service.jobs.schema import Job

TARGETS = ("here", "cpu", "gpu")
"""``--target`` of ``ngd-dist validate``: this machine, or another one with (gpu) or without CUDA (cpu)."""

EXTRAS = catalog.EXTRA_MODULES
"""The optional extras of ``pyproject.toml`` the service checks for, and the module each installs."""

_MAX_LISTED = 12
"""Most submodule names an ``output_module`` error lists."""


@dataclass(frozen=True)
class Machine:
    """The machine a job is checked for: whether it has CUDA, and whether the packages installed
    here are its packages (only when it is this machine).
    """

    cuda: bool
    here: bool
    """This machine: its installed extras and files are the job's."""

    @classmethod
    def target(cls, name: str = "here") -> Machine:
        """The machine ``--target NAME`` describes (:data:`TARGETS`)."""
        if name not in TARGETS:
            raise ValueError(f"--target: got {name!r}; expected one of {', '.join(TARGETS)}")
        if name == "here":
            return cls(cuda=torch.cuda.is_available(), here=True)
        return cls(cuda=name == "gpu", here=False)

    @property
    def where(self) -> str:
        """``"this machine"`` or ``"the target machine"``, for messages."""
        return "this machine" if self.here else "the target machine"


def missing_extra(extra: str, what: str) -> str | None:
    """The one-line refusal of ``what`` (``"--launcher deepspeed"``) when the module of ``extra``
    (:data:`EXTRAS`) is not installed; None when it is.
    """
    return catalog.missing_extra(extra, what)


def check_launcher(launcher: str | None, machine: Machine) -> None:
    """JobError when ``launcher`` (``"mpirun"``, ``"deepspeed"``; None or ``"torchrun"``: nothing to
    check) needs an extra that is not installed here.
    """
    if not machine.here or launcher not in ("mpirun", "deepspeed"):
        return
    missing = missing_extra("mpi" if launcher == "mpirun" else "deepspeed", f"--launcher {launcher}")
    if missing is not None:
        raise JobError(missing)


def check_machine(job: Job, machine: Machine, *, hint: str = "") -> list[str]:
    """JobError when ``job`` cannot run on ``machine``; the notes (lines) on what will run slowly.

    ``hint`` is appended to a refusal (``validate`` names ``--target gpu`` there).
    """
    notes: list[str] = []
    if job.distributed.backend == "nccl" and not machine.cuda:
        raise JobError(
            f"distributed.backend: got 'nccl', which needs CUDA, and {machine.where} does not have it; "
            f"expected gloo or auto here{hint}",
            path="distributed.backend",
        )
    if job.precision.autocast and not machine.cuda:
        notes.append(
            f"precision.dtype {job.precision.dtype} without CUDA: autocast runs on the CPU, usually slower "
            "than float32"
        )
    if machine.here and job.distributed.transport == "mpi":
        missing = missing_extra("mpi", "distributed.transport: mpi")
        if missing is not None:
            raise JobError(missing, path="distributed.transport")
    if machine.here and job.metrics.tensorboard:
        missing = missing_extra("tensorboard", "metrics.tensorboard: true")
        if missing is not None:
            raise JobError(missing, path="metrics.tensorboard")
    return notes


def _as_job_error(exc: ValueError) -> JobError:
    """A catalog ``ValueError`` (``"model.args.hidden: ..."``) as a JobError at its key path."""
    text = str(exc)
    match = re.match(r"([A-Za-z_][\w.\[\]]*):", text)
    return JobError(text, path=match.group(1) if match else "")


def _meta_only(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the meta device refusing an operation, not a real error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NotImplementedError) or "meta" in str(seen).lower():
            return True
        seen = seen.__cause__
    return False


@dataclass(frozen=True)
class ModelCheck:
    """What checking the model found: its size and logits module, or why it was not built."""

    parameters: int | None
    """Parameters of the built model (None when it was not built)."""
    output_module: str | None
    """The logits module the preconditioner will use (None: none known, or not built)."""
    note: str
    """One line for ``validate`` to print."""


def _build(job: Job, import_paths: Sequence[str], *, real_fallback: bool) -> nn.Module | None:
    """The job's model on the meta device; on the CPU when it cannot be built there and
    ``real_fallback``; None when it was not built (the training's build will tell).
    """
    name, args = job.model.name, job.model.args
    try:
        with torch.device("meta"):
            return catalog.build_model(name, args, import_paths=import_paths)
    except ValueError as exc:
        if not _meta_only(exc):
            raise _as_job_error(exc) from None
    if not real_fallback:
        return None
    try:
        return catalog.build_model(name, args, import_paths=import_paths)
    except ValueError as exc:
        raise _as_job_error(exc) from None


def _submodules(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n]
    more = f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    listed = ", ".join(names[:_MAX_LISTED]) + more
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = f"its last Linear is {linears[-1]!r}; " if linears else ""
    return f"{last}submodules: {clip(listed, 300)}"


def check_model(job: Job, import_paths: Sequence[str] = (), *, real_fallback: bool = True) -> ModelCheck:
    """Build the job's model (see the module docstring) and check the preconditioner's logits module.

    JobError naming ``model.name``, ``model.args[.<arg>]`` or ``preconditioner.output_module``.
    """
    model = _build(job, import_paths, real_fallback=real_fallback)
    name = job.model.name
    if model is None:
        return ModelCheck(None, None, f"model {name}: not built here (it needs real tensors): built at start")
    try:
        catalog.task_of(name, model)
        declared = catalog.output_module_of(name, model)
    except ValueError as exc:
        raise _as_job_error(exc) from None
    parameters = sum(p.numel() for p in model.parameters())
    config = job.kfac_config()
    logits = None
    if config is not None:
        modules = dict(model.named_modules())
        logits = config.output_module if config.output_module is not None else declared
        if config.output_module is not None and config.output_module not in modules:
            raise JobError.invalid(
                "preconditioner.output_module",
                config.output_module,
                f"the name of a submodule of model {name} ({_submodules(model)})",
            )
        if logits is None and config.curvature.needs_logits:
            raise JobError.invalid(
                "preconditioner.output_module",
                None,
                f"the name of the module producing the logits of model {name}, which the curvature "
                f"{config.curvature.value!r} needs ({_submodules(model)})",
            )
    where = f"; logits module {logits!r}" if logits is not None else ""
    return ModelCheck(parameters, logits, f"model {name}: {parameters:,} parameters{where}")


def check_data(job: Job, import_paths: Sequence[str] = (), *, here: bool = True) -> None:
    """Import the job's data factory and check its arguments; the data itself is not read.

    ``here``: the job runs on this machine, so a built-in's files and extra are checked too
    (``hf_files``: its files exist; ``image_folder``, ``hf_files``: Pillow, ``datasets``).
    JobError naming ``data.name`` or ``data.args[.<arg>]``.
    """
    name, args = job.data.name, dict(job.data.args)
    try:
        # The catalog's own resolution and argument checks, without calling the factory.
        data = catalog.check_data_factory(name, args, import_paths)
        spec, kwargs = data.builtin, data.kwargs
        if spec is not None and here:
            if spec.check is not None:
                spec.check(**kwargs)
            missing = catalog.missing_data_extra(name)
            if missing is not None:
                raise ValueError(missing)
    except ValueError as exc:
        raise _as_job_error(exc) from None


def check_job(
    job: Job,
    *,
    machine: Machine,
    import_paths: Sequence[str] = (),
    launcher: str | None = None,
    real_fallback: bool = True,
    hint: str = "",
) -> list[str]:
    """Every check of the module docstring, cheapest first; the notes for ``validate`` to print.

    ``launcher``: the launcher that will start the workers (its extra is checked). Raises JobError
    on the first problem.
    """
    check_launcher(launcher, machine)
    notes = check_machine(job, machine, hint=hint)
    notes.append(check_model(job, import_paths, real_fallback=real_fallback).note)
    check_data(job, import_paths, here=machine.here)
    return notes

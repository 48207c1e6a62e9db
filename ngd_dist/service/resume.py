"""What ``checkpoint.resume`` names, whether its files are there, and whether its job fits this one.

``checkpoint.resume`` names a directory of per-rank files and, maybe, a step of it
(:func:`resume_source`): ``auto`` (the newest step of ``checkpoint.dir`` that loads on every rank;
none there: start afresh), a step (``40``: step 40 of ``checkpoint.dir``), a directory (its newest
step that loads on every rank), or a file of a run (``DIR/step-00000040.rank0-of2.pt``: step 40 of
``DIR``). Every rank loads its own rank's file of that step.

Before a worker loads anything, and in ``ngd-dist validate``, :func:`check_files` refuses in one line
naming ``checkpoint.resume`` an explicit step, directory or file that is missing or lacks a rank's
file, and files written by another number of ranks. Before a worker restores a state,
:func:`job_changes` compares the job the checkpoint recorded with this one: what may change on
resume is :data:`MAY_CHANGE` (how long to train, how often to log, evaluate and save, where the
metrics go); any other difference is refused by :func:`refusal`, in one line listing the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngd_dist.service.checkpoint.store import list_checkpoints, parse_name
from ngd_dist.service.jobs import Job, JobError, job_from_dict, job_to_dict
from ngd_dist.service.jobs.errors import show
from ngd_dist.service.jobs.schema import CheckpointSpec

FIELD = "checkpoint.resume"

MAY_CHANGE: tuple[str, ...] = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.max_bad_steps",
    "name",
    "checkpoint.*",
    "metrics.*",
    "distributed.timeout_s",
)
"""Keys of a job (``section.*``: every key of the section) that may differ from the job a
checkpoint recorded: how long to train, how often to log, evaluate and save, where the metrics go.
Anything else (model, data, batch, optimizer, schedule, preconditioner, precision, seed, backend,
deepspeed) must match."""

_SHOWN_CHANGES = 8
_UNSET = object()


@dataclass(frozen=True)
class ResumeSource:
    """Where the checkpoint to resume from is."""

    directory: Path
    """The directory of a run's per-rank files."""
    step: int | None
    """The step named; None for the newest step whose files load on every rank."""
    explicit: bool
    """False for ``auto``: a directory without checkpoints means starting afresh, not an error."""


def resume_error(problem: str) -> JobError:
    """``checkpoint.resume: <problem>``: the one-line error of a resume that cannot be done (exit 2)."""
    return JobError(f"{FIELD}: {problem}", path=FIELD)


def resume_source(spec: CheckpointSpec) -> ResumeSource | None:
    """Where ``spec.resume`` points; None when nothing is to be resumed (``never``, or ``auto``
    without ``dir``). JobError for a path that is neither a directory nor a checkpoint file.
    """
    resume = spec.resume
    if resume == "never" or (resume == "auto" and spec.dir is None):
        return None
    if resume == "auto" and spec.dir is not None:
        return ResumeSource(Path(spec.dir), None, explicit=False)
    if isinstance(resume, int):
        if spec.dir is None:  # the schema refuses it; kept for jobs built by hand
            raise resume_error(f"step {resume} needs checkpoint.dir to find it in")
        return ResumeSource(Path(spec.dir), resume, explicit=True)
    path = Path(resume)
    if path.is_dir():
        return ResumeSource(path, None, explicit=True)
    parsed = parse_name(path.name)
    if parsed is not None:  # the file of one rank names the step; each rank loads its own
        return ResumeSource(path.parent, parsed[0], explicit=True)
    if not path.exists():
        raise resume_error(
            f"{path} does not exist; expected a step of checkpoint.dir, a directory or a file of one"
        )
    raise resume_error(
        f"{path} is not a checkpoint file; expected a file named step-NNNNNNNN.rankR-ofW.pt (the step "
        "is read from its name: each rank loads its own rank's file) or a directory of them"
    )


def _listed(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[-10:])
    return ("..., " if len(steps) > 10 else "") + shown if steps else "none"


def check_files(source: ResumeSource, world_size: int | None) -> None:
    """JobError (one line naming ``checkpoint.resume``) unless ``source``'s files are there for
    ``world_size`` ranks (for some world size when None: ``ngd-dist validate`` without
    ``batch.global``). Only names are looked at: a damaged file is found when it is loaded.
    """
    directory = source.directory
    if not directory.is_dir():
        if source.explicit:
            what = "does not exist" if not directory.exists() else "is not a directory"
            raise resume_error(f"{directory} {what}; expected a directory of checkpoints")
        return
    found = list_checkpoints(directory)
    if source.step is None:
        if world_size is not None and found and not any(w == world_size for _, w in found):
            step, other = max(found)  # the newest step, written by another number of ranks
            raise refusal(step, directory, [f"world size {other} -> {world_size}"])
        if source.explicit and not _complete(found, None, world_size):
            ranks = f" of {world_size} rank(s)" if world_size is not None else ""
            held = "no checkpoints" if not found else f"no step with the files of every rank{ranks}"
            raise resume_error(f"{directory} holds {held} (step-NNNNNNNN.rankR-ofW.pt files)")
        return
    step = source.step
    at_step = {w: ranks for (s, w), ranks in found.items() if s == step}
    if not at_step:
        steps = sorted({s for s, _ in found})
        raise resume_error(f"no checkpoint of step {step} in {directory} (steps there: {_listed(steps)})")
    if world_size is not None and world_size not in at_step:
        raise refusal(step, directory, [f"world size {max(at_step)} -> {world_size}"])
    if not _complete(found, step, world_size):
        world = world_size if world_size is not None else max(at_step)
        missing = sorted(set(range(world)) - at_step[world])
        which = f"the file of rank {missing[0]}"
        if len(missing) > 1:
            which = f"the files of ranks {_listed(missing)}"
        raise resume_error(f"step {step} in {directory} lacks {which} of {world}")


def _complete(
    found: Mapping[tuple[int, int], frozenset[int]], step: int | None, world_size: int | None
) -> bool:
    """Whether some step (``step`` when given) has the file of every rank (of ``world_size``)."""
    return any(
        ranks == frozenset(range(w))
        for (s, w), ranks in found.items()
        if (step is None or s == step) and (world_size is None or w == world_size)
    )


def check_resume(spec: CheckpointSpec, world_size: int | None) -> None:
    """What ``ngd-dist validate`` checks: an explicit resume names files that are there (see
    :func:`check_files`); ``world_size`` is the one ``batch.global`` implies, if any.
    """
    source = resume_source(spec)
    if source is not None:
        check_files(source, world_size)


def _flat(value: object, path: str = "") -> dict[str, Any]:
    """A job mapping as ``{"model.args.hidden": 128, ...}`` (lists and scalars are leaves)."""
    if not isinstance(value, Mapping):
        return {path: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{path}.{key}" if path else str(key)))
    return out


def _may_change(key: str) -> bool:
    """Whether ``key`` (dotted) is one of :data:`MAY_CHANGE`."""
    return any(key.startswith(a[:-1]) if a.endswith(".*") else key == a for a in MAY_CHANGE)


def _normalised(recorded: Mapping[str, Any]) -> Mapping[str, Any]:
    """The recorded job with the defaults of keys added since it was written (as it is when this
    version cannot read it: then every key it lacks shows as unset).
    """
    try:
        return job_to_dict(job_from_dict(recorded, "the checkpoint's job"))
    except JobError:
        return recorded


def job_changes(recorded: Mapping[str, Any], job: Job) -> list[str]:
    """``"model.args.hidden 128 -> 64"`` for each key, in job order, whose value differs between the
    job a checkpoint ``recorded`` and ``job``, except those of :data:`MAY_CHANGE`.
    """
    old, new = _flat(_normalised(recorded)), _flat(job_to_dict(job))
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if _may_change(key) or before == after:
            continue
        changes.append(f"{key} {_value(before)} -> {_value(after)}")
    return changes


def _value(value: object) -> str:
    return "(unset)" if value is _UNSET else show(value, 40)


def refusal(step: int, directory: Path, changes: list[str]) -> JobError:
    """The one line refusing to resume from ``step`` of ``directory``: what changed, what may."""
    listed = "; ".join(changes[:_SHOWN_CHANGES])
    if len(changes) > _SHOWN_CHANGES:
        listed += f"; and {len(changes) - _SHOWN_CHANGES} more"
    return resume_error(
        f"the checkpoint at step {step} in {directory} was written by a different job: {listed} (only "
        f"{', '.join(MAY_CHANGE)} may change on resume; resume with the job that wrote it, or start "
        "afresh with checkpoint.resume=never or another checkpoint.dir)"
    )

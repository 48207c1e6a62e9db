"""Taking a run's trained weights elsewhere: ``ngd-dist export CHECKPOINT_OR_DIR --out FILE``.

A checkpoint of the service (:mod:`ngd_dist.service.checkpoint.store`) is one file per rank,
``step-XXXXXXXX.rankR-of-W.pt``, verified (trailer, size, SHA-256) before it is loaded with
``torch.load(weights_only=True)``. The model's weights are the same on every rank, so rank 0's
file is read: given a directory, its newest step whose rank-0 file verifies (damaged newer files
are skipped and named); given a file, that file (any rank's).

What is written:

- ``FILE`` (``--format safetensors``, the default): the model's state dict as safetensors, every
  tensor as it was trained (dtype kept), tensors that shared memory (tied weights) written once
  each, a ``module.`` prefix (a DistributedDataParallel wrapper) stripped; the header's metadata
  holds ``format: pt``, the step and the job's name. ``--format pt``: the same state dict saved
  with ``torch.save`` (loads with ``torch.load(FILE, weights_only=True)``).
- ``FILE`` with the suffix ``.json`` (``model.safetensors`` -> ``model.json``): the sidecar, with
  the step, the world size, the checkpoint read, the number of tensors and parameters, and the job
  the checkpoint recorded (every key), whose ``model.name`` and ``model.args`` rebuild the model::

      model = build_model(job["model"]["name"], job["model"]["args"])
      model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

Both are written to a temporary name and renamed into place. A checkpoint that is missing,
damaged or not the service's is a :class:`~ngd_dist.service.checkpoint.CheckpointError`, and a
state without model weights or an ``--out`` that cannot be written an :class:`ExportError`: one
line each, exit 2.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ngd_dist.service.checkpoint import CheckpointError, CheckpointStore
from ngd_dist.service.checkpoint.store import list_checkpoints, parse_name

FORMATS = ("safetensors", "pt")
"""What ``--format`` can write."""

_DDP_PREFIX = "module."


class ExportError(ValueError):
    """A checkpoint that holds no model weights to export, or an output that cannot be written."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_checkpoint` read and wrote."""

    checkpoint: Path
    """The checkpoint file read."""
    step: int
    world_size: int
    out: Path
    sidecar: Path
    tensors: int
    parameters: int
    """Elements of every tensor written."""
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoint files of the directory that did not verify, with why."""

    def summary(self) -> str:
        """One line for the command line."""
        return (
            f"exported step {self.step} ({self.tensors} tensors, {self.parameters:,} values) from "
            f"{self.checkpoint} to {self.out} (job and step in {self.sidecar})"
        )


def _load(path: Path) -> dict[str, Any]:
    """A verified checkpoint file's state (CheckpointError naming it otherwise)."""
    parsed = parse_name(path.name)
    rank, world_size = (parsed[1], parsed[2]) if parsed is not None and parsed[1] < parsed[2] else (0, 1)
    return CheckpointStore(path.parent, rank=rank, world_size=world_size).load(path)


def read_checkpoint(source: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], list[str]]:
    """The checkpoint file ``source`` names (a file, or a directory's newest rank-0 file that
    verifies), its state, and the newer files of the directory that were skipped (with why).

    CheckpointError when there is none, or the file named does not verify.
    """
    path = Path(source)
    if path.is_file():
        return path, _load(path), []
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    candidates = sorted(
        ((step, world) for (step, world), ranks in list_checkpoints(path).items() if 0 in ranks),
        reverse=True,
    )
    skipped: list[str] = []
    for step, world in candidates:
        file = path / f"step-{step:08d}.rank0-of{world}.pt"
        try:
            return file, _load(file), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    if skipped:
        raise CheckpointError(
            f"checkpoint directory {path}: none of its {len(skipped)} rank-0 files verifies; the newest: "
            f"{skipped[0]}"
        )
    raise CheckpointError(f"checkpoint directory {path}: holds no checkpoint (step-*.rank0-of*.pt)")


def model_state(state: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The model's state dict in a checkpoint's ``state``, without a DDP ``module.`` prefix."""
    model = state.get("model")
    if not isinstance(model, Mapping) or not model:
        raise ExportError(f"checkpoint {source}: holds no model weights (no 'model' state dict)")
    keys = [str(k) for k in model]
    if all(k.startswith(_DDP_PREFIX) for k in keys):
        return {k[len(_DDP_PREFIX) :]: v for k, v in zip(keys, model.values(), strict=True)}
    return dict(zip(keys, model.values(), strict=True))


def _tensors(weights: Mapping[str, Any], source: Path) -> dict[str, Tensor]:
    """``weights`` as contiguous tensors, each tensor that shares memory with an earlier one cloned
    (safetensors writes no shared storage); ExportError for an entry that is not a tensor.
    """
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in weights.items():
        if not isinstance(value, Tensor):
            raise ExportError(
                f"checkpoint {source}: model entry {key!r} is a {type(value).__name__}, not a tensor; "
                "safetensors holds tensors only (--format pt keeps it)"
            )
        tensor = value.detach().contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and where in seen:
            tensor = tensor.clone()
        seen.add(where)
        out[key] = tensor
    return out


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in its directory, renamed into place."""
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def export_checkpoint(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, fmt: str = "safetensors"
) -> Exported:
    """Write the model weights of the checkpoint ``source`` to ``out`` in ``fmt``, and the sidecar.

    See the module docstring. Raises CheckpointError or ExportError (one line each).
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format: got {fmt!r}; expected one of {', '.join(FORMATS)}")
    target = Path(out)
    sidecar = target.with_suffix(".json")
    if sidecar == target:
        raise ExportError(f"--out: got {str(target)!r}; expected a weights file, not .json (the sidecar's)")
    if not target.parent.is_dir():
        raise ExportError(f"--out: the directory {str(target.parent)!r} of {str(target)!r} does not exist")
    file, state, skipped = read_checkpoint(source)
    weights = model_state(state, file)
    step = state.get("step")
    footer = parse_name(file.name)
    step = int(step) if isinstance(step, int) else footer[0] if footer is not None else -1
    world_size = footer[2] if footer is not None else 1
    job = state.get("job") if isinstance(state.get("job"), Mapping) else None
    tensors = {k: v for k, v in weights.items() if isinstance(v, Tensor)}
    try:
        if fmt == "safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise ExportError(
                    "--format safetensors needs the safetensors package: pip install safetensors "
                    "(or use --format pt)"
                ) from None
            name = job.get("name") if job is not None else None
            metadata = {"format": "pt", "ngd_dist.step": str(step), "ngd_dist.job": str(name or "")}
            tensors = _tensors(weights, file)
            _write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        else:
            plain = {k: v.detach() if isinstance(v, Tensor) else v for k, v in weights.items()}
            _write(target, lambda tmp: torch.save(plain, tmp))
        record = {
            "format": fmt,
            "weights": target.name,
            "step": step,
            "world_size": world_size,
            "checkpoint": str(file.resolve()),
            "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "job": job,
        }
        text = json.dumps(record, indent=2, default=str) + "\n"
        _write(sidecar, lambda tmp: _write_text(tmp, text))
    except OSError as exc:
        raise ExportError(f"--out: cannot write {str(target)!r}: {exc.strerror or exc}") from None
    return Exported(
        checkpoint=file,
        step=step,
        world_size=world_size,
        out=target,
        sidecar=sidecar,
        tensors=len(tensors),
        parameters=sum(t.numel() for t in tensors.values()),
        skipped=skipped,
    )

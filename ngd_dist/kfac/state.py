"""Saving and restoring the layers' factors: what a preconditioner checkpoint holds.

Entries are keyed ``"<layer>/<a|g>"`` (the running factor, on its owner), plus
``"<layer>/<f>/decomposed_from"`` (the factor the current decomposition came from, when a fold
happened since) and ``"<layer>/<f>/decomposed_shift"`` (its damping shift). Decompositions are
recomputed from these on load, so the step after a restore is identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ngd_dist.kfac.layer import FACTORS, KFACLayer
from ngd_dist.kfac.linalg import decompose

KINDS = ("", "decomposed_from", "decomposed_shift")


def factors_state(layers: Sequence[KFACLayer]) -> dict[str, Tensor | float]:
    """The factor entries of ``layers`` held on this rank."""
    out: dict[str, Tensor | float] = {}
    for layer in layers:
        for f in FACTORS:
            factor, name = layer.factors[f], f"{layer.name}/{f}"
            if factor.running is not None:
                out[name] = factor.running
            if factor.decomposition is not None and factor.decomposed_from is not None:
                if factor.decomposed_from is not factor.running:
                    out[f"{name}/decomposed_from"] = factor.decomposed_from
                out[f"{name}/decomposed_shift"] = factor.decomposed_shift
    return out


def check_factors_state(layers: Sequence[KFACLayer], entries: dict[str, Any]) -> None:
    """Raise ValueError naming the first entry that does not fit ``layers``."""
    by_name = {layer.name: layer for layer in layers}
    for name, value in entries.items():
        layer_name, _, rest = name.partition("/")
        factor, _, kind = rest.partition("/")
        if layer_name not in by_name or factor not in FACTORS or kind not in KINDS:
            raise ValueError(f"KFAC state: factors.{name} is not a factor of this model's registered layers")
        if kind == "decomposed_shift":
            continue
        want = by_name[layer_name].shape(factor)
        if not isinstance(value, Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"KFAC state: factors.{name} has shape {got}; expected {want}")


def load_factors_state(
    layers: Sequence[KFACLayer],
    entries: dict[str, Any],
    traces: dict[str, float | None],
    method: str,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Restore running factors and traces, and recompute the decompositions they had."""
    for layer in layers:
        for f in FACTORS:
            factor, name = layer.factors[f], f"{layer.name}/{f}"
            factor.running = entries[name].to(device) if name in entries else None
            factor.trace = traces[name]
            factor.decomposition, factor.decomposed_from = None, None
            if f"{name}/decomposed_shift" not in entries:
                continue
            source = entries.get(f"{name}/decomposed_from")
            source = source.to(device) if source is not None else factor.running
            shift = float(entries[f"{name}/decomposed_shift"])
            assert source is not None, f"{name}: a decomposition without a factor"
            result, _ = decompose(source, method, shift, dtype)
            factor.decomposition, factor.decomposed_from, factor.decomposed_shift = result, source, shift

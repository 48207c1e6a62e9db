"""Which modules of a model the preconditioner handles, and why the others are left out."""

from __future__ import annotations

import re

from torch import nn

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.curvature.modules import MATHS, type_name, unsupported_reason
from ngd_dist.kfac.layer import KFACLayer


def register_layers(model: nn.Module, config: KFACConfig) -> tuple[list[KFACLayer], dict[str, str]]:
    """Find the layers to precondition, in module order.

    Also returns ``{name: reason}`` for modules of a supported type that are left to the base
    optimizer (excluded by the config, or unsupported).
    """
    layers: list[KFACLayer] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = type_name(module)
        if not kind:
            continue
        if kind not in config.layer_types:
            skipped[name] = f"type {kind} not in layer_types"
            continue
        if config.include and not any(re.search(p, name) for p in config.include):
            skipped[name] = "matches no include pattern"
            continue
        if any(re.search(p, name) for p in config.skip):
            skipped[name] = "matches a skip pattern"
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            skipped[name] = reason
            continue
        layers.append(KFACLayer(name=name, module=module, math=MATHS[kind]))
    return layers, skipped

"""Which modules of a model the preconditioner handles, and why each of the others is left out.

Nothing is left out silently: every module of a known type that is not preconditioned, and every
module of an unknown type that holds trainable parameters of its own, gets a reason in ``skipped``.

**Tied weights.** When several registered modules share one weight (a language model's token
embedding and its output head, say), the weight is preconditioned once, by one of them: the module
named ``KFACConfig.output_module`` when it is one of them, else the last in module order (for a
tied LM that is the head). Its factors are that module's; the gradient it preconditions is the
weight's ``.grad``, in which autograd has already summed every use. The others are listed in
``skipped`` as tied to it and the KL clip counts the weight once.
"""

from __future__ import annotations

import re

from torch import nn

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.curvature.types import layer_type_of, unsupported_reason
from ngd_dist.kfac.layer import KFACLayer


def register_layers(model: nn.Module, config: KFACConfig) -> tuple[list[KFACLayer], dict[str, str]]:
    """Find the layers to precondition, in module order.

    Also returns ``{name: reason}`` for every module that is left to the base optimizer although
    it has trainable parameters (or a known type): excluded by the config, unsupported, frozen,
    of an unknown type, or tied to another layer (``"(model)"`` names the model itself).
    """
    layers: list[KFACLayer] = []
    skipped: dict[str, str] = {}
    types = config.layer_types or ()
    for name, module in model.named_modules():
        label = name or "(model)"
        kind = layer_type_of(module)
        if kind is None:
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                skipped[label] = (
                    f"type {type(module).__name__} has no K-FAC form here ({', '.join(own)} left to "
                    "the optimizer; see register_layer_type)"
                )
            continue
        if kind.name not in types:
            skipped[label] = f"type {kind.name} not in layer_types"
            continue
        if config.include and not any(re.search(p, name) for p in config.include):
            skipped[label] = "matches no include pattern"
            continue
        if any(re.search(p, name) for p in config.skip):
            skipped[label] = "matches a skip pattern"
            continue
        reason = unsupported_reason(module, kind)
        if reason is not None:
            skipped[label] = reason
            continue
        math = kind.math
        a_dim, g_dim = math.a_dim(module), math.g_dim(module)
        layers.append(
            KFACLayer(
                name=name,
                module=module,
                math=math,
                kind=kind.name,
                diagonal_a=math.diagonal_a or a_dim > config.max_factor_dim,
                diagonal_g=math.elementwise or g_dim > config.max_factor_dim,
            )
        )
    return _untie(layers, skipped, config.output_module), skipped


def _untie(layers: list[KFACLayer], skipped: dict[str, str], output_module: str | None) -> list[KFACLayer]:
    """Keep one layer per shared weight (see the module docstring); list the others in ``skipped``."""
    groups: dict[int, list[KFACLayer]] = {}
    for layer in layers:
        groups.setdefault(id(layer.math.params(layer.module)[0]), []).append(layer)
    dropped: set[str] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        named = [la for la in group if la.name == output_module]
        keeper = named[0] if named else group[-1]
        others = [la for la in group if la is not keeper]
        keeper.tied = tuple(la.name for la in others)
        for la in others:
            dropped.add(la.name)
            skipped[la.name] = (
                f"tied to {keeper.name}: the shared weight is preconditioned once, with its factors"
            )
    return [la for la in layers if la.name not in dropped]

"""Per-layer curvature statistics: module maths (Kronecker-factored, element-wise) and their registry."""

from ngd_dist.kfac.curvature.modules import LinearMath, ModuleMath, TransposedLinearMath
from ngd_dist.kfac.curvature.norms import ElementwiseMath
from ngd_dist.kfac.curvature.types import (
    BUILTIN_TYPES,
    LayerType,
    layer_type_names,
    layer_type_of,
    register_layer_type,
    unregister_layer_type,
    unsupported_reason,
)

__all__ = [
    "BUILTIN_TYPES",
    "ElementwiseMath",
    "LayerType",
    "LinearMath",
    "ModuleMath",
    "TransposedLinearMath",
    "layer_type_names",
    "layer_type_of",
    "register_layer_type",
    "unregister_layer_type",
    "unsupported_reason",
]

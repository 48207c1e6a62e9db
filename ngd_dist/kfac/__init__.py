"""The K-FAC library: a preconditioner for any PyTorch training loop (plain, DDP or DeepSpeed).

Nothing here imports the training service (:mod:`ngd_dist.service`); ``make lint`` checks it.
"""

from ngd_dist.kfac.capture import statistics_paused
from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.curvature import (
    ElementwiseMath,
    LinearMath,
    ModuleMath,
    register_layer_type,
    unregister_layer_type,
)
from ngd_dist.kfac.exact_ief import ExactIEF, exact_ief_direction, per_sample_gradients
from ngd_dist.kfac.linalg import DecompositionError
from ngd_dist.kfac.preconditioner import KFACPreconditioner, KFACStats

__all__ = [
    "DecompositionError",
    "ElementwiseMath",
    "ExactIEF",
    "KFACConfig",
    "KFACPreconditioner",
    "KFACStats",
    "LinearMath",
    "ModuleMath",
    "exact_ief_direction",
    "per_sample_gradients",
    "register_layer_type",
    "statistics_paused",
    "unregister_layer_type",
]

"""ngd_dist: distributed natural-gradient (K-FAC with EF / sampled-Fisher / iEF curvature) training."""

from ngd_dist.config import KFACConfig
from ngd_dist.exact_ief import ExactIEF, exact_ief_direction, per_sample_gradients
from ngd_dist.preconditioner import KFACPreconditioner, KFACStats

__all__ = [
    "ExactIEF",
    "KFACConfig",
    "KFACPreconditioner",
    "KFACStats",
    "exact_ief_direction",
    "per_sample_gradients",
]

__version__ = "0.1.0"

"""ngd_dist: distributed natural-gradient (K-FAC with EF / sampled-Fisher / iEF curvature) training.

Two layers: :mod:`ngd_dist.kfac`, the library (a preconditioner for your own loop), and
:mod:`ngd_dist.service`, the training service behind the ``ngd-dist`` command, which uses it.
"""

from ngd_dist.kfac import (
    DecompositionError,
    ExactIEF,
    KFACConfig,
    KFACPreconditioner,
    KFACStats,
    exact_ief_direction,
    per_sample_gradients,
    register_layer_type,
)

__all__ = [
    "DecompositionError",
    "ExactIEF",
    "KFACConfig",
    "KFACPreconditioner",
    "KFACStats",
    "exact_ief_direction",
    "per_sample_gradients",
    "register_layer_type",
]

__version__ = "0.1.0"

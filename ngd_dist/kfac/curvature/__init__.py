"""Per-layer curvature statistics: module maths, hooks, and EF / MC / iEF weighting."""

from ngd_dist.kfac.curvature.modules import MATHS, ModuleMath, type_name, unsupported_reason

__all__ = ["MATHS", "ModuleMath", "type_name", "unsupported_reason"]

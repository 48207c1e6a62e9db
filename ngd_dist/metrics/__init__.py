"""Per-rank Prometheus metrics of a training worker (``/metrics`` and ``/healthz``)."""

from ngd_dist.metrics.exporter import (
    COMM_KINDS,
    PHASES,
    MetricsExporter,
    MetricsPortError,
    PreconditionerLike,
)
from ngd_dist.metrics.quality import Quality, QualityProbe, quality_indicator
from ngd_dist.metrics.timing import PhaseClock

__all__ = [
    "COMM_KINDS",
    "PHASES",
    "MetricsExporter",
    "MetricsPortError",
    "PhaseClock",
    "PreconditionerLike",
    "Quality",
    "QualityProbe",
    "quality_indicator",
]

"""Per-rank Prometheus metrics of a training worker (``/metrics`` and ``/healthz``)."""

from ngd_dist.service.metrics.exporter import (
    COMM_KINDS,
    PHASES,
    MetricsExporter,
    MetricsPortError,
    PreconditionerLike,
)

__all__ = ["COMM_KINDS", "PHASES", "MetricsExporter", "MetricsPortError", "PreconditionerLike"]

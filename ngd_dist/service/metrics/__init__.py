"""Per-rank Prometheus metrics of a training worker (``/metrics`` and ``/healthz``)."""

from ngd_dist.service.metrics.exporter import (
    COMM_KINDS,
    NONFINITE_GRADIENT,
    NONFINITE_LOSS,
    PHASES,
    SKIP_REASONS,
    MetricsExporter,
    MetricsPortError,
    PreconditionerLike,
)

__all__ = [
    "COMM_KINDS",
    "NONFINITE_GRADIENT",
    "NONFINITE_LOSS",
    "PHASES",
    "SKIP_REASONS",
    "MetricsExporter",
    "MetricsPortError",
    "PreconditionerLike",
]

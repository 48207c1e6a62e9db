"""YAML job descriptions for ``ngd-dist train`` / ``validate``: schema, defaults, loading, overrides.

``load_job(path, overrides)`` reads and checks a job file; ``job_from_dict`` / ``job_to_dict``
convert between a ``Job`` and plain YAML types. Every problem raises ``JobError``, whose message
is one line naming the key path, the value and what is allowed.
"""

from ngd_dist.service.jobs.errors import JobError
from ngd_dist.service.jobs.loader import apply_overrides, job_to_yaml, load_job, parse_yaml, read_job_file
from ngd_dist.service.jobs.schema import (
    BUILTIN_DATA,
    BUILTIN_MODELS,
    BatchSpec,
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    DistributedSpec,
    Job,
    MetricsSpec,
    ModelSpec,
    OptimizerSpec,
    PrecisionSpec,
    PreconditionerSpec,
    ScheduleSpec,
    TrainSpec,
    job_from_dict,
    job_to_dict,
)

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_MODELS",
    "BatchSpec",
    "CheckpointSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "DistributedSpec",
    "Job",
    "JobError",
    "MetricsSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PrecisionSpec",
    "PreconditionerSpec",
    "ScheduleSpec",
    "TrainSpec",
    "apply_overrides",
    "job_from_dict",
    "job_to_dict",
    "job_to_yaml",
    "load_job",
    "parse_yaml",
    "read_job_file",
]

"""Crash-safe checkpoints: the verified on-disk store, RNG state capture, and preemption signals."""

from ngd_dist.service.checkpoint.preemption import PreemptionHandler, worker_preemption
from ngd_dist.service.checkpoint.rng import capture_rng_state, restore_rng_state
from ngd_dist.service.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    CheckpointWriteError,
    agree_on_step,
)

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CheckpointWriteError",
    "PreemptionHandler",
    "agree_on_step",
    "capture_rng_state",
    "restore_rng_state",
    "worker_preemption",
]

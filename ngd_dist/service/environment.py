"""Where a worker runs: rank, world size and device, from whichever launcher started it.

- torchrun / deepspeed set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``:
  torch.distributed initialises from the environment.
- mpirun sets Open MPI's / PMI's variables: torch.distributed is bootstrapped through MPI
  (:func:`ngd_dist.kfac.distributed.mpi.init_from_mpi`), no ``MASTER_ADDR`` needed.
- Otherwise it is a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ngd_dist.kfac.distributed.mpi import init_from_mpi, launched_by_mpi


@dataclass(frozen=True)
class Environment:
    """This worker's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str
    """"torchrun" (any env:// launcher), "mpirun" or "single"."""

    @property
    def distributed(self) -> bool:
        """Whether torch.distributed was initialised with more than one rank."""
        return self.world_size > 1


def setup(backend: str = "auto", timeout_s: float = 300.0) -> Environment:
    """Initialise torch.distributed as the launcher asks, and pick the device."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("distributed.backend: got 'nccl' but no CUDA device is visible; use gloo on CPU")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            _init_from_env(backend, timedelta(seconds=timeout_s))
    elif launched_by_mpi():
        launcher = "mpirun"
        init_from_mpi(backend, timeout_s)
        local_rank = int(os.environ["LOCAL_RANK"])
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
    else:
        return Environment(0, 1, 0, torch.device("cuda" if backend == "nccl" else "cpu"), "single")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return Environment(dist.get_rank(), dist.get_world_size(), local_rank, device, launcher)


def _init_from_env(backend: str, timeout: timedelta) -> None:
    """env:// initialisation, with the keys of each torchrun restart kept apart.

    After a restart, torchrun's store still holds the previous attempt's keys; a worker of the new
    attempt could read a dead peer's address from them. Prefixing the store with the restart count
    gives every attempt its own keys.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,
        timeout=timeout,
        use_libuv=True,
    )
    prefixed = dist.PrefixStore(f"ngd_dist/attempt{restart}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)


def teardown() -> None:
    """Leave the process group, if any, once every rank is done with its collectives.

    Without the barrier a rank can tear its gloo connections down while a peer still uses them,
    and that peer aborts at exit ("terminate called without an active exception").

    For the end of a run that every rank reached, only: on an error path the other ranks may be
    waiting in a different collective, and the barrier would hang until the collective timeout.
    There the process exits at once instead (``ngd-dist train``: ``ngd_dist.cli._worker_failed``),
    which closes its connections: the peers' collectives fail within a second, and the launcher
    stops them.
    """
    if not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()

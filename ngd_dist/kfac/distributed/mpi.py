"""mpi4py as the alternative transport, and bootstrapping torch.distributed through MPI.

Under ``mpirun`` the rank and world size come from MPI. :func:`init_from_mpi` has rank 0 pick a
free TCP port on its host and share ``host:port`` with the others over MPI, so no ``MASTER_ADDR``
or ``MASTER_PORT`` is needed. :class:`MPICommunicator` runs the preconditioner's collectives over
MPI itself on CPU buffers (bfloat16 travels as float32: MPI has no bfloat16 type).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ngd_dist.kfac.distributed.ports import free_port


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "transport 'mpi' needs mpi4py and an MPI library (make installs Open MPI and mpi4py)"
        ) from exc
    return MPI


def launched_by_mpi() -> bool:
    """Whether this process was started by mpirun / mpiexec (Open MPI, MPICH or Intel MPI)."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


class MPICommunicator:
    """The preconditioner's collectives over an mpi4py communicator."""

    def __init__(self, comm: Any = None) -> None:
        """Use ``comm`` (default ``MPI.COMM_WORLD``)."""
        mpi = _mpi()
        self._mpi = mpi
        self.comm = comm if comm is not None else mpi.COMM_WORLD

    @property
    def rank(self) -> int:
        """Rank in the MPI communicator."""
        return int(self.comm.Get_rank())

    @property
    def world_size(self) -> int:
        """Size of the MPI communicator."""
        return int(self.comm.Get_size())

    def _run(self, buffer: Tensor, op: str, root: int = 0) -> None:
        if self.world_size == 1:
            return
        host = buffer.detach().to("cpu", torch.float32 if buffer.dtype == torch.bfloat16 else buffer.dtype)
        host = host.contiguous()
        array = host.numpy()
        mpi = self._mpi
        if op == "all_reduce":
            self.comm.Allreduce(mpi.IN_PLACE, array, op=mpi.SUM)
        elif op == "reduce":
            if self.rank == root:
                self.comm.Reduce(mpi.IN_PLACE, array, op=mpi.SUM, root=root)
            else:
                self.comm.Reduce(array, None, op=mpi.SUM, root=root)
        else:
            self.comm.Bcast(array, root=root)
        if host.data_ptr() != buffer.data_ptr():
            buffer.copy_(host)

    def all_reduce(self, buffer: Tensor) -> None:
        """MPI Allreduce with SUM, in place."""
        self._run(buffer, "all_reduce")

    def reduce(self, buffer: Tensor, dst: int) -> None:
        """MPI Reduce with SUM into ``dst``."""
        self._run(buffer, "reduce", dst)

    def broadcast(self, buffer: Tensor, src: int) -> None:
        """MPI Bcast from ``src``."""
        self._run(buffer, "broadcast", src)

    def split(self, groups: list[list[int]]) -> MPICommunicator:
        """``Comm.Split`` by the index of the group holding this rank."""
        color = next(i for i, g in enumerate(groups) if self.rank in g)
        return MPICommunicator(self.comm.Split(color, self.rank))


def init_from_mpi(backend: str = "gloo", timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise torch.distributed from MPI's rank and size; return ``(rank, world_size)``.

    Rank 0 chooses ``host:port`` (its hostname's address and a free port) and broadcasts it over
    MPI. ``LOCAL_RANK`` / ``RANK`` / ``WORLD_SIZE`` are set from MPI for code that reads them.
    """
    mpi = _mpi()
    comm = mpi.COMM_WORLD
    rank, size = int(comm.Get_rank()), int(comm.Get_size())
    address = None
    if rank == 0:
        host = os.environ.get("NGD_DIST_MPI_HOST") or socket.gethostbyname(socket.gethostname())
        address = f"{host}:{free_port(host)}"
    address = comm.bcast(address, root=0)
    local_rank = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", "0"))
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": local_rank})
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )
    return rank, size

"""Transports: the three collectives the preconditioner needs, on flat buffers.

The preconditioner only ever sums a buffer over all ranks, sums one to a single rank, or copies one
from a rank to all. Bucketing, packing and dtypes live above this layer
(:mod:`ngd_dist.kfac.distributed.buckets`), so a transport stays a few lines: torch.distributed (gloo on
CPU, NCCL on GPU) here, mpi4py in :mod:`ngd_dist.kfac.distributed.mpi`. At world size 1 every
collective is a no-op, so the single-process path and the data-parallel path are the same code.
"""

from __future__ import annotations

from typing import Protocol

import torch.distributed as dist
from torch import Tensor


class Communicator(Protocol):
    """Collectives over the ranks of a data-parallel job, in place on one flat tensor."""

    @property
    def rank(self) -> int:
        """This process's rank."""
        ...

    @property
    def world_size(self) -> int:
        """How many ranks take part."""
        ...

    def all_reduce(self, buffer: Tensor) -> None:
        """Sum ``buffer`` over all ranks; every rank gets the sum."""
        ...

    def reduce(self, buffer: Tensor, dst: int) -> None:
        """Sum ``buffer`` over all ranks into rank ``dst`` (others' buffers are unspecified)."""
        ...

    def broadcast(self, buffer: Tensor, src: int) -> None:
        """Copy ``buffer`` from rank ``src`` to every rank."""
        ...

    def split(self, groups: list[list[int]]) -> Communicator:
        """This rank's communicator among ``groups``, a partition of the ranks.

        Every rank calls it with the same groups, ranks in each group ascending.
        """
        ...


class LocalCommunicator:
    """A single process: rank 0 of 1, every collective a no-op."""

    @property
    def rank(self) -> int:
        """Always 0."""
        return 0

    @property
    def world_size(self) -> int:
        """Always 1."""
        return 1

    def all_reduce(self, buffer: Tensor) -> None:
        """Nothing to sum with."""

    def reduce(self, buffer: Tensor, dst: int) -> None:
        """Nothing to sum with."""

    def broadcast(self, buffer: Tensor, src: int) -> None:
        """Nothing to send."""

    def split(self, groups: list[list[int]]) -> Communicator:
        """Itself: one rank, one group."""
        return self


class TorchCommunicator:
    """torch.distributed collectives on the default (or a given) process group."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        """Use ``group``, or the default group; torch.distributed must be initialised."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCommunicator needs torch.distributed initialised (dist.init_process_group); "
                "for one process use LocalCommunicator"
            )
        self.group = group
        self._rank = dist.get_rank(group) if group is not None else dist.get_rank()
        self._world_size = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Size of the group."""
        return self._world_size

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def all_reduce(self, buffer: Tensor) -> None:
        """``dist.all_reduce`` with SUM."""
        if self._world_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)

    def reduce(self, buffer: Tensor, dst: int) -> None:
        """``dist.reduce`` with SUM to ``dst``."""
        if self._world_size > 1:
            dist.reduce(buffer, dst=self._global(dst), op=dist.ReduceOp.SUM, group=self.group)

    def broadcast(self, buffer: Tensor, src: int) -> None:
        """``dist.broadcast`` from ``src``."""
        if self._world_size > 1:
            dist.broadcast(buffer, src=self._global(src), group=self.group)

    def split(self, groups: list[list[int]]) -> Communicator:
        """A new process group per group (all ranks create all of them, in order)."""
        if all(len(g) == 1 for g in groups):
            return LocalCommunicator()
        if len(groups) == 1:
            return self
        mine: Communicator | None = None
        for ranks in groups:
            members = ranks if self.group is None else [dist.get_global_rank(self.group, r) for r in ranks]
            handle = dist.new_group(members)
            if self._rank in ranks:
                mine = TorchCommunicator(handle)
        assert mine is not None, f"rank {self._rank} is in none of {groups}"
        return mine


def default_communicator() -> Communicator:
    """torch.distributed's default group if initialised with several ranks, else a local one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCommunicator()
    return LocalCommunicator()

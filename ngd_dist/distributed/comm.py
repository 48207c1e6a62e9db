"""The collectives the preconditioner needs, behind one small interface.

At world size 1 every collective is a no-op, so the single-process path and the data-parallel
path are the same code.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Communicator(Protocol):
    """Collectives over the ranks of a data-parallel job."""

    @property
    def rank(self) -> int:
        """This process's rank."""
        ...

    @property
    def world_size(self) -> int:
        """How many ranks take part."""
        ...

    def all_reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over all ranks, in place."""
        ...

    def broadcast(self, tensors: list[Tensor], src: int) -> None:
        """Copy each tensor from rank ``src`` to every rank, in place."""
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

    def all_reduce_sum(self, tensors: list[Tensor]) -> None:
        """Nothing to sum with."""

    def broadcast(self, tensors: list[Tensor], src: int) -> None:
        """Nothing to send."""

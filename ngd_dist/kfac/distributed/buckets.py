"""Bucketed collectives: many tensors per call, symmetric ones packed, bytes counted by kind.

A :class:`Layout` fixes, identically on every rank, which tensors travel in one flat buffer and
how: ``"sym"`` tensors as their upper triangle (``n(n+1)/2`` values), everything else flattened.
:class:`Collectives` sends such buffers over a :class:`~ngd_dist.kfac.distributed.comm.Communicator`
in a chosen dtype and counts the payload bytes this rank hands to each collective, by kind
("factors", "decompositions", "gradients", "preconditioned", "meta").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ngd_dist.kfac.distributed.comm import Communicator


def pack_upper(x: Tensor) -> Tensor:
    """The upper triangle of a symmetric matrix, row by row: ``n(n+1)/2`` values."""
    n = x.shape[0]
    rows, cols = torch.triu_indices(n, n, device=x.device)
    return x[rows, cols]


def unpack_upper(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_upper`: the full symmetric ``n x n`` matrix."""
    if packed.numel() != n * (n + 1) // 2:
        raise ValueError(f"packed triangle has {packed.numel()} values; n={n} needs {n * (n + 1) // 2}")
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    out = packed.new_zeros(n, n)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out



@dataclass(frozen=True)
class Slot:
    """One tensor's place in a buffer."""

    key: Hashable
    shape: tuple[int, ...]
    symmetric: bool = False

    @property
    def size(self) -> int:
        """Values it takes in the buffer."""
        if self.symmetric:
            n = self.shape[0]
            return n * (n + 1) // 2
        size = 1
        for d in self.shape:
            size *= d
        return size


class Layout:
    """An ordered list of slots, the same on every rank."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        """Lay ``slots`` out one after the other."""
        self.slots = list(slots)
        self.offsets: list[int] = []
        total = 0
        for slot in self.slots:
            self.offsets.append(total)
            total += slot.size
        self.size = total

    def pack(self, tensors: Mapping[Hashable, Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
        """One flat buffer holding every slot's tensor (zeros where a tensor is missing)."""
        buffer = torch.zeros(self.size, dtype=dtype, device=device)
        for slot, offset in zip(self.slots, self.offsets, strict=True):
            tensor = tensors.get(slot.key)
            if tensor is None:
                continue
            flat = pack_upper(tensor) if slot.symmetric else tensor.reshape(-1)
            buffer[offset : offset + slot.size].copy_(flat)
        return buffer

    def unpack(self, buffer: Tensor, dtype: torch.dtype) -> dict[Hashable, Tensor]:
        """The tensors of a buffer, each in ``dtype`` (symmetric ones unpacked to full)."""
        out: dict[Hashable, Tensor] = {}
        for slot, offset in zip(self.slots, self.offsets, strict=True):
            part = buffer[offset : offset + slot.size].to(dtype)
            out[slot.key] = unpack_upper(part, slot.shape[0]) if slot.symmetric else part.reshape(slot.shape)
        return out


class Collectives:
    """Bucketed collectives over a communicator, with payload bytes counted by kind."""

    def __init__(self, comm: Communicator) -> None:
        """Wrap ``comm``."""
        self.comm = comm
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def on(self, comm: Communicator) -> Collectives:
        """The same collectives over another communicator (a subgroup), same counters."""
        view = Collectives(comm)
        view.bytes, view.calls = self.bytes, self.calls
        return view

    def _count(self, kind: str, buffer: Tensor) -> None:
        if self.comm.world_size > 1:
            self.bytes[kind] += buffer.numel() * buffer.element_size()
            self.calls[kind] += 1

    def all_reduce(
        self,
        layout: Layout,
        tensors: Mapping[Hashable, Tensor],
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[Hashable, Tensor]:
        """Sum every slot over all ranks in one call; returns the sums (float32 or wider)."""
        if self.comm.world_size == 1:
            return _alone(layout, tensors, _wide(dtype))
        buffer = layout.pack(tensors, dtype, device)
        self._count(kind, buffer)
        self.comm.all_reduce(buffer)
        return layout.unpack(buffer, _wide(dtype))

    def reduce(
        self,
        layout: Layout,
        tensors: Mapping[Hashable, Tensor],
        dst: int,
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[Hashable, Tensor] | None:
        """Sum every slot over all ranks into ``dst``; the sums on ``dst``, None elsewhere."""
        if not layout.slots:
            return {} if self.comm.rank == dst else None
        if self.comm.world_size == 1:
            return _alone(layout, tensors, _wide(dtype))
        buffer = layout.pack(tensors, dtype, device)
        self._count(kind, buffer)
        self.comm.reduce(buffer, dst)
        return layout.unpack(buffer, _wide(dtype)) if self.comm.rank == dst else None

    def broadcast(
        self,
        layout: Layout,
        tensors: Mapping[Hashable, Tensor],
        src: int,
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[Hashable, Tensor]:
        """Every slot from ``src`` to all ranks in one call (``tensors`` matter only on ``src``)."""
        if not layout.slots:
            return {}
        if self.comm.world_size == 1:
            return _alone(layout, tensors, dtype)
        buffer = layout.pack(tensors if self.comm.rank == src else {}, dtype, device)
        if self.comm.rank == src:
            self._count(kind, buffer)
        self.comm.broadcast(buffer, src)
        return layout.unpack(buffer, dtype)


def _alone(layout: Layout, tensors: Mapping[Hashable, Tensor], dtype: torch.dtype) -> dict[Hashable, Tensor]:
    """What a collective over one rank returns: the tensors themselves (zeros where missing)."""
    out: dict[Hashable, Tensor] = {}
    for slot in layout.slots:
        tensor = tensors.get(slot.key)
        out[slot.key] = tensor if tensor is not None else torch.zeros(slot.shape, dtype=dtype)
    return out


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32

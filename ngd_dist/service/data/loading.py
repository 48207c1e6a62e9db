"""A job's data as a ``torch.utils.data`` Dataset, fed to each rank by a ``DataLoader``, resumable.

What a job trains on is a map-style or an iterable ``torch.utils.data.Dataset``. The built-in
data (:mod:`ngd_dist.service.data.datasets`) stays in memory as tensors, wrapped as
:class:`TensorPairs` (``(input, target)`` items) or :class:`TensorDicts` (``{"input_ids", ...,
"labels"}`` items); a user factory may return any Dataset, of any size (nothing is stacked).

A batch (:data:`Batch`) is ``(inputs, targets)`` or a dict of tensors holding ``"labels"``; the
DataLoader's ``default_collate`` makes one from a list of items (a tuple or a dict each).

:class:`ShardedLoader` runs one ``torch.utils.data.DataLoader`` per rank:

- **Map-style** (with ``__len__``): :class:`ShardSampler`, a batch sampler, gives each rank a
  disjoint slice of every global batch of a permutation seeded by ``(seed, epoch)``, the same on
  every rank (no communication); the trailing ``len % (batch_size x world_size)`` samples of an
  epoch are dropped. Per-sample work (``__getitem__``, augmentation included) runs in the
  ``num_workers`` worker processes, which persist across epochs (unless the dataset has
  ``set_epoch``: then it is called before each epoch and the workers start afresh, so they see it).
  The position is ``{"epoch", "index"}`` (of the next batch): a loader that loads it yields exactly
  the batches the saved one would have, whatever ``num_workers``, as long as ``__getitem__(i)``
  is a function of ``i`` (and the epoch): random augmentation should draw from a generator seeded
  by the index, since which worker fetches an item changes on resume.
- **Iterable**: the stream is sharded by rank and by worker, item ``i`` of an epoch going to shard
  ``i % (world_size x workers)`` (every rank reads the whole stream and keeps its own items); each
  worker batches its items (an incomplete last batch dropped) and the DataLoader takes the workers'
  batches in turn. Before each epoch the dataset's ``set_epoch(epoch)`` is called if it has one
  (a dataset that shuffles should do so by it). Resuming at ``{"epoch": e, "index": i}`` replays
  epoch ``e`` and skips its first ``i`` batches: exact when the stream is the same for the same
  epoch and ``num_workers`` is unchanged, at the cost of reading those batches again.

The training process's global RNG is never drawn from: each DataLoader iterator takes its workers'
base seed from a private generator seeded by ``(seed, rank, epoch)`` (each worker seeds ``torch``,
``random`` and ``numpy`` from it, plus its worker id), so dropout and the like follow the same
stream whatever the loader does, and a resumed run draws the same as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from ngd_dist.kfac.outputs import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataError",
    "ShardSampler",
    "ShardedLoader",
    "TensorDicts",
    "TensorPairs",
    "as_batch",
    "batch_labels",
    "batch_rows",
    "chunk_batch",
    "collate",
    "is_map_style",
    "to_device",
]

Batch = tuple[Tensor, Tensor] | dict[str, Tensor]
"""One batch: ``(inputs, targets)``, or a dict of tensors (model inputs by keyword, and ``"labels"``)."""



class DataError(ValueError):
    """The data cannot be fed as the job asks (a batch of the wrong kind, a shard with no batch)."""


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _seed_of(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return seed


# -- in-memory datasets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prebatched:
    """A batch a dataset made itself (by indexing its tensors), passed through :func:`collate`."""

    batch: Batch


class TensorPairs(Dataset[tuple[Tensor, Tensor]]):
    """A map-style Dataset over in-memory ``(inputs, targets)`` tensors: what the built-in data is.

    Item ``i`` is ``(inputs[i], targets[i])``; a batch of indices is fetched by one indexing of each
    tensor (``__getitems__``), so it equals ``(inputs[rows], targets[rows])`` bit for bit.
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise ValueError("inputs and targets must be tensors")
        if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets):
            raise ValueError(f"inputs have {len(inputs)} samples but targets {len(targets)}")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> _Prebatched:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return _Prebatched((self.inputs[rows], self.targets[rows]))


class TensorDicts(Dataset[dict[str, Tensor]]):
    """A map-style Dataset over in-memory tensors by name (``input_ids``, ``attention_mask``,
    ``labels``, ...), all with the same first dimension: item ``i`` is ``{name: tensor[i]}``.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        sizes = {name: len(t) for name, t in tensors.items()}
        if "labels" not in tensors or len(set(sizes.values())) != 1:
            raise ValueError(
                f"expected tensors with the same first dimension, 'labels' among them; got {sizes}"
            )
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> _Prebatched:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return _Prebatched({name: t[rows] for name, t in self.tensors.items()})


# -- batches ---------------------------------------------------------------------------------------


def as_batch(batch: object) -> Batch:
    """``batch`` as a :data:`Batch`: a pair of tensors (a list of two from ``default_collate``
    becomes a tuple) or a dict of tensors with ``"labels"``; :class:`DataError` otherwise.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return x, y
    if isinstance(batch, Mapping):
        named = {k: v for k, v in batch.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if len(named) == len(batch):
            if "labels" not in named:
                raise DataError(f"a dict batch needs 'labels' (the targets); it has {sorted(named)}")
            return named
    kinds = (
        f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list, Mapping))
        else f"a {type(batch).__name__}"
    )  # fmt: skip
    raise DataError(
        f"a batch is {kinds}; expected (inputs, targets) tensors or a dict of tensors with 'labels' "
        "(items of a Dataset: (input, target) pairs or dicts)"
    )


def collate(items: Any) -> Batch:
    """The DataLoader's ``collate_fn``: ``default_collate`` of a list of items, checked by
    :func:`as_batch` (a batch an in-memory dataset fetched itself passes through unchanged).
    """
    if isinstance(items, _Prebatched):
        return items.batch
    return as_batch(default_collate(items))


def batch_labels(batch: Batch) -> Tensor:
    """The targets of a batch (``batch[1]``, or ``batch["labels"]``)."""
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def batch_rows(batch: Batch) -> int:
    """Samples in a batch (the first dimension of its targets)."""
    return int(batch_labels(batch).shape[0])


def chunk_batch(batch: Batch, chunks: int) -> list[Batch]:
    """``batch`` cut into ``chunks`` micro-batches along the first dimension (``Tensor.chunk``)."""
    if isinstance(batch, dict):
        parts = {name: t.chunk(chunks) for name, t in batch.items()}
        counts = {len(p) for p in parts.values()}
        if counts != {chunks}:
            raise DataError(f"a batch of {batch_rows(batch)} rows does not split into {chunks} micro-batches")
        return [{name: p[i] for name, p in parts.items()} for i in range(chunks)]
    xs, ys = batch[0].chunk(chunks), batch[1].chunk(chunks)
    if len(xs) != chunks or len(ys) != chunks:
        raise DataError(f"a batch of {batch_rows(batch)} rows does not split into {chunks} micro-batches")
    return list(zip(xs, ys, strict=True))


def to_device(batch: Batch, device: torch.device | None) -> Batch:
    """``batch`` with every tensor on ``device`` (non-blocking; unchanged when ``device`` is None)."""
    if device is None:
        return batch
    if isinstance(batch, dict):
        return {name: t.to(device, non_blocking=True) for name, t in batch.items()}
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def is_map_style(dataset: object) -> bool:
    """Whether ``dataset`` is a map-style Dataset with a length (not an IterableDataset)."""
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(
        dataset, "__getitem__"
    )


# -- sampling and sharding -------------------------------------------------------------------------


def epoch_order(size: int, seed: int, epoch: int, *, shuffle: bool = True) -> Tensor:
    """The permutation of ``range(size)`` that epoch ``epoch`` walks: the same on every rank."""
    if not shuffle:
        return torch.arange(size)
    # one 63-bit seed per (seed, epoch); a fixed odd multiplier spreads the seeds apart
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % 2**63
    return torch.randperm(size, generator=torch.Generator().manual_seed(mixed))


def _worker_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The private generator a DataLoader iterator of ``(seed, rank, epoch)`` draws its base seed from."""
    mixed = (seed * 0x9E3779B97F4A7C15 + rank * 0x94D049BB133111EB + epoch * 0xBF58476D1CE4E5B9 + 7) % 2**63
    return torch.Generator().manual_seed(mixed)


class ShardSampler(Sampler[list[int]]):
    """A batch sampler: this rank's indices of each global batch of a map-style dataset.

    Epoch ``e`` walks :func:`epoch_order` ``(size, seed, e)``; global batch ``i`` is its positions
    ``[i * G, (i + 1) * G)``, ``G = batch_size * world_size``, and rank ``r`` takes positions
    ``[r * batch_size, (r + 1) * batch_size)`` of it. Iterating yields the batches of epoch
    :attr:`epoch` from batch :attr:`start` on (both set before each pass).
    """

    def __init__(
        self, size: int, *, rank: int, world_size: int, batch_size: int, seed: int, shuffle: bool = True
    ) -> None:
        self.size, self.rank, self.world_size, self.batch_size = size, rank, world_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.size // (self.batch_size * self.world_size)

    def rows(self, epoch: int, index: int) -> list[int]:
        """Sample indices of this rank's part of global batch ``index`` of epoch ``epoch``."""
        start = index * self.batch_size * self.world_size + self.rank * self.batch_size
        order = epoch_order(self.size, self.seed, epoch, shuffle=self.shuffle)
        return order[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.size, self.seed, self.epoch, shuffle=self.shuffle)
        g, b = self.batch_size * self.world_size, self.batch_size
        for index in range(self.start, len(self)):
            begin = index * g + self.rank * b
            yield order[begin : begin + b].tolist()


class _StreamShard(IterableDataset[Any]):
    """This rank's and this worker's items of an iterable dataset: item ``i`` goes to shard
    ``i % (world_size x workers)``, shard ``rank x workers + worker``.
    """

    def __init__(self, dataset: IterableDataset[Any], rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shards, mine = self.world_size * workers, self.rank * workers + worker
        for i, item in enumerate(self.dataset):
            if i % shards == mine:
                yield item


class ShardedLoader:
    """This rank's batches of a job's data, resumable (see the module docstring).

    ``data`` is a map-style or iterable Dataset, or an ``inputs`` tensor with ``targets`` (wrapped as
    :class:`TensorPairs`). Iterating yields the batches (:data:`Batch`, moved to ``device`` if given)
    from the current position to the end of the current epoch, then the position moves to the next
    epoch, so ``for epoch in range(E): for batch in loader: ...`` runs E epochs; :meth:`forever`
    iterates across epochs without end (step-based training). :meth:`state_dict` is the position of
    the *next* batch.
    """

    def __init__(
        self,
        data: Dataset[Any] | Tensor,
        targets: Tensor | None = None,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        _positive(world_size=world_size, batch_size=batch_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        _seed_of(seed)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if prefetch_factor is not None and num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers >= 1")
        if isinstance(data, Tensor):
            if targets is None:
                raise ValueError("targets are needed with an inputs tensor")
            data = TensorPairs(data, targets)
        elif targets is not None:
            raise ValueError("targets are given with inputs tensors only, not with a Dataset")
        self.dataset = data
        self.iterable = isinstance(data, IterableDataset)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.device = None if device is None else torch.device(device)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.epoch = 0
        self.index = 0
        self.sampler: ShardSampler | None = None
        self._loader: DataLoader[Any] | None = None
        if not self.iterable:
            if not is_map_style(data):
                raise ValueError(
                    f"a {type(data).__name__} is neither a map-style Dataset (__len__ and __getitem__) nor "
                    "a torch.utils.data.IterableDataset"
                )
            size = len(data)  # type: ignore[arg-type]
            if size < self.global_batch_size:
                raise ValueError(
                    f"the dataset has {size} samples, fewer than one global batch of "
                    f"{self.global_batch_size} (batch_size {batch_size} per rank x world_size {world_size})"
                )
            self.sampler = ShardSampler(
                size, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, shuffle=shuffle
            )

    @property
    def global_batch_size(self) -> int:
        """``batch_size * world_size``: the samples one step consumes over all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank); a TypeError for an iterable dataset."""
        if self.sampler is None:
            raise TypeError("an iterable dataset has no length: its batches per epoch are not known")
        return len(self.sampler)

    def order(self, epoch: int) -> Tensor:
        """The permutation of sample indices that epoch ``epoch`` walks (map-style data)."""
        if self.sampler is None:
            raise TypeError("an iterable dataset is read in its own order")
        return epoch_order(self.sampler.size, self.seed, epoch, shuffle=self.shuffle)

    def rows(self, epoch: int, index: int) -> Tensor:
        """Sample indices of this rank's part of global batch ``index`` of epoch ``epoch``."""
        if self.sampler is None:
            raise TypeError("an iterable dataset is read in its own order")
        return torch.tensor(self.sampler.rows(epoch, index), dtype=torch.long)

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "collate_fn": collate,
        }
        if self.num_workers:
            options["prefetch_factor"] = self.prefetch_factor
        return options

    def _set_epoch(self, epoch: int) -> bool:
        """Call the dataset's ``set_epoch(epoch)`` if it has one; whether it has."""
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return True
        return False

    def _map_loader(self, epoch: int) -> DataLoader[Any]:
        """The DataLoader of a map-style dataset for ``epoch``: one for all epochs, whose workers
        persist, unless the dataset has ``set_epoch`` (then a new one, with new workers, each epoch).
        """
        fresh = self._set_epoch(epoch)
        if self._loader is None or fresh:
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                persistent_workers=self.num_workers > 0 and not fresh,
                **self._options(),
            )
        self._loader.generator = _worker_generator(self.seed, self.rank, epoch)
        return self._loader

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the position advances as each batch is handed out."""
        if self.sampler is None:
            yield from self._stream()
            return
        epoch, steps = self.epoch, len(self)
        if self.index >= steps:  # a position loaded at an epoch's end
            self.epoch, self.index = epoch + 1, 0
            return
        self.sampler.epoch, self.sampler.start = epoch, self.index
        for batch in self._map_loader(epoch):
            self.index += 1
            if self.index == steps:
                self.epoch, self.index = epoch + 1, 0
            yield to_device(batch, self.device)
            if self.epoch != epoch:
                return

    def _stream(self) -> Iterator[Batch]:
        epoch, skip = self.epoch, self.index
        self._set_epoch(epoch)
        shard = _StreamShard(self.dataset, self.rank, self.world_size)  # type: ignore[arg-type]
        loader = DataLoader(
            shard,
            batch_size=self.batch_size,
            drop_last=True,
            generator=_worker_generator(self.seed, self.rank, epoch),
            **self._options(),
        )
        produced = 0
        for batch in loader:
            produced += 1
            if produced <= skip:  # consumed before the checkpoint this run resumed from
                continue
            self.index = produced
            yield to_device(batch, self.device)
        if produced == 0:
            raise DataError(
                f"the iterable dataset gave rank {self.rank} no full batch of {self.batch_size} samples in "
                f"epoch {epoch} (its items are shared out over {self.world_size} rank(s) and "
                f"{max(self.num_workers, 1)} worker(s) each)"
            )
        if produced < skip:
            raise DataError(
                f"the checkpoint's data position is batch {skip} of epoch {epoch}, but the iterable dataset "
                f"gives rank {self.rank} only {produced} batches in that epoch (another dataset, or "
                "data.num_workers changed?)"
            )
        self.epoch, self.index = epoch + 1, 0

    def forever(self) -> Iterator[Batch]:
        """Batches across epochs without end, from the current position."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: ``{"epoch": int, "index": int}``."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a position saved by :meth:`state_dict` (from a loader with the same arguments)."""
        try:
            epoch, index = state["epoch"], state["index"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a loader state needs integer 'epoch' and 'index', got {state!r}") from exc
        for key, value in (("epoch", epoch), ("index", index)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"loader state {key!r} must be a non-negative integer, got {value!r}")
        if self.sampler is not None and index > len(self):
            raise ValueError(
                f"loader state index {index} is past the {len(self)} batches of an epoch (was it saved "
                "with another dataset, batch size or world size?)"
            )
        self.epoch, self.index = epoch, index

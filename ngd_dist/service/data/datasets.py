"""Built-in datasets as in-memory tensors, and the loader that shards them over the ranks.

Every dataset function returns ``(inputs, targets)`` with the same first dimension; the synthetic
ones are a deterministic function of their ``seed`` (drawn on the CPU with a private
``torch.Generator``; the global RNG is not touched):

- :func:`digits`: the embedded 8x8 handwritten digits, images ``(1797, 1, 8, 8)``, labels int64;
- :func:`synthetic_images`: class-structured images ``(n, channels, size, size)``, labels int64;
- :func:`synthetic_tokens`: token sequences from a fixed random bigram chain, inputs and
  next-token targets ``(n_sequences, block_size)`` int64;
- :func:`text_file`: byte-level tokens (vocabulary 256) of a UTF-8 text file, same layout;
- :func:`image_folder_tensors`: a ``.pt`` file holding ``{"images": Tensor, "labels": Tensor}``.

A job trains on them as a ``torch.utils.data`` Dataset (:class:`~ngd_dist.service.data.loading.
TensorPairs`), fed by :class:`~ngd_dist.service.data.loading.ShardedLoader` (re-exported here): global
batches identical on every rank (a permutation seeded by ``(seed, epoch)``), each rank taking a
disjoint slice of each, resumable at the exact batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ngd_dist.service.data import load_digits
from ngd_dist.service.data.loading import ShardedLoader

__all__ = [
    "ShardedLoader",
    "digits",
    "image_folder_tensors",
    "split_holdout",
    "synthetic_images",
    "synthetic_tokens",
    "text_file",
]


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed % 2**63)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def digits() -> tuple[Tensor, Tensor]:
    """The embedded handwritten digits: images ``(1797, 1, 8, 8)`` in [0, 1] (float32), labels int64.

    Fixed data (no seed); hold out a test set with :func:`split_holdout`.
    """
    return load_digits()


def synthetic_images(
    n: int = 20000,
    channels: int = 3,
    size: int = 32,
    classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
    clutter: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Class-structured random images: learnable, but not trivially.

    Each class has a smooth random prototype (unit std, drawn at quarter resolution and upsampled
    bilinearly). A sample of class ``c`` is its prototype at a random contrast in [0.5, 1.5],
    shifted cyclically by up to ``size // 8`` pixels in each direction, plus a smooth random
    background of std ``clutter`` (the same kind of field as a prototype, so it cannot be filtered
    out by smoothing) and i.i.d. Gaussian pixel noise of std ``noise``. With the defaults a linear
    model on 10,000 samples reaches about 80% held-out accuracy and overfits; deeper models do
    better with more data. Labels are balanced (``n // classes`` or one more per class) and
    shuffled. Returns images ``(n, channels, size, size)`` float32 and labels ``(n,)`` int64; the
    same ``seed`` gives the same tensors, prototypes included (so hold out a test set from one call
    with :func:`split_holdout` rather than drawing it with another seed).
    """
    _positive(n=n, channels=channels, size=size, classes=classes)
    for name, value in (("noise", noise), ("clutter", clutter)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    gen = _generator(seed)
    low = max(1, size // 4)
    protos = _smooth_fields(classes, channels, low, size, gen)
    max_shift = size // 8
    offsets = range(-max_shift, max_shift + 1)
    # every class prototype under every cyclic shift: (classes, shifts, C, size, size)
    bank = torch.stack(
        [torch.roll(protos, shifts=(dy, dx), dims=(2, 3)) for dy in offsets for dx in offsets], 1
    )
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]
    shift = torch.randint(bank.shape[1], (n,), generator=gen)
    contrast = torch.rand(n, 1, 1, 1, generator=gen) + 0.5
    images = bank[labels, shift] * contrast
    images += float(clutter) * _smooth_fields(n, channels, low, size, gen)
    images += float(noise) * torch.randn(images.shape, generator=gen)
    return images, labels


def _smooth_fields(count: int, channels: int, low: int, size: int, gen: torch.Generator) -> Tensor:
    """Unit-std random fields drawn at ``low`` resolution and upsampled bilinearly to ``size``."""
    fields = torch.randn(count, channels, low, low, generator=gen)
    fields = F.interpolate(fields, size=(size, size), mode="bilinear", align_corners=False)
    fields = fields - fields.mean(dim=(1, 2, 3), keepdim=True)
    return fields / fields.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def synthetic_tokens(
    n_sequences: int = 2048,
    block_size: int = 64,
    vocab_size: int = 256,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Token sequences from a fixed random bigram (first-order Markov) chain.

    The transition table is ``softmax(3 * randn(vocab_size, vocab_size))`` row by row, so each
    token has a few likely successors: a model can learn it well below the ``log(vocab_size)`` loss
    of guessing (the table's mean entropy, about 2.5 nats for 256 tokens against log 256 = 5.5, is
    the floor). Each sequence starts at a uniform random token; next tokens are drawn by inverse-CDF
    sampling in float64.
    Returns inputs and next-token targets, both ``(n_sequences, block_size)`` int64, with
    ``targets[:, t] == inputs[:, t + 1]``.
    """
    _positive(n_sequences=n_sequences, block_size=block_size, vocab_size=vocab_size)
    gen = _generator(seed)
    logits = torch.randn(vocab_size, vocab_size, generator=gen, dtype=torch.float64)
    table = torch.softmax(3.0 * logits, dim=1)
    cdf = table.cumsum(dim=1)
    seq = torch.empty(n_sequences, block_size + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab_size, (n_sequences,), generator=gen)
    uniform = torch.rand(n_sequences, block_size, generator=gen, dtype=torch.float64)
    for t in range(block_size):  # inverse-CDF sampling of each next token
        rows = cdf[seq[:, t]]
        nxt = torch.searchsorted(rows, uniform[:, t : t + 1] * rows[:, -1:], right=True).squeeze(1)
        seq[:, t + 1] = nxt.clamp_max(vocab_size - 1)
    return seq[:, :-1].clone(), seq[:, 1:].clone()


def text_file(path: str | os.PathLike[str], block_size: int = 64) -> tuple[Tensor, Tensor]:
    """Byte-level language-model data (vocabulary 256) from a UTF-8 text file.

    The file's bytes are cut into ``(len(bytes) - 1) // block_size`` consecutive, non-overlapping
    windows; returns inputs and next-byte targets, both ``(N, block_size)`` int64. Raises
    ``ValueError`` naming the path when the file is missing, unreadable, not UTF-8, empty, or
    shorter than ``block_size + 1`` bytes.
    """
    _positive(block_size=block_size)
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"text file {str(file)!r} does not exist or is not a file")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"text file {str(file)!r} cannot be read: {exc}") from exc
    if not raw:
        raise ValueError(f"text file {str(file)!r} is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(file)!r} is not UTF-8 text: {exc}") from exc
    count = (len(raw) - 1) // block_size
    if count < 1:
        raise ValueError(
            f"text file {str(file)!r} has {len(raw)} bytes, too short for one block: "
            f"block_size={block_size} needs at least {block_size + 1}"
        )
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    inputs = data[: count * block_size].view(count, block_size)
    targets = data[1 : count * block_size + 1].view(count, block_size)
    return inputs.clone(), targets.clone()


def image_folder_tensors(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """A dataset saved with ``torch.save({"images": Tensor, "labels": Tensor}, path)``.

    Loaded with ``weights_only=True`` (no pickled code runs). Any shapes and dtypes are accepted as
    long as both are tensors with the same first dimension (at least one sample). Raises
    ``ValueError`` naming the path when the file is missing or unreadable, or the keys are absent.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"tensor file {str(file)!r} does not exist or is not a file")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a bad file
        raise ValueError(f"tensor file {str(file)!r} cannot be loaded with weights_only=True: {exc}") from exc
    if not isinstance(blob, Mapping):
        raise ValueError(
            f"tensor file {str(file)!r} holds a {type(blob).__name__}, expected a dict with keys "
            "'images' and 'labels'"
        )
    missing = [key for key in ("images", "labels") if key not in blob]
    if missing:
        raise ValueError(
            f"tensor file {str(file)!r} lacks key(s) {missing}: expected 'images' and 'labels', "
            f"found {sorted(map(str, blob))}"
        )
    images, labels = blob["images"], blob["labels"]
    for key, value in (("images", images), ("labels", labels)):
        if not isinstance(value, Tensor) or value.dim() == 0:
            raise ValueError(f"tensor file {str(file)!r}: {key!r} must be a tensor with a sample dimension")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"tensor file {str(file)!r}: 'images' has {len(images)} samples and 'labels' {len(labels)}; "
            "they must match and be non-zero"
        )
    return images, labels


def split_holdout(
    inputs: Tensor, targets: Tensor, test: int | float, *, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split ``(inputs, targets)`` into ``(train, test)`` by a permutation seeded by ``seed``.

    ``test`` is a number of samples (int) or a fraction in (0, 1) (float, rounded, at least 1).
    """
    n = len(inputs)
    if len(targets) != n:
        raise ValueError(f"inputs have {n} samples but targets {len(targets)}")
    if isinstance(test, bool):
        raise ValueError(f"test must be a count or a fraction, got {test!r}")
    count = max(1, round(test * n)) if isinstance(test, float) else test
    if isinstance(test, float) and not 0.0 < test < 1.0:
        raise ValueError(f"a test fraction must be in (0, 1), got {test}")
    if not 1 <= count < n:
        raise ValueError(f"test must leave at least one sample on each side of {n}, got {test!r}")
    order = torch.randperm(n, generator=_generator(seed))
    train_rows, test_rows = order[: n - count], order[n - count :]
    return (inputs[train_rows], targets[train_rows]), (inputs[test_rows], targets[test_rows])

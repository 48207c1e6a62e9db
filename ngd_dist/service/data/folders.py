"""Image data read from local folders, one item at a time (no in-memory size limit).

- :func:`image_folder`: the ``ImageFolder`` layout torchvision uses, ``root/<class>/<image>``
  (classes are the sub-folders in sorted order; PNG, JPEG, BMP, GIF, WebP), decoded with Pillow
  (the ``images`` extra) when an item is read: in the DataLoader's workers when
  ``data.num_workers`` > 0.
- :func:`cifar10`: CIFAR-10's binary version (``cifar-10-batches-bin``: ``data_batch_1.bin`` ...
  ``data_batch_5.bin`` and ``test_batch.bin``, records of 1 label byte and 3 x 32 x 32 pixel bytes),
  memory-mapped. The Python version of CIFAR-10 is a pickle, which can run code when loaded: it is
  refused with a pointer to the binary version.

Both give ``(image, label)`` items: a float32 ``(C, H, W)`` tensor in [0, 1] (optionally
standardised per channel) and an int64 label; both need no download and no torchvision.
``cifar10`` augments on request (random crops and flips, in the loader's workers, reproducible
per item and epoch: :class:`AugmentedCIFAR10`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = ("test_batch.bin",)


def _standardise(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    if mean is None and std is None:
        return x
    m = torch.tensor(mean if mean is not None else [0.0] * x.shape[0]).view(-1, 1, 1)
    s = torch.tensor(std if std is not None else [1.0] * x.shape[0]).view(-1, 1, 1)
    return (x - m) / s


class ImageFolder(Dataset[tuple[Tensor, Tensor]]):
    """Images under ``root/<class>/``, decoded when read."""

    def __init__(
        self,
        root: Path,
        size: int | None,
        channels: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        """Index the files (not read yet); see :func:`image_folder`."""
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(
                f"data.args.path: {str(root)!r} has no class sub-folders; expected root/<class>/<image>"
            )
        self.items = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.items:
            raise ValueError(
                f"data.args.path: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of "
                f"{str(root)!r}"
            )
        self.size, self.channels, self.mean, self.std = size, channels, mean, std

    def __len__(self) -> int:
        """Number of images."""
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """The image as a float ``(C, H, W)`` tensor in [0, 1] (standardised if asked) and its label."""
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            if self.size is not None:
                image = image.resize((self.size, self.size))
            pixels = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(pixels.copy()).float().div_(255.0)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        return _standardise(x, self.mean, self.std), torch.tensor(label)


def image_folder(
    path: str | os.PathLike[str],
    size: int | None = None,
    channels: int = 3,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ImageFolder:
    """The ``ImageFolder`` layout under ``path``: ``path/<class>/<image>``, decoded with Pillow when read.

    ``size``: resize every image to ``size x size`` (needed when they differ); ``channels``: 3 (RGB)
    or 1 (grey); ``mean`` / ``std``: per-channel standardisation after scaling to [0, 1].
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ValueError(
            "data.name: image_folder needs Pillow (the 'images' extra): pip install 'ngd_dist[images]'"
        ) from None
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data.args.path: {str(root)!r} is not a directory; expected root/<class>/<image>")
    if channels not in (1, 3):
        raise ValueError(f"data.args.channels: got {channels!r}; expected 1 or 3")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"data.args.size: got {size!r}; expected a positive integer or null")
    return ImageFolder(root, size, channels, mean, std)


class CIFAR10(Dataset[tuple[Tensor, Tensor]]):
    """CIFAR-10 records memory-mapped from its binary batch files."""

    def __init__(self, files: list[Path], mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        """Map ``files`` (each a whole number of 3073-byte records)."""
        self.maps = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD) for f in files]
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        """Number of images."""
        return int(self.offsets[-1])

    def _record(self, index: int) -> tuple[Tensor, Tensor]:
        """Record ``index`` as it is stored: a float ``(3, 32, 32)`` image in [0, 1] and its label."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        which = int(np.searchsorted(self.offsets, index, side="right")) - 1
        record = np.array(self.maps[which][index - self.offsets[which]])
        return torch.from_numpy(record[1:]).float().div_(255.0).view(3, 32, 32), torch.tensor(int(record[0]))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``index``: a float ``(3, 32, 32)`` tensor in [0, 1] (standardised if asked), its label."""
        x, label = self._record(index)
        return _standardise(x, self.mean, self.std), label


def _mixed_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per ``(seed, epoch, index)``: fixed odd multipliers spread them apart."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + 11) % 2**63


class AugmentedCIFAR10(CIFAR10):
    """:class:`CIFAR10` with a random crop (after zero padding) and a random horizontal flip.

    The draws of item ``i`` come from a generator seeded by ``(seed, epoch, i)``: an item is the
    same whichever DataLoader worker reads it (so a resumed run reads what an uninterrupted one
    did), and different in each epoch (the loader calls :meth:`set_epoch` before each one).
    """

    def __init__(
        self,
        files: list[Path],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        padding: int,
        seed: int,
    ) -> None:
        """Map ``files``; crop 32 x 32 out of the image padded by ``padding`` pixels on each side."""
        super().__init__(files, mean, std)
        self.padding, self.seed, self.epoch = padding, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s crops and flips from now on."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Image ``index`` cropped and maybe flipped (before standardisation), and its label."""
        x, label = self._record(index)
        gen = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch, index))
        side = 2 * self.padding + 1
        dy, dx = torch.randint(side, (2,), generator=gen).tolist()
        flip = bool(torch.rand(1, generator=gen) < 0.5)
        if self.padding:
            x = torch.nn.functional.pad(x, (self.padding,) * 4)[:, dy : dy + 32, dx : dx + 32]
        if flip:
            x = x.flip(-1)
        return _standardise(x, self.mean, self.std), label


def cifar10(
    path: str | os.PathLike[str],
    split: str = "train",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: bool = False,
    padding: int = 4,
    seed: int = 0,
) -> CIFAR10:
    """CIFAR-10's binary version in ``path`` (the ``cifar-10-batches-bin`` folder, or its parent).

    ``split``: ``"train"`` (the five data batches) or ``"test"``; ``mean`` / ``std``: per-channel
    standardisation after scaling to [0, 1]; ``augment``: a random 32 x 32 crop of the image
    zero-padded by ``padding`` pixels, and a random horizontal flip, drawn per ``(seed, epoch,
    index)`` (:class:`AugmentedCIFAR10`; ``seed`` is the job's unless set).
    """
    root = Path(path)
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    if split not in ("train", "test"):
        raise ValueError(f"data.args.split: got {split!r}; expected 'train' or 'test'")
    names = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    files = [root / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        pickled = (root / "data_batch_1").is_file() or (root.parent / "cifar-10-batches-py").is_dir()
        hint = (
            "; this looks like the Python (pickle) version, which is not loaded (unpickling can run "
            "code): use the binary version, cifar-10-binary.tar.gz"
            if pickled
            else ""
        )
        raise ValueError(f"data.args.path: {str(root)!r} lacks {', '.join(missing)}{hint}")
    for f in files:
        if f.stat().st_size % CIFAR_RECORD:
            raise ValueError(
                f"data.args.path: {str(f)!r} is {f.stat().st_size} bytes, not a whole number of "
                f"{CIFAR_RECORD}-byte CIFAR-10 records"
            )
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= 16:
        raise ValueError(f"data.args.padding: got {padding!r}; expected an integer in [0, 16]")
    if augment:
        return AugmentedCIFAR10(files, mean, std, padding, seed)
    return CIFAR10(files, mean, std)

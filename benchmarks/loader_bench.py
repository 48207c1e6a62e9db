"""Data loading against training: samples/s of the loader, with 0, 1 and 2 DataLoader workers, beside
the samples/s of the training step on the CIFAR-shaped job.

The dataset is CIFAR-shaped (3 x 32 x 32, 10 classes, ``synthetic_images``) behind a map-style
Dataset whose ``__getitem__`` augments each sample as a CIFAR pipeline does (random 4-pixel-padded
crop, random horizontal flip), so the work per item is real. It is read through the service's
:class:`~ngd_dist.service.data.loading.ShardedLoader` (rank 0 of 1, batch 64). The training step is
that of ``small_cnn`` (width 32) with iEF-K-FAC (factors every 10 steps, decompositions every 100)
and SGD, on pre-loaded batches, so the two rates are measured apart. Methods are interleaved
(workers 0, 1, 2, step, repeated) and the machine's load is recorded.

Run: ``.venv/bin/python benchmarks/loader_bench.py`` (``--quick`` for a smoke run). Writes
``benchmarks/results/loader_bench.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.service.data.datasets import synthetic_images
from ngd_dist.service.data.loading import ShardedLoader
from ngd_dist.service.models import small_cnn

BATCH = 64


class Augmented(Dataset[tuple[Tensor, Tensor]]):
    """CIFAR-style per-sample augmentation: padded random crop and random flip, drawn per access."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        """Hold the images ``(N, 3, 32, 32)`` and labels."""
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        """Number of items."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """One augmented image and its label."""
        x = F.pad(self.images[index], (4, 4, 4, 4))
        i, j = (int(v) for v in torch.randint(0, 9, (2,)))
        x = x[:, i : i + 32, j : j + 32]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), self.labels[index]


def loader_rate(dataset: Dataset[Any], workers: int, batches: int) -> float:
    """Samples per second of ``batches`` batches through a fresh loader (worker start-up included)."""
    loader = ShardedLoader(dataset, rank=0, world_size=1, batch_size=BATCH, seed=0, num_workers=workers)
    it = loader.forever()
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - start)


def step_rate(batches: list[tuple[Tensor, Tensor]]) -> float:
    """Samples per second of iEF-K-FAC training steps on pre-loaded batches."""
    torch.manual_seed(0)
    model = small_cnn(channels=3, width=32, side=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pc = KFACPreconditioner(
        model, KFACConfig(factor_every=10, inverse_every=100, output_module="5"), optimizer=opt
    )
    start = time.perf_counter()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pc.step()
        opt.step()
    return len(batches) * BATCH / (time.perf_counter() - start)


def main() -> None:
    """Measure, interleaved; write JSON, a markdown table and a bar chart."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 30 s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    n, batches, repeats = (1024, 5, 1) if args.quick else (8192, 40, args.repeats)
    images, labels = synthetic_images(n=n, channels=3, size=32, classes=10, seed=0)
    dataset = Augmented(images, labels)
    rows = [slice(i * BATCH, (i + 1) * BATCH) for i in range(batches)]
    preloaded = [(images[r], labels[r]) for r in rows]
    load = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"workers=0": [], "workers=1": [], "workers=2": [], "training step": []}
    for _ in range(repeats):
        for workers in (0, 1, 2):
            rates[f"workers={workers}"].append(loader_rate(dataset, workers, batches))
        rates["training step"].append(step_rate(preloaded))
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "torch": torch.__version__,
        "batch": BATCH,
        "batches_per_measure": batches,
        "samples_per_s": rates,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "loader_bench" if not args.quick else "loader_bench_quick"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Machine: {result['machine']}, load {load:.2f} before / {result['load_after']:.2f} after, "
        f"torch {torch.__version__}, batch {BATCH}, {repeats} interleaved repeats of {batches} batches.",
        "",
        "| what | samples/s (median) | min | max |",
        "|---|---:|---:|---:|",
    ]
    for name, values in rates.items():
        lines.append(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(rates)
    ax.bar(names, [statistics.median(v) for v in rates.values()], color=["C0", "C0", "C0", "C3"])
    ax.set_ylabel("samples/s (median)")
    ax.set_title("Loader (augmented CIFAR-shaped items) vs iEF-K-FAC training step")
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()

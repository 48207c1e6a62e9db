"""What one factor costs by its side n: memory, and the time of its decomposition on this machine.

This is how ``KFACConfig.max_factor_dim`` (above which a factor is kept diagonal) was chosen: a
factor of side n holds n^2 values (float32: 4 n^2 bytes, twice that with its eigenvectors) and its
eigendecomposition costs O(n^3). Run: ``.venv/bin/python benchmarks/factor_size.py`` (writes
benchmarks/results/factor_size.json and prints a markdown table).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

SIDES = (512, 1024, 2048, 4096, 8192)


def time_eigh(n: int, repeats: int) -> float:
    """Median seconds of ``torch.linalg.eigh`` on a random n x n PSD float32 matrix."""
    x = torch.randn(n, n)
    a = x @ x.t() / n + torch.eye(n) * 1e-3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.linalg.eigh(a)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Time each side, write the JSON, print the table."""
    rows = []
    for n in SIDES:
        seconds = time_eigh(n, repeats=3 if n <= 2048 else 1)
        mib = 4 * n * n / 2**20
        rows.append({"n": n, "eigh_s": seconds, "factor_mib": mib, "with_eigvecs_mib": 2 * mib})
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    path = Path(__file__).parent / "results" / "factor_size.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"machine: {out['machine']}, torch {out['torch']}, {out['threads']} threads")
    print("| side n | eigh (s) | factor (MiB) | factor + eigenvectors (MiB) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['eigh_s']:.2f} | {r['factor_mib']:.0f} | {r['with_eigvecs_mib']:.0f} |")


if __name__ == "__main__":
    main()

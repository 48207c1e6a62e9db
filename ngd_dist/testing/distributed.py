"""Run a function on several gloo ranks (processes on this machine), bounded in time.

For tests and benchmarks of data-parallel code on one machine, without a launcher.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` spawned processes, initialises
torch.distributed (gloo, loopback) in each, calls ``fn(rank, world_size, *args)`` and returns the
results by rank. An exception on any rank, or the time limit, fails the caller; every process is
killed before returning, so no test leaves orphans behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ngd_dist.kfac.distributed.ports import free_port, free_ports

__all__ = ["free_port", "free_ports", "run_ranks"]


def _worker(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        result = fn(rank, world, *args)
        out.put((rank, "ok", result))
        # Every rank finished: wait for the others before tearing down, or a rank that leaves
        # first can abort a peer still inside its last collective.
        dist.barrier()
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be importable (a module-level function). Raises AssertionError with the failing
    rank's traceback, or when ``timeout`` seconds pass; all processes are gone when it returns.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, value = out.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    except queue.Empty:
        errors.append(
            f"timed out after {timeout} s waiting for ranks {sorted(set(range(world_size)) - set(results))}"
        )
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]

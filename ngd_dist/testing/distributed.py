"""Run a function on several gloo ranks (processes on this machine), bounded in time.

For tests and benchmarks of data-parallel code on one machine, without a launcher.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` spawned processes, initialises
torch.distributed (gloo, loopback) in each, calls ``fn(rank, world_size, *args)`` and returns the
results by rank. An exception on any rank, or the time limit, fails the caller; every process is
killed before returning, so no test leaves orphans behind.

``@distributed_test(world_sizes=(1, 2, 3))`` turns a test body ``test_x(rank, world_size, ...)``
into one pytest test per world size that runs the body on every rank through ``run_ranks``;
``all_ranks(value)`` gives such a body every rank's value for its cross-rank checks.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from ngd_dist.kfac.distributed.ports import free_port, free_ports

T = TypeVar("T")

__all__ = ["all_ranks", "distributed_test", "free_port", "free_ports", "run_ranks"]


def _worker(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: Any, backend: str = "gloo"
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
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


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo"
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be importable (a module-level function). Raises AssertionError with the failing
    rank's traceback, or when ``timeout`` seconds pass; all processes are gone when it returns.
    ``backend="nccl"``: one GPU per rank (rank r on ``cuda:r``) instead of gloo.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, out, backend), daemon=True)
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


class _RankBody:
    """A distributed test's body, named by module and function so a spawned rank can import it.

    The module attribute is the pytest-facing wrapper; the body is what it wraps.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, rank: int, world_size: int, params: dict[str, Any]) -> None:
        body = inspect.unwrap(getattr(importlib.import_module(self.module), self.name))
        body(rank, world_size, **params)


def distributed_test(
    world_sizes: Sequence[int] = (1, 2, 3), *, timeout: float = 120.0
) -> Callable[[Callable[..., object]], Callable[..., None]]:
    """Run a test body on gloo ranks, as one pytest test per world size (id ``world_size=N``).

    The body is a module-level ``def test_x(rank, world_size, ...)``: every rank runs it and
    asserts for itself (cross-rank checks gather values with :func:`all_ranks`).
    Its other arguments are pytest parameters and fixtures, handed to every rank, so their values
    must pickle (``tmp_path`` does). A failing rank fails the test with that rank's traceback, as
    does a rank still running after ``timeout`` seconds. pytest does not rewrite the assertions
    a rank runs: give them messages that show the values.
    """
    sizes = tuple(world_sizes)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"world_sizes: got {world_sizes!r}; expected a non-empty sequence of integers >= 1")

    def decorate(body: Callable[..., object]) -> Callable[..., None]:
        import pytest  # a dependency of the tests, not of the package

        parameters = list(inspect.signature(body).parameters.values())
        if [p.name for p in parameters[:2]] != ["rank", "world_size"]:
            raise TypeError(
                f"{body.__qualname__}: a distributed test's first two parameters must be (rank, world_size)"
            )
        if "." in body.__qualname__ or "<" in body.__qualname__:  # nested, a method, or a lambda
            raise TypeError(f"{body.__qualname__}: must be a module-level function (each rank imports it)")
        target = _RankBody(body.__module__, body.__name__)

        @functools.wraps(body)
        def run(world_size: int, **params: Any) -> None:
            run_ranks(target, world_size, params, timeout=timeout)

        # pytest reads the arguments from here: world_size and the body's own, not rank
        run.__signature__ = inspect.Signature(parameters[1:])  # type: ignore[attr-defined]
        ids = [f"world_size={n}" for n in sizes]
        parametrized: Callable[..., None] = pytest.mark.parametrize("world_size", sizes, ids=ids)(run)
        return parametrized

    return decorate


def all_ranks(value: T) -> list[T]:
    """Every rank's ``value``, by rank: for the cross-rank checks of a distributed test body.

    A collective (``all_gather_object`` on the default group): every rank must call it.
    """
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out

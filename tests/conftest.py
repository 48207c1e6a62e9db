"""Test-wide settings and the small models and data several test modules build.

One torch thread: the tensors are tiny, threads only add overhead (and contend on a busy machine).
The processes the tests start get one OpenMP thread too (``OMP_NUM_THREADS=1`` unless set): with two
spinning threads per process, a one-process ``ngd-dist train`` on a busy 2-core machine was measured
at 65 s instead of 4 s.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

from tests.support import CommandServer

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir() -> Iterator[str]:
    """A TMPDIR for every process the tests start, removed at the end of the session.

    A test that SIGKILLs a launch (on purpose, or on its timeout) leaves the launch no chance to remove
    its private folder; with this, nothing of the suite's jobs stays in /tmp.
    """
    scratch = tempfile.mkdtemp(prefix="ngd-tests-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    try:
        yield scratch
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def commands(scratch_tmpdir: str, one_thread_per_child: None) -> Iterator[CommandServer]:
    """A :class:`tests.support.CommandServer`: ``ngd-dist`` commands forked from one process (started on
    first use, stopped at the end of the session)."""
    server = CommandServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_child() -> Iterator[None]:
    """``OMP_NUM_THREADS=1`` for every process the tests start, unless the environment sets it (the
    launchers set it for their workers as well, except ``mpirun``)."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _tanh_mlp(*widths: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    if len(widths) < 2:
        raise ValueError(f"widths: got {widths}; expected at least an input and an output width")
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).to(dtype)


def _classification_batch(
    rows: int, features: int, classes: int, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    return torch.randn(rows, features, dtype=dtype), torch.randint(0, classes, (rows,))


@pytest.fixture
def tanh_mlp() -> Callable[..., nn.Sequential]:
    """``tanh_mlp(4, 8, 3, seed=0, dtype=...)``: Linear(4, 8), Tanh, Linear(8, 3) (modules "0", "2").

    Seeded with ``torch.manual_seed(seed)`` first when ``seed`` is given; else it draws from the
    global generator where it stands.
    """
    return _tanh_mlp


@pytest.fixture
def classification_batch() -> Callable[..., tuple[Tensor, Tensor]]:
    """``classification_batch(rows, features, classes, dtype=...)``: standard normal inputs and uniform
    labels, drawn from the global generator (inputs first)."""
    return _classification_batch


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """The ``ngd_dist`` logger as before the test: a command run in-process (``main(["train", ...])``)
    sets up the worker's logging, which must not reach the tests that follow."""
    logger = logging.getLogger("ngd_dist")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]

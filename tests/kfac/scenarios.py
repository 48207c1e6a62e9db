"""One small data-parallel training run, configurable by a scenario dict: the same run on several ranks
(each with a share of the batch) must match one process on the whole batch.

Used by the gloo tests (tests/kfac/test_distributed.py) and under a real ``mpirun``
(tests/kfac/mpi_worker.py); plain functions, since every rank imports them.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac.distributed import LocalCommunicator

BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
STEPS = 5

Scenario = dict[str, Any]

SCENARIOS: list[Scenario] = [
    {"placement": p, "ddp": d, "refresh": r, "curvature": c, "assignment": a}
    for (p, d, r), c, a in zip(
        itertools.product(("memory", "communication", "hybrid"), (False, True), ("fixed", "adaptive")),
        itertools.cycle(("ief", "ef")),
        itertools.cycle(("round_robin", "round_robin", "greedy")),
        strict=False,
    )
]
"""Every placement x DDP or not x refresh policy, with both curvatures and both assignments."""


def model() -> nn.Module:
    """Conv2d, ReLU, Flatten, Linear, Tanh, Linear: three preconditioned layers, the head named "5"."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 10),
        nn.Tanh(),
        nn.Linear(10, 5),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def config(scenario: Scenario, head: str) -> KFACConfig:
    """The scenario's preconditioner: statistics every step, decompositions every other step."""
    return KFACConfig(
        curvature=scenario["curvature"],
        placement=scenario["placement"],
        assignment=scenario["assignment"],
        refresh=scenario["refresh"],
        comm_dtype=scenario.get("comm_dtype", "float32"),
        transport=scenario.get("transport", "torch"),
        factor_every=1,
        inverse_every=2,
        refresh_low=0.02,
        refresh_high=0.3,
        refresh_cap=4,
        damping=1e-2,
        kl_clip=1e-2,
        output_module=head,
    )


def train(
    scenario: Scenario, rank: int, world: int, distributed: bool, overflow_on_rank: int | None = None
) -> tuple[list[torch.Tensor], KFACPreconditioner]:
    """``STEPS`` steps of SGD with K-FAC; the final parameters and the preconditioner.

    ``distributed``: this rank's share of each batch, collectives over the initialised process
    group; else the whole batch in this process alone (the reference). ``overflow_on_rank``: that
    rank's input gets a 1e20 at step 2, whose statistics overflow float32 while loss and gradients
    stay finite (and no optimizer step is taken anywhere).
    """
    net = model()
    head = "5"
    if distributed and scenario["ddp"]:
        net = DistributedDataParallel(net)
        head = "module.5"
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    comm = None if distributed else LocalCommunicator()
    amp = scenario.get("amp", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=amp)
    pc = KFACPreconditioner(net, config(scenario, head), optimizer=opt, communicator=comm, grad_scaler=scaler)
    share = BATCH // world if distributed else BATCH
    start = rank * share if distributed else 0
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[start : start + share], y[start : start + share]
        if overflow_on_rank is not None and step == 2 and rank == overflow_on_rank:
            x = x.clone()
            x[0, 0, 0, 0] = 1e20
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pc.step()
        if overflow_on_rank is None:
            scaler.step(opt)
        scaler.update()
    params = [p.detach().clone() for p in net.parameters()]
    return params, pc


def rel_diff(params: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference of a parameter tensor from the reference, relative to its largest entry."""
    return max(float((p - r).abs().max() / (r.abs().max() + 1e-12)) for p, r in zip(params, reference, strict=True))

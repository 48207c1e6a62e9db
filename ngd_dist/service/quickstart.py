"""The quickstart job: an MLP on the embedded digits data with the K-FAC preconditioner on.

A single process for now; it becomes the 2-rank launcher job once the training service exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ngd_dist.kfac.config import Curvature, KFACConfig
from ngd_dist.kfac.preconditioner import KFACPreconditioner
from ngd_dist.service.data import load_digits
from ngd_dist.service.models import mlp


@dataclass(kw_only=True)
class QuickstartResult:
    """What a quickstart run reports."""

    losses: list[float]
    test_accuracy: float
    seconds: float


def run_quickstart(
    *,
    steps: int = 60,
    batch_size: int = 512,
    lr: float = 0.1,
    curvature: str = "ief",
    seed: int = 0,
    log_every: int = 10,
    verbose: bool = True,
) -> QuickstartResult:
    """Train on 1,497 digits, test on the other 300, and print the training loss as it falls."""
    torch.manual_seed(seed)
    images, labels = load_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:-300], order[-300:]
    model = mlp(hidden=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    precond = KFACPreconditioner(
        model,
        KFACConfig(
            curvature=Curvature.parse("curvature", curvature),
            output_module="5",
            damping=1e-3,
            factor_every=1,
            inverse_every=5,
        ),
        optimizer=optimizer,
    )
    sampler = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(len(train), (batch_size,), generator=sampler)]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        precond.step()
        optimizer.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:4d}  loss {loss.item():.4f}  kl_scale {precond.stats.kl_scale:.3f}", flush=True
            )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    if verbose:
        print(
            f"done: {steps} steps in {seconds:.1f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"test accuracy {accuracy:.3f}, curvature={curvature}"
        )
    return QuickstartResult(losses=losses, test_accuracy=accuracy, seconds=seconds)

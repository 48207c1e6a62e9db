"""Small built-in models used by the quickstart, the tests and the benchmarks."""

from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: int = 128, classes: int = 10, depth: int = 2) -> nn.Sequential:
    """A ReLU MLP that flattens its input; ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(channels: int = 1, classes: int = 10, width: int = 16, side: int = 8) -> nn.Sequential:
    """Two 3x3 convolutions (the second with stride 2) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * ((side + 1) // 2) ** 2, classes),
    )

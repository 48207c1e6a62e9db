"""The README's main job, run as a new user would."""

import pytest

from ngd_dist.service.data import load_digits
from tests.support import run_cli


def test_embedded_digits_load() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8)
    assert labels.shape == (1797,)
    assert float(images.min()) == 0.0
    assert float(images.max()) == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))


@pytest.mark.parametrize("curvature", ["ief", "ef", "mc"])
def test_quickstart_cli_trains(curvature: str) -> None:
    proc = run_cli("quickstart", "--steps", "30", "--curvature", curvature, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    first, last = summary.split("loss ")[1].split(",")[0].split(" -> ")
    assert float(last) < 0.5 * float(first), summary

"""The mpi4py transport and the MPI bootstrap under a real `mpirun` (Open MPI, as root)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.support import cli_env, run_process


def mpirun(np: int, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mpirun")
    assert exe, "mpirun not found: `make test` installs Open MPI (openmpi-bin)"
    cmd = [exe, "--allow-run-as-root", "--oversubscribe", "-np", str(np), "--mca", "btl", "self,tcp",
           sys.executable, "-m", "tests.kfac.mpi_worker"]
    return run_process(cmd, timeout=timeout, env=cli_env(OMPI_MCA_rmaps_base_oversubscribe="1"))


@pytest.mark.parametrize("np", [2, 3])
def test_equivalence_under_mpirun_with_mpi_and_torch_transports(np: int) -> None:
    result = mpirun(np)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["world"] == np
    assert summary["checked"] == 12
    assert summary["max_rel_diff"] < 2e-5

"""The mpi4py transport and the MPI bootstrap under a real `mpirun` (Open MPI, as root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def mpirun(np: int, timeout: float = 240) -> subprocess.CompletedProcess:
    exe = shutil.which("mpirun")
    assert exe, "mpirun not found: `make test` installs Open MPI (openmpi-bin)"
    cmd = [exe, "--allow-run-as-root", "--oversubscribe", "-np", str(np), "--mca", "btl", "self,tcp",
           sys.executable, "-m", "tests.kfac.mpi_worker"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpirun -np {np} timed out after {timeout} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("np", [2, 3])
def test_equivalence_under_mpirun_with_mpi_and_torch_transports(np: int) -> None:
    result = mpirun(np)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["world"] == np
    assert summary["checked"] == 12
    assert summary["max_rel_diff"] < 2e-5

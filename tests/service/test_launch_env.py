"""The launchers' environment: one compute thread per worker when several share a node."""

from __future__ import annotations

import pytest

from ngd_dist.service.launch import LaunchSpec, build_command, launch_env


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "deepspeed"])
def test_several_workers_per_node_get_one_thread_each_unless_the_user_says(launcher: str) -> None:
    spec = LaunchSpec(config="job.yaml", launcher=launcher, nproc=2)
    assert launch_env(spec, {})["OMP_NUM_THREADS"] == "1"
    assert launch_env(spec, {"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in launch_env(LaunchSpec(config="job.yaml", launcher=launcher, nproc=1), {})


def test_mpirun_forwards_the_thread_count_to_its_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open MPI passes only the variables named with -x to ranks on other nodes."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = build_command(LaunchSpec(config="job.yaml", launcher="mpirun", nproc=2))
    assert argv[argv.index("OMP_NUM_THREADS") - 1 : argv.index("OMP_NUM_THREADS") + 1] == ["-x", "OMP_NUM_THREADS"]
    single = build_command(LaunchSpec(config="job.yaml", launcher="mpirun", nproc=1))
    assert "OMP_NUM_THREADS" not in single

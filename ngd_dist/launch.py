"""``ngd-dist launch``: the command line each launcher needs to start ``ngd-dist train`` workers.

- torchrun: ``python -m torch.distributed.run --nproc-per-node N [--nnodes M --node-rank R
  --master-addr A --master-port P] [--max-restarts K] -m ngd_dist.cli train CONFIG ...``
- mpirun (Open MPI): ``mpirun -np N [--hostfile F] [--allow-run-as-root] -x PATH -x PYTHONPATH
  python -m ngd_dist.cli train CONFIG ...``; ranks and the rendezvous come from MPI, so no
  ``MASTER_ADDR`` is needed. ``--allow-run-as-root`` is added when running as root (containers).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field

LAUNCHERS = ("torchrun", "mpirun")


@dataclass(kw_only=True)
class LaunchSpec:
    """How to start the workers of one job."""

    config: str
    launcher: str
    nproc: int
    overrides: list[str] = field(default_factory=list)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_restarts: int = 0
    hostfile: str | None = None


def build_command(spec: LaunchSpec) -> list[str]:
    """The argv that starts ``spec.nproc`` workers per node with ``spec.launcher``."""
    if spec.launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: got {spec.launcher!r}; expected one of {', '.join(LAUNCHERS)}")
    if spec.nproc < 1:
        raise ValueError(f"--nproc: got {spec.nproc}; expected an integer >= 1")
    worker = ["-m", "ngd_dist.cli", "train", spec.config]
    for override in spec.overrides:
        worker += ["--set", override]
    if spec.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(spec.nproc)]
        if spec.nnodes > 1:
            cmd += [
                "--nnodes",
                str(spec.nnodes),
                "--node-rank",
                str(spec.node_rank),
                "--master-addr",
                spec.master_addr,
                "--master-port",
                str(spec.master_port),
            ]
        else:
            cmd += ["--standalone"]
        if spec.max_restarts:
            cmd += ["--max-restarts", str(spec.max_restarts)]
        return cmd + worker
    mpirun = shutil.which("mpirun") or "mpirun"
    cmd = [mpirun, "-np", str(spec.nproc * spec.nnodes)]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["--allow-run-as-root"]
    cmd += ["--oversubscribe"]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV"):
        if name in os.environ:
            cmd += ["-x", name]
    return cmd + [sys.executable] + worker


def format_command(argv: list[str]) -> str:
    """The argv as one shell-quoted line (what ``--dry-run`` prints)."""
    return shlex.join(argv)

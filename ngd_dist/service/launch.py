"""``ngd-dist launch``: the command line each launcher needs to start ``ngd-dist train`` workers.

- torchrun: ``python -m torch.distributed.run --nproc-per-node N [--nnodes M --node-rank R
  --master-addr A --master-port P] [--max-restarts K] -m ngd_dist.cli train CONFIG ...``
- mpirun (Open MPI): ``mpirun -np N [--hostfile F] [--allow-run-as-root] -x PATH -x PYTHONPATH
  python -m ngd_dist.cli train CONFIG ...``; ranks and the rendezvous come from MPI, so no
  ``MASTER_ADDR`` is needed. ``--allow-run-as-root`` is added when running as root (containers).
- deepspeed: ``deepspeed --num_gpus N [--hostfile F --num_nodes M --no_ssh --node_rank R]
  --master_addr A --master_port P --module ngd_dist.cli train CONFIG --deepspeed ...``, the
  ``deepspeed`` script next to this Python. ``--num_gpus`` is the number of workers per node (CPU
  ranks where there is no GPU); the launcher adds ``--local_rank=N``, which the CLI accepts and
  ignores. Several nodes need a hostfile (``host slots=N`` lines) and, like torchrun, one launch per
  node with its ``--node-rank`` (DeepSpeed's ``--no_ssh`` mode: no pdsh or ssh between nodes).
  ``--deepspeed`` makes the worker step through DeepSpeed's engine
  (:mod:`ngd_dist.service.deepspeed_engine`); :func:`launch_env` sets ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHERS = ("torchrun", "mpirun", "deepspeed")


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
    if spec.launcher == "deepspeed":
        return _deepspeed_command(spec) + worker[1:] + ["--deepspeed"]  # --module: no "-m"
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
    return [*cmd, sys.executable, *worker]


def _deepspeed_command(spec: LaunchSpec) -> list[str]:
    """DeepSpeed's launcher, up to the module it runs (``--module``: ``python -m``)."""
    beside = Path(sys.executable).with_name("deepspeed")
    exe = str(beside) if beside.exists() else shutil.which("deepspeed") or "deepspeed"
    cmd = [exe, "--num_gpus", str(spec.nproc)]
    if spec.nnodes > 1:
        if not spec.hostfile:
            raise ValueError("--hostfile: deepspeed over several nodes needs a hostfile")
        cmd += [
            "--hostfile",
            spec.hostfile,
            "--num_nodes",
            str(spec.nnodes),
            "--no_ssh",
            "--node_rank",
            str(spec.node_rank),
        ]
    cmd += ["--master_addr", spec.master_addr, "--master_port", str(spec.master_port), "--module"]
    return cmd


def launch_env(spec: LaunchSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start ``spec``'s launcher in.

    ``environ`` (default ``os.environ``), plus for DeepSpeed, when they are unset:
    ``TORCH_EXTENSIONS_DIR`` (see :mod:`ngd_dist.service.deepspeed_engine`), and with several workers
    per node ``OMP_NUM_THREADS=1``, which torchrun sets on its own (without it the ranks' thread pools
    compete for the cores: the quickstart runs 2-3x slower on 2 cores).
    """
    env = dict(os.environ if environ is None else environ)
    if spec.launcher == "deepspeed":
        from ngd_dist.service.deepspeed_engine import ensure_extensions_dir

        ensure_extensions_dir(env)
        if spec.nproc > 1:
            env.setdefault("OMP_NUM_THREADS", "1")
    return env


def format_command(argv: list[str]) -> str:
    """The argv as one shell-quoted line (what ``--dry-run`` prints)."""
    return shlex.join(argv)


def run_forwarding_signals(argv: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run the launcher ``argv`` to its end and return its exit code, passing SIGTERM/SIGINT on.

    A scheduler or ``docker stop`` signals ``ngd-dist launch``, not the launcher under it: the
    signal is handed to the launcher (which hands it to the workers, which checkpoint and stop),
    and this process waits for it instead of dying first and orphaning the job. A second SIGINT
    is passed on too, never turned into a kill.
    """
    proc = subprocess.Popen(argv, env=env)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # a handler replaced behind our back: keep waiting
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

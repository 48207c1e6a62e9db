"""The ``ngd-dist`` command line.

- ``ngd-dist train CONFIG [--set a.b=value ...]``: one worker; runs alone or under any launcher.
- ``ngd-dist launch CONFIG --launcher torchrun|mpirun|deepspeed --nproc N [...] [--dry-run]``:
  start the workers through a launcher (deepspeed: the workers run ``train --deepspeed``).
- ``ngd-dist validate CONFIG [--set ...]``: check a job and print it resolved, without running it.
- ``ngd-dist quickstart``: a single-process demo on the embedded digits data.

A bad job (or bad arguments) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ngd_dist.service.jobs import Job

from ngd_dist.kfac.config import CURVATURES
from ngd_dist.service.launch import LAUNCHERS

EXIT_BAD_INPUT = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _add_job(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML job file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job key, e.g. --set optimizer.lr=0.05 (repeatable)",
    )


def _accept_local_rank(parser: argparse.ArgumentParser) -> None:
    """Accept and ignore ``--local_rank=N``, which DeepSpeed's launcher passes to every worker."""
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ngd-dist`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="ngd-dist", description="Distributed natural-gradient training.")
    _accept_local_rank(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one worker of a job (alone or under a launcher)")
    _add_job(train)
    _accept_local_rank(train)
    train.add_argument(
        "--deepspeed",
        action="store_true",
        help="step through a DeepSpeed engine (added by `launch --launcher deepspeed`)",
    )
    _add_job(sub.add_parser("validate", help="check a job without running it; print it resolved"))
    launch = sub.add_parser("launch", help="start a job's workers through torchrun, mpirun or deepspeed")
    _add_job(launch)
    launch.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    launch.add_argument("--nproc", type=_positive_int, default=1, help="workers per node")
    launch.add_argument("--nnodes", type=_positive_int, default=1)
    launch.add_argument("--node-rank", type=int, default=0)
    launch.add_argument("--master-addr", default="127.0.0.1")
    launch.add_argument("--master-port", type=int, default=29500)
    launch.add_argument("--max-restarts", type=int, default=0, help="torchrun: restarts after a worker fails")
    launch.add_argument(
        "--hostfile", help="mpirun, deepspeed: hostfile of the nodes (see launch/hostfile.example)"
    )
    launch.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    quick = sub.add_parser("quickstart", help="single-process demo: an MLP on the embedded digits data")
    quick.add_argument("--steps", type=_positive_int, default=60)
    quick.add_argument("--batch-size", type=_positive_int, default=512)
    quick.add_argument("--lr", type=float, default=0.1)
    quick.add_argument("--curvature", choices=CURVATURES, default="ief")
    quick.add_argument("--seed", type=int, default=0)
    return parser


def _load(config: str, overrides: list[str]) -> Job:
    from ngd_dist.service.jobs import load_job

    return load_job(config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ngd-dist`` console script."""
    args = build_parser().parse_args(argv)
    from ngd_dist.service.jobs import JobError

    try:
        if args.command == "validate":
            from ngd_dist.service.jobs import job_to_yaml

            job = _load(args.config, args.overrides)
            print(job_to_yaml(job), end="")
            print(f"# {args.config}: valid", file=sys.stderr)
            return 0
        if args.command == "train":
            job = _load(args.config, args.overrides)
            from ngd_dist.service.trainer import run_job

            result = run_job(job, job_dir=Path(args.config).resolve().parent, deepspeed=args.deepspeed)
            return 0 if result.steps > 0 else 1
        if args.command == "launch":
            from ngd_dist.service.launch import (
                LaunchSpec,
                build_command,
                format_command,
                launch_env,
                run_forwarding_signals,
            )

            job = _load(args.config, args.overrides)
            job.batch.check_world(args.nproc * args.nnodes)
            if args.launcher in ("mpirun", "deepspeed") and args.nnodes > 1 and not args.hostfile:
                raise JobError(
                    f"--hostfile: {args.launcher} over several nodes needs a hostfile "
                    "(launch/hostfile.example)"
                )
            if args.launcher == "deepspeed":
                from ngd_dist.service.deepspeed_engine import check_job

                check_job(job)
                if args.max_restarts:
                    raise JobError(
                        f"--max-restarts: got {args.max_restarts}; only --launcher torchrun restarts workers"
                    )
            spec = LaunchSpec(
                config=args.config,
                launcher=args.launcher,
                nproc=args.nproc,
                overrides=args.overrides,
                nnodes=args.nnodes,
                node_rank=args.node_rank,
                master_addr=args.master_addr,
                master_port=args.master_port,
                max_restarts=args.max_restarts,
                hostfile=args.hostfile,
            )
            argv_ = build_command(spec)
            print(format_command(argv_), file=sys.stderr if not args.dry_run else sys.stdout, flush=True)
            if args.dry_run:
                return 0
            return run_forwarding_signals(argv_, env=launch_env(spec))
    except JobError as exc:
        print(f"ngd-dist {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from ngd_dist.service.quickstart import run_quickstart

    demo = run_quickstart(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, curvature=args.curvature, seed=args.seed
    )
    return 0 if demo.losses[-1] < demo.losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``ngd-dist`` command line.

- ``ngd-dist train CONFIG [--set a.b=value ...]``: one worker; runs alone or under any launcher.
- ``ngd-dist launch CONFIG --launcher torchrun|mpirun|deepspeed --nproc N [...] [--dry-run]``:
  start the workers through a launcher (deepspeed: the workers run ``train --deepspeed``).
- ``ngd-dist validate CONFIG [--set ...]``: check a job and print it resolved, without running it.
- ``ngd-dist quickstart``: a single-process demo on the embedded digits data.

Exit codes (:class:`~ngd_dist.service.exit_codes.ExitCode`, docs/reliability.md): 0 done, 2 a bad
job, data, model or resume target, 3 diverged (``train.max_bad_steps`` non-finite steps in a row, or
a non-finite state refused at a save), 4 a factor that kept failing to decompose
(``preconditioner.max_failed_decompositions``), 5 a checkpoint that could not be written, 75 preempted
(SIGTERM/SIGINT: every rank checkpointed; launch again to resume), 1 anything unexpected (with its
traceback). A classified failure prints one line on stderr, no traceback. ``launch`` exits with the
code of the worker whose failure came first and prints its line; the other workers are stopped
within seconds (at most the launcher's shutdown timeout, 30 s), never after the collective timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ngd_dist.service.jobs import Job

from ngd_dist.kfac.config import Curvature
from ngd_dist.service.exit_codes import ExitCode
from ngd_dist.service.launch import LAUNCHERS


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
    launch = sub.add_parser(
        "launch",
        help="start a job's workers through torchrun, mpirun or deepspeed",
        description="Start a job's workers through a launcher and wait for them. When any worker fails, "
        "the others are stopped within seconds (at most the launcher's 30 s shutdown timeout) and the "
        "launch prints the first failure as one line and exits with its code: 2 bad job or data, "
        "3 diverged, 4 decomposition failed, 5 checkpoint not written, 1 unexpected. SIGTERM/SIGINT is "
        "passed to the workers, which checkpoint; the launch then exits 75 (launch again to resume).",
    )
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
    quick.add_argument("--curvature", choices=Curvature.choices(), default=Curvature.IEF.value)
    quick.add_argument("--seed", type=int, default=0)
    return parser


def _load(config: str, overrides: list[str]) -> Job:
    from ngd_dist.service.jobs import load_job

    return load_job(config, overrides)


def _loopback(address: str) -> bool:
    """Whether ``address`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: resolved on each node, not ours to judge
        return False


def _exit_codes() -> list[tuple[type[BaseException], int]]:
    """The errors a worker reports as one line with a documented exit code, most specific first.

    Anything else is unexpected: ``ExitCode.INTERNAL``, with its traceback.
    """
    from ngd_dist.kfac.linalg import DecompositionError
    from ngd_dist.service.checkpoint import CheckpointError, CheckpointWriteError
    from ngd_dist.service.jobs import JobError
    from ngd_dist.service.trainer import TrainingDiverged

    return [
        (JobError, ExitCode.BAD_INPUT),
        (TrainingDiverged, ExitCode.DIVERGED),
        (DecompositionError, ExitCode.DECOMPOSITION_FAILED),
        (CheckpointWriteError, ExitCode.CHECKPOINT_FAILED),
        (CheckpointError, ExitCode.BAD_INPUT),  # a resume target that cannot be loaded
        # SIGINT before the loop handles it, or a second one while it saves: the last checkpoint stands
        (KeyboardInterrupt, ExitCode.PREEMPTED),
    ]


def _one_line(exc: BaseException) -> str:
    from ngd_dist.kfac.linalg import DecompositionError

    text = " ".join(str(exc).split())
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT before this step's checkpoint; the last checkpoint stands"
    if isinstance(exc, DecompositionError):  # name the remedies as the job's keys
        return exc.message("preconditioner")
    return text or type(exc).__name__


def _train(args: argparse.Namespace) -> int:
    """``ngd-dist train``: run one worker; 0 when done, 75 when preempted, else :func:`_worker_failed`."""
    try:
        job = _load(args.config, args.overrides)
        from ngd_dist.service.trainer import run_job

        result = run_job(job, job_dir=Path(args.config).resolve().parent, deepspeed=args.deepspeed)
    except (Exception, KeyboardInterrupt) as exc:
        return _worker_failed(exc)
    if result.preempted:
        from ngd_dist.service.failure import record_failure, worker_place

        saved = "checkpoint saved" if job.checkpoint.dir else "nothing saved (no checkpoint.dir)"
        rank, world_size = worker_place()
        message = f"stopped by a signal at step {result.steps}, {saved}"
        record_failure(ExitCode.PREEMPTED, message, rank=rank, world_size=world_size)
        return ExitCode.PREEMPTED
    return ExitCode.OK if result.steps > 0 else ExitCode.INTERNAL


def _worker_failed(exc: BaseException) -> int:
    """Say in one line why this worker failed, leave its record for ``ngd-dist launch``, and exit.

    A classified error (:func:`_exit_codes`) is its message; an unexpected one prints its traceback
    first, unless another rank recorded its failure before (then this one is a consequence: its
    collective broke because that rank left). When the process group is still up (the error path
    never waits for the other ranks, which may be inside another collective) the process exits at
    once with ``os._exit``, so no teardown can block; otherwise the code is returned.
    """
    import traceback

    import torch.distributed as dist

    from ngd_dist.service.failure import failed_before, record_failure, worker_place

    rank, world_size = worker_place()
    code: int | None = next((c for kind, c in _exit_codes() if isinstance(exc, kind)), None)
    message = _one_line(exc)
    if code is None:
        code = ExitCode.INTERNAL
        first = failed_before(rank)
        if first is not None:
            message = f"stopped: rank {first.rank} failed first (here: {type(exc).__name__})"
        else:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            message = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    where = f"rank {rank}: " if world_size > 1 else ""
    print(f"ngd-dist train: {where}{message}", file=sys.stderr, flush=True)
    record_failure(code, message, rank=rank, world_size=world_size)
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ngd-dist`` console script."""
    args = build_parser().parse_args(argv)
    from ngd_dist.service.jobs import JobError

    try:
        if args.command == "validate":
            from ngd_dist.service.jobs import job_to_yaml
            from ngd_dist.service.resume import check_resume

            job = _load(args.config, args.overrides)
            check_resume(job.checkpoint, job.batch.world_size)  # an explicit resume's files are there
            print(job_to_yaml(job), end="")
            print(f"# {args.config}: valid", file=sys.stderr)
            return 0
        if args.command == "train":
            return _train(args)
        if args.command == "launch":
            from ngd_dist.service.launch import (
                LaunchSpec,
                build_command,
                format_command,
                launch_env,
                run_launch,
            )

            job = _load(args.config, args.overrides)
            job.batch.check_world(args.nproc * args.nnodes)
            if args.launcher in ("mpirun", "deepspeed") and args.nnodes > 1 and not args.hostfile:
                raise JobError(
                    f"--hostfile: {args.launcher} over several nodes needs a hostfile "
                    "(launch/hostfile.example)"
                )
            several_nodes = args.nnodes > 1 and args.launcher in ("torchrun", "deepspeed")
            if several_nodes and _loopback(args.master_addr):
                raise JobError(
                    f"--master-addr: got {args.master_addr!r} with --nnodes {args.nnodes}; expected the "
                    "address of node 0 that every node can reach (a loopback address makes the other "
                    "nodes wait forever)"
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
            outcome = run_launch(spec, argv_, launch_env(spec))
            if outcome.message is not None:
                print(f"{outcome.report}ngd-dist launch: {outcome.message}", file=sys.stderr, flush=True)
            return outcome.code
    except JobError as exc:
        print(f"ngd-dist {args.command}: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from ngd_dist.service.quickstart import run_quickstart

    demo = run_quickstart(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, curvature=args.curvature, seed=args.seed
    )
    return 0 if demo.losses[-1] < demo.losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())

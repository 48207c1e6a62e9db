"""The ``ngd-dist`` command line.

- ``ngd-dist train CONFIG [--set a.b=value ...]``: one worker; runs alone or under any launcher.
- ``ngd-dist launch CONFIG --launcher torchrun|mpirun|deepspeed --nproc N [...] [--dry-run]``:
  start the workers through a launcher (deepspeed: the workers run ``train --deepspeed``).
- ``ngd-dist validate CONFIG [--set ...] [--target here|cpu|gpu]``: check a job and print it
  resolved, without running it: the schema, then what its keys name (the model, built on the meta
  device; the data factory; the machine; the extras; :mod:`ngd_dist.service.jobs.preflight`).
  ``train`` and ``launch`` make the same checks before they start. An empty job file is refused
  unless ``--allow-defaults`` is given.
- ``ngd-dist export CHECKPOINT_OR_DIR --out FILE [--format safetensors|pt]``: the trained weights
  of a checkpoint as a safetensors (or plain ``torch.save``) file and a JSON sidecar.
- ``ngd-dist report RUN_DIR [RUN_DIR ...] [--out report.png]``: a table of runs and a plot of
  their ``metrics.jsonl``.
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
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ngd_dist.service.jobs import Job

from ngd_dist.kfac.config import Curvature
from ngd_dist.service.exit_codes import ExitCode
from ngd_dist.service.jobs.errors import JobError
from ngd_dist.service.jobs.preflight import TARGETS
from ngd_dist.service.launch import LAUNCHERS

EXPORT_FORMATS = ("safetensors", "pt")
"""``ngd-dist export --format``."""


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
    parser.add_argument(
        "--allow-defaults",
        action="store_true",
        help="accept an empty job file: every key takes its default (refused otherwise, as a likely mistake)",
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
    validate = sub.add_parser(
        "validate",
        help="check a job without running it; print it resolved",
        description="Check a job as train and launch do before they start: the schema, the model (built "
        "on the meta device: no memory, any size), preconditioner.output_module, the data factory and its "
        "arguments, checkpoint.resume, and what the machine needs (CUDA for nccl, the mpi and deepspeed "
        "extras). Prints the resolved job on stdout and notes on stderr; a problem is one line, exit 2.",
    )
    _add_job(validate)
    validate.add_argument(
        "--target",
        choices=TARGETS,
        default="here",
        help="the machine the job will run on: here (default: this machine's CUDA, extras and files), "
        "or another machine with (gpu) or without (cpu) CUDA, whose extras and files are not checked",
    )
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
    launch.add_argument(
        "--target",
        choices=TARGETS,
        default="here",
        help="with --dry-run: the machine the printed command is for: here (default), or another with "
        "(gpu) or without (cpu) CUDA, whose extras and files are not checked",
    )
    export = sub.add_parser(
        "export",
        help="write a checkpoint's model weights as safetensors (or a torch.save file) for use elsewhere",
        description="Read a checkpoint written by the service (a file, or a directory: its newest step "
        "that verifies), and write the model's state dict to --out, with a JSON sidecar (the job and the "
        "step) beside it. A missing or damaged checkpoint is one line, exit 2.",
    )
    export.add_argument("checkpoint", help="a checkpoint file (step-*.rank*-of*.pt) or a directory of them")
    export.add_argument("--out", required=True, help="the file to write, e.g. model.safetensors")
    export.add_argument(
        "--format", choices=EXPORT_FORMATS, default="safetensors", help="safetensors (default) or pt"
    )
    report = sub.add_parser(
        "report",
        help="compare runs: a table of their metrics.jsonl, and a plot with --out",
        description="Read RUN_DIR/metrics.jsonl of each run (its checkpoint.dir), print a markdown table "
        "(steps, final loss, best evaluation, wall time) and, with --out, plot loss against step and "
        "wall time and the evaluation metric against step (needs matplotlib: the 'bench' extra).",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    report.add_argument("--out", help="PNG to write the plot to")
    quick = sub.add_parser("quickstart", help="single-process demo: an MLP on the embedded digits data")
    quick.add_argument("--steps", type=_positive_int, default=60)
    quick.add_argument("--batch-size", type=_positive_int, default=512)
    quick.add_argument("--lr", type=float, default=0.1)
    quick.add_argument("--curvature", choices=Curvature.choices(), default=Curvature.IEF.value)
    quick.add_argument("--seed", type=int, default=0)
    return parser


def _load(args: argparse.Namespace) -> Job:
    """The job of ``args.config`` with its ``--set`` overrides (an empty file needs ``--allow-defaults``)."""
    from ngd_dist.service.jobs import load_job

    return load_job(args.config, args.overrides, allow_defaults=args.allow_defaults)


def _preflight(
    job: Job, args: argparse.Namespace, *, launcher: str | None, target: str = "here", real_fallback: bool
) -> list[str]:
    """The checks ``validate``, ``train`` and ``launch`` share (:mod:`ngd_dist.service.jobs.preflight`);
    the notes for ``validate`` to print. JobError on the first problem.
    """
    from ngd_dist.service.jobs.preflight import Machine, check_job

    hint = " (or validate with --target gpu for a GPU machine)" if args.command == "validate" else ""
    paths = [str(Path(args.config).resolve().parent)]  # what the trainer puts on sys.path
    if args.command != "train":  # launched workers run `python -m ngd_dist.cli`: the directory is on it too
        paths.append(os.getcwd())
    try:
        return check_job(
            job,
            machine=Machine.target(target),
            import_paths=paths,
            launcher=launcher,
            real_fallback=real_fallback,
            hint=hint,
        )
    except JobError as exc:
        raise exc.with_source(args.config) if exc.path else exc from None


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


def _one_line(exc: BaseException | str) -> str:
    """An error's message on one line, fit to print after ``ngd-dist COMMAND:``."""
    from ngd_dist.kfac.linalg import DecompositionError

    text = " ".join(str(exc).split())
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT before this step's checkpoint; the last checkpoint stands"
    if isinstance(exc, DecompositionError):  # name the remedies as the job's keys
        return exc.message("preconditioner")
    return text or type(exc).__name__


def _train(args: argparse.Namespace) -> int:
    """``ngd-dist train``: run one worker; 0 when done, 75 when preempted, else :func:`_worker_failed`.

    SIGTERM / SIGINT are caught from here on, not only once the training loop runs: a scheduler's
    signal during the set-up (another rank may be training already) is a preemption request that
    the loop's first step honours, never the default action that kills this rank alone; a set-up
    that has not reached the loop ``SETUP_GRACE_S`` after the handler ran ends the process with 75.
    A set-up blocked inside a C call sees the signal only when that call returns (a collective with
    a rank that is gone fails and returns). Under DeepSpeed the loop installs the handler (below).
    """
    from ngd_dist.service.checkpoint.preemption import SETUP_GRACE_S, PreemptionHandler, worker_preemption

    # Not under DeepSpeed: a DeepSpeed worker whose peer had failed during set-up was seen spinning
    # in C with the GIL held (just after DeepSpeed's shared-memory comm op loaded), where no Python
    # handler or thread ever runs, and only the default action of its launcher's SIGTERM ends it.
    # There the loop installs the handler.
    handler: contextlib.AbstractContextManager[PreemptionHandler | None] = (
        contextlib.nullcontext(None)
        if args.deepspeed
        else worker_preemption(signals_arrive_twice=False, setup_grace_s=SETUP_GRACE_S)
    )
    with handler as preemption:
        try:
            job = _load(args)
            from ngd_dist.kfac.distributed.mpi import launched_by_mpi

            launcher = "deepspeed" if args.deepspeed else "mpirun" if launched_by_mpi() else None
            _preflight(job, args, launcher=launcher, real_fallback=False)  # the trainer builds the model next
            from ngd_dist.service.trainer import run_job

            job_dir = Path(args.config).resolve().parent
            result = run_job(job, job_dir=job_dir, deepspeed=args.deepspeed, preemption=preemption)
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
    from ngd_dist.service.checkpoint import CheckpointError
    from ngd_dist.service.export import ExportError
    from ngd_dist.service.runs import RunsError

    try:
        if args.command == "validate":
            from ngd_dist.service.jobs import job_to_yaml
            from ngd_dist.service.resume import check_resume

            job = _load(args)
            notes = _preflight(job, args, launcher=None, target=args.target, real_fallback=True)
            if args.target == "here":
                check_resume(job.checkpoint, job.batch.world_size)  # an explicit resume's files are there
            print(job_to_yaml(job), end="")
            for note in notes:
                print(f"# {note}", file=sys.stderr)
            print(f"# {args.config}: valid", file=sys.stderr)
            return 0
        if args.command == "export":
            from ngd_dist.service.export import export_checkpoint

            result = export_checkpoint(args.checkpoint, args.out, fmt=args.format)
            for problem in result.skipped:
                print(f"ngd-dist export: skipped a newer checkpoint: {_one_line(problem)}", file=sys.stderr)
            print(result.summary())
            return 0
        if args.command == "report":
            from ngd_dist.service.runs import markdown_table, plot_runs, read_runs

            runs = read_runs(args.runs)
            print(markdown_table(runs))
            if args.out:
                plot_runs(runs, args.out)
                print(f"plot: {args.out}", file=sys.stderr)
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

            job = _load(args)
            world_size = args.nproc * args.nnodes
            job.batch.check_world(world_size)
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
            if args.target != "here" and not args.dry_run:
                raise JobError(
                    f"--target: got {args.target!r}; expected here unless --dry-run (a launch runs here)"
                )
            _preflight(job, args, launcher=args.launcher, target=args.target, real_fallback=True)
            if args.nnodes == 1 and args.target == "here":  # several nodes: each node's own disk
                from ngd_dist.service.resume import check_resume

                check_resume(job.checkpoint, world_size)
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
            if args.allow_defaults:  # the workers' arguments come last with every launcher
                argv_.append("--allow-defaults")
            print(format_command(argv_), file=sys.stderr if not args.dry_run else sys.stdout, flush=True)
            if args.dry_run:
                return 0
            outcome = run_launch(spec, argv_, launch_env(spec))
            if outcome.message is not None:
                print(f"{outcome.report}ngd-dist launch: {outcome.message}", file=sys.stderr, flush=True)
            return outcome.code
    # a bad job, a checkpoint that cannot be read, an export or report that cannot be written
    except (JobError, CheckpointError, ExportError, RunsError) as exc:
        print(f"ngd-dist {args.command}: {_one_line(exc)}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from ngd_dist.service.quickstart import run_quickstart

    demo = run_quickstart(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, curvature=args.curvature, seed=args.seed
    )
    return 0 if demo.losses[-1] < demo.losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())

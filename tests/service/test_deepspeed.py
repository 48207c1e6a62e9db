"""`ngd-dist launch --launcher deepspeed`: the command line, bad input, and the 2-rank quickstart through
DeepSpeed's real launcher and engine (ZeRO stage 0 and 1 with bf16, K-FAC active), resumed exactly.

The first launch compiles DeepSpeed's CPU communication op (~40 s) into the session's
TORCH_EXTENSIONS_DIR (the project's .cache/torch_extensions unless set), later ones load it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ngd_dist.cli import main
from ngd_dist.service.checkpoint import CheckpointStore
from ngd_dist.testing.distributed import free_port, free_ports
from tests.support import (
    CLI,
    QUICK,
    ROOT,
    assert_same_params,
    checkpoint_params,
    cli_env,
    run_process,
    sets,
    summary_of,
)

pytest.importorskip("deepspeed")

STEPS = 30
BF16 = sets("precision.dtype=bfloat16", "deepspeed.bf16=true")


@pytest.fixture(scope="session")
def extensions_dir() -> Path:
    """One torch extensions cache for every DeepSpeed launch of the session (the op is built once)."""
    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ROOT / ".cache" / "torch_extensions")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _launch(directory: Path, extensions: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The 2-rank quickstart through DeepSpeed's launcher, checkpoints in ``directory`` every 10 steps."""
    return run_process(
        [
            CLI, "launch", QUICK, "--launcher", "deepspeed", "--nproc", "2", "--master-port", str(free_port()),
            *sets("metrics.port=0", f"checkpoint.dir={directory}", "checkpoint.every=10"), *extra,
        ],
        timeout=240, env=cli_env(TORCH_EXTENSIONS_DIR=str(extensions)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def quickstart(
    tmp_path_factory: pytest.TempPathFactory, extensions_dir: Path
) -> Callable[[int], tuple[subprocess.CompletedProcess, Path]]:
    """``quickstart(stage)``: the bf16 quickstart run once per ZeRO stage, and its checkpoint folder."""
    runs: dict[int, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(stage: int) -> tuple[subprocess.CompletedProcess, Path]:
        if stage not in runs:
            directory = tmp_path_factory.mktemp(f"zero{stage}")
            proc = _launch(
                directory,
                extensions_dir,
                *BF16,
                "--set",
                f"deepspeed.zero_stage={stage}",
                "--set",
                f"train.steps={STEPS}",
                # stage 0 also runs the quality probe on DeepSpeed's bf16 weights
                *(["--set", "metrics.quality_every=10", "--set", f"metrics.port={free_ports(2)}"] if stage == 0 else []),
            )
            runs[stage] = proc, directory
        return runs[stage]

    return run


def test_dry_run_prints_the_deepspeed_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "launch",
                QUICK,
                "--launcher",
                "deepspeed",
                "--nproc",
                "2",
                "--dry-run",
                "--set",
                "train.steps=5",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.split()[0].endswith("deepspeed")
    assert " --num_gpus 2 " in line
    assert "--module ngd_dist.cli train" in line
    assert line.endswith("--set train.steps=5 --deepspeed")
    assert "--hostfile" not in line
    assert "--master_port 29500" in line
    several = ["--nnodes", "2", "--node-rank", "1", "--hostfile", "hosts", "--master-addr", "10.0.0.1"]
    assert main(["launch", QUICK, "--launcher", "deepspeed", "--nproc", "4", *several, "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert "--num_gpus 4 --hostfile hosts --num_nodes 2 --no_ssh --node_rank 1 --master_addr 10.0.0.1" in line
    # DeepSpeed's launcher passes --local_rank=N before the subcommand; it is accepted and ignored
    assert main(["--local_rank=1", "validate", QUICK]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nnodes", "2"], "--hostfile"),
        (["--max-restarts", "1"], "--max-restarts"),
        (
            ["--set", "deepspeed.zero_stage=3", "--set", "preconditioner.enabled=false"],
            "deepspeed.zero_stage",
        ),
        (["--set", "deepspeed.zero_stage=2"], "full reduced gradient"),  # the schema: K-FAC needs it
        (["--set", "precision.dtype=float16"], "precision.dtype"),
        (["--set", "optimizer.name=lars", "--set", "deepspeed.zero_stage=1"], "layer-wise trust ratio"),
        (["--set", "deepspeed.bf16=true"], "deepspeed.bf16"),
    ],
)
def test_unsupported_deepspeed_jobs_exit_2_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["launch", QUICK, "--launcher", "deepspeed", "--nproc", "2", "--dry-run", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert not captured.out, captured.out
    assert len(lines) == 1, captured.err
    assert needle in lines[0], captured.err


def test_the_wrapper_script(extensions_dir: Path) -> None:
    env = cli_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = run_process(
        ["bash", str(ROOT / "launch" / "deepspeed.sh"), QUICK, "2", "--dry-run", "--set", "train.steps=3"],
        timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--num_gpus 2" in proc.stdout
    assert "ngd_dist.cli train" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_quickstart_lowers_the_loss_with_identical_parameters(
    stage: int, quickstart: Callable[[int], tuple[subprocess.CompletedProcess, Path]]
) -> None:
    proc, directory = quickstart(stage)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary, first, last = summary_of(proc.stdout)
    assert last < 0.5 * first, summary
    assert "ranks=2" in summary, summary
    if stage == 0:  # the quality probe ran on the bf16 weights (rank 0's progress bar shows gamma)
        assert "gamma=" in proc.stdout + proc.stderr
    p0, p1 = checkpoint_params(directory, STEPS, 0, 2), checkpoint_params(directory, STEPS, 1, 2)
    assert {t.dtype for t in p0.values()} == {torch.bfloat16}  # DeepSpeed's bf16 weights
    assert_same_params(p1, p0, "rank 1 vs rank 0")


@pytest.mark.slow
def test_zero1_resume_ends_where_the_uninterrupted_run_does(
    tmp_path: Path,
    quickstart: Callable[[int], tuple[subprocess.CompletedProcess, Path]],
    extensions_dir: Path,
) -> None:
    """Resuming from the uninterrupted run's step-20 files (ZeRO-1 partitions, masters, K-FAC factors) ends bit-identical."""
    full, directory = quickstart(1)
    assert full.returncode == 0, full.stderr[-3000:]
    for rank in (0, 1):
        name = CheckpointStore(directory, rank=rank, world_size=2).path_for(20).name
        shutil.copy(directory / name, tmp_path / name)
    rest = _launch(
        tmp_path, extensions_dir, *BF16, "--set", "deepspeed.zero_stage=1", "--set", f"train.steps={STEPS}"
    )
    assert rest.returncode == 0, rest.stdout[-2000:] + rest.stderr[-3000:]
    assert "resumed_from=20" in rest.stdout, rest.stdout[-2000:] + rest.stderr[-3000:]
    for rank in (0, 1):
        assert_same_params(
            checkpoint_params(tmp_path, STEPS, rank, 2), checkpoint_params(directory, STEPS, rank, 2), f"rank {rank}"
        )
    # the other way round is one line too: a DeepSpeed ZeRO-1 checkpoint under ZeRO stage 0
    other = _launch(
        tmp_path, extensions_dir, *BF16, "--set", "deepspeed.zero_stage=0", "--set", "train.steps=40"
    )
    assert other.returncode == 2
    assert "checkpoint.resume" in other.stderr
    assert "Traceback" not in other.stderr


def _one_step(rank: int, world: int, stage: int, bf16: bool, averaged: bool, port: int, ext: str) -> tuple:
    """One K-FAC step through :class:`DeepSpeedEngine` on this rank: (elements all-reduced while DeepSpeed
    took the update, the updated parameters)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), TORCH_EXTENSIONS_DIR=ext,
    )  # fmt: skip
    import torch.distributed as dist

    from ngd_dist import KFACConfig, KFACPreconditioner
    from ngd_dist.service.deepspeed_engine import DeepSpeedEngine
    from ngd_dist.service.jobs import load_job

    overrides = [f"deepspeed.zero_stage={stage}", "batch.per_rank=8"]
    if bf16:
        overrides += ["precision.dtype=bfloat16", "deepspeed.bf16=true"]
    job = load_job(QUICK, overrides)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    engine = DeepSpeedEngine(job, model, torch.optim.SGD(model.parameters(), lr=0.1))
    precond = KFACPreconditioner(
        engine.module, KFACConfig(factor_every=1, inverse_every=1, output_module="2"), optimizer=engine.learning_rates
    )
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    engine.backward(x, y, torch.nn.functional.cross_entropy)
    assert precond.step()
    reduced = 0
    plain_all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        nonlocal reduced
        reduced += tensor.numel()
        return plain_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        engine.hand_over(averaged=averaged)
    finally:
        dist.all_reduce = plain_all_reduce
    # plain lists: tensors would travel back through shared memory the exiting rank takes with it
    return reduced, {n: p.detach().float().tolist() for n, p in engine.module.named_parameters()}


def _steps(rank: int, world: int, port: int, ext: str) -> dict:
    """:func:`_one_step` for float32 and bf16, each with and without ``averaged``, in one pair of processes."""
    return {
        (bf16, averaged): _one_step(rank, world, 0, bf16, averaged, port, ext)
        for bf16 in (False, True)
        for averaged in (False, True)
    }


@pytest.mark.slow
def test_zero0_reduces_the_preconditioned_gradients_once(extensions_dir: Path) -> None:
    """At ZeRO stage 0 the preconditioner's average is the only all-reduce of the gradients: DeepSpeed takes
    the averaged update without reducing it again, and the step is the one it took when it did (float32
    and bf16)."""
    from ngd_dist.testing.distributed import run_ranks

    ranks = run_ranks(_steps, 2, free_port(), str(extensions_dir), timeout=240)
    for bf16 in (False, True):
        what = "bf16" if bf16 else "float32"
        twice, once = ([r[(bf16, averaged)] for r in ranks] for averaged in (False, True))
        assert twice[0][0] > 0, what  # DeepSpeed's own all-reduce, when it is not told the values agree
        assert [reduced for reduced, _ in once] == [0, 0], what
        params = {
            key: [{n: torch.tensor(v) for n, v in p.items()} for _, p in runs]
            for key, runs in (("twice", twice), ("once", once))
        }
        for rank in (0, 1):
            assert_same_params(params["once"][rank], params["twice"][rank], f"{what} rank {rank}")
        assert_same_params(params["once"][1], params["once"][0], f"{what} rank 1 vs rank 0")

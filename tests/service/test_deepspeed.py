"""`ngd-dist launch --launcher deepspeed`: the command line, bad input, and the 2-rank quickstart through
DeepSpeed's real launcher and engine (ZeRO stage 0 and 1 with bf16, K-FAC active), resumed exactly.

The first launch compiles DeepSpeed's CPU communication op (~40 s) into the session's
TORCH_EXTENSIONS_DIR (the project's .cache/torch_extensions unless set), later ones load it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ngd_dist.cli import main
from ngd_dist.service.checkpoint import CheckpointStore
from ngd_dist.testing.distributed import free_port, free_ports

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("ngd-dist"))
QUICK = str(ROOT / "configs" / "quickstart.yaml")
STEPS = 30
BF16 = ["--set", "precision.dtype=bfloat16", "--set", "deepspeed.bf16=true"]


@pytest.fixture(scope="session")
def extensions_dir() -> Path:
    """One torch extensions cache for every DeepSpeed launch of the session (the op is built once)."""
    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ROOT / ".cache" / "torch_extensions")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(args: list[str], extensions: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``ngd-dist *args`` in its own process group, killed whole (launcher and workers) on timeout."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    proc = subprocess.Popen(
        [CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"ngd-dist {' '.join(args)} ran past {timeout}s:\n{out[-2000:]}\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a worker outliving its launcher
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _summary(stdout: str) -> tuple[str, float, float]:
    summary = [line for line in stdout.splitlines() if line.startswith("done:")][-1]
    first, last = summary.split("loss ")[1].split(" wall")[0].split(" -> ")
    return summary, float(first), float(last)


def _params(directory: Path, step: int, rank: int) -> dict[str, torch.Tensor]:
    store = CheckpointStore(directory, rank=rank, world_size=2)
    return store.load(store.path_for(step))["model"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{what}: {name}")


def _launch(directory: Path, extensions: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        [
            "launch",
            QUICK,
            "--launcher",
            "deepspeed",
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
            *[
                "--set",
                "metrics.port=0",
                "--set",
                f"checkpoint.dir={directory}",
                "--set",
                "checkpoint.every=10",
            ],
            *extra,
        ],
        extensions,
    )


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
    assert not captured.out and len(lines) == 1 and needle in lines[0], captured.err


def test_the_wrapper_script(extensions_dir: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "deepspeed.sh"), QUICK, "2", "--dry-run", "--set", "train.steps=3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--num_gpus 2" in proc.stdout
    assert "ngd_dist.cli train" in proc.stdout


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_quickstart_lowers_the_loss_with_identical_parameters(
    stage: int, quickstart: Callable[[int], tuple[subprocess.CompletedProcess, Path]]
) -> None:
    proc, directory = quickstart(stage)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary, first, last = _summary(proc.stdout)
    assert last < 0.5 * first and "ranks=2" in summary, summary
    if stage == 0:  # the quality probe ran on the bf16 weights (rank 0's progress bar shows gamma)
        assert "gamma=" in proc.stdout + proc.stderr
    p0, p1 = _params(directory, STEPS, 0), _params(directory, STEPS, 1)
    assert all(t.dtype == torch.bfloat16 for t in p0.values())  # DeepSpeed's bf16 weights
    _assert_same(p0, p1, "rank 0 vs rank 1")


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
    assert rest.returncode == 0 and "resumed_from=20" in rest.stdout, (
        rest.stdout[-2000:] + rest.stderr[-3000:]
    )
    for rank in (0, 1):
        _assert_same(_params(directory, STEPS, rank), _params(tmp_path, STEPS, rank), f"rank {rank}")
    # the other way round is one line too: a DeepSpeed ZeRO-1 checkpoint under ZeRO stage 0
    other = _launch(
        tmp_path, extensions_dir, *BF16, "--set", "deepspeed.zero_stage=0", "--set", "train.steps=40"
    )
    assert other.returncode == 2
    assert "checkpoint.resume" in other.stderr
    assert "Traceback" not in other.stderr

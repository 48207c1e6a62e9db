"""A light install: DeepSpeed and mpi4py are extras, `make run` installs none of them (nor the Debian
packages; only the plot extra, for the quickstart's figure), and what needs a missing extra is refused
in one line naming it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ngd_dist.cli import main
from tests.support import QUICK, ROOT, refused_in_process, sets

OPTIONAL = ("deepspeed", "mpi4py", "transformers", "peft", "matplotlib", "datasets", "tensorboard")
"""What the quickstart must run without."""


def _names(requirements: list[str]) -> set[str]:
    return {
        r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip() for r in requirements
    }


def test_deepspeed_and_mpi4py_are_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _names(project["dependencies"])
    assert not base & set(OPTIONAL), base
    assert {"torch", "pyyaml", "prometheus-client", "tqdm", "safetensors"} <= base
    extras = project["optional-dependencies"]
    assert _names(extras["deepspeed"]) == {"deepspeed"}
    assert _names(extras["mpi"]) == {"mpi4py"}
    assert _names(extras["plot"]) == _names(extras["bench"]) == {"matplotlib"}
    assert _names(extras["datasets"]) == {"datasets"}
    assert _names(extras["tensorboard"]) == {"tensorboard"}


def _dry_run(target: str) -> str:
    proc = subprocess.run(
        ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout


def test_make_run_installs_only_what_the_quickstart_needs() -> None:
    run = _dry_run("run")
    # the package and matplotlib (the plot extra): the run ends by drawing its figure
    assert "pip install -q --disable-pip-version-check -e '.[plot]'\n" in run
    assert "ngd-dist report runs/quickstart --out runs/quickstart/report.png\n" in run
    for absent in ("apt-get", "openmpi", "buildah", "deepspeed", "mpi]", "hf", "bench", "dev"):
        assert absent not in run, absent
    test = _dry_run("test")
    assert "-e '.[dev,bench,hf,deepspeed,mpi,images,datasets,tensorboard]'" in test
    assert "apt-get" in test
    assert "pytest" in test


def test_the_quickstart_trains_without_the_extras(tmp_path: Path) -> None:
    """One worker of the quickstart, two steps, with every optional package made unimportable."""
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)
    argv = [
        "train",
        QUICK,
        *sets("train.steps=2", "batch.per_rank=32", "metrics.enabled=false", f"checkpoint.dir={tmp_path}"),
    ]
    code = f"import sys; {block}; from ngd_dist.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: steps=2" in proc.stdout


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make modules unimportable for one test, as if their extra were not installed."""

    def remove(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)

    return remove


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    return refused_in_process(capsys, *argv, quiet_stdout=True)


def test_launcher_deepspeed_without_the_extra(
    without: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    without("deepspeed")
    line = _refused(capsys, "launch", QUICK, "--launcher", "deepspeed", "--nproc", "2", "--dry-run")
    assert line == (
        "ngd-dist launch: --launcher deepspeed needs the 'deepspeed' extra: pip install 'ngd_dist[deepspeed]'"
    )
    # a worker started by hand with --deepspeed says the same
    line = _refused(capsys, "train", QUICK, "--deepspeed")
    assert "--launcher deepspeed needs the 'deepspeed' extra" in line


def test_mpi_without_the_extra(without: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    without("mpi4py")
    line = _refused(capsys, "launch", QUICK, "--launcher", "mpirun", "--nproc", "2", "--dry-run")
    assert (
        line
        == "ngd-dist launch: --launcher mpirun needs the 'mpi' extra (mpi4py): pip install 'ngd_dist[mpi]'"
    )
    code = main(["validate", QUICK, *sets("distributed.transport=mpi")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.endswith(
        "distributed.transport: mpi needs the 'mpi' extra (mpi4py): pip install 'ngd_dist[mpi]'"
    )
    # validating for another machine does not look at this one's packages
    assert main(["validate", QUICK, *sets("distributed.transport=mpi"), "--target", "cpu"]) == 0


def test_data_that_needs_a_missing_extra_is_refused_by_validate(
    without: Callable[..., None], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    without("PIL")
    folder = sets("data.name=image_folder", f"data.args={{path: '{tmp_path}'}}")
    line = _refused(capsys, "validate", QUICK, *folder)
    assert line.endswith("data.name: image_folder needs the 'images' extra (PIL): pip install 'ngd_dist[images]'")
    # validating for another machine does not look at this one's packages
    assert main(["validate", QUICK, *folder, "--target", "cpu"]) == 0

"""`ngd-dist validate` checks what a job's keys name (model, logits module, data, machine), and `train`
and `launch` make the same checks before they start: one line naming the key, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ngd_dist.cli import main
from tests.support import QUICK, ROOT, refused_in_process, sets


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    return refused_in_process(capsys, *argv)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_an_empty_job_file_is_refused_unless_defaults_are_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    for command in ("validate", "train", "launch"):
        line = _refused(capsys, command, str(empty), *(["--dry-run"] if command == "launch" else []))
        assert "empty.yaml: the job file is empty" in line
        assert "--allow-defaults" in line
    code, out, err = _run(capsys, "validate", str(empty), "--allow-defaults")
    assert code == 0, err
    assert "name: mlp" in out
    code, out, _ = _run(capsys, "launch", str(empty), "--allow-defaults", "--dry-run")
    assert code == 0
    assert out.strip().endswith(f"train {empty} --allow-defaults")  # the workers accept it too


def test_model_arguments_of_the_wrong_type(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(capsys, "validate", QUICK, *sets("model.args.in_features=abc"))
    assert "model.args.in_features" in line
    assert "expects an integer, got 'abc'" in line


def test_an_output_module_the_model_does_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(capsys, "validate", QUICK, *sets("preconditioner.output_module=head"))
    assert "preconditioner.output_module: got 'head'" in line
    assert "its last Linear is '5'" in line


def test_a_user_model_without_a_logits_module(capsys: pytest.CaptureFixture[str]) -> None:
    user = sets("model.name=tests.fixtures.user_model:make_model", "model.args={}")
    line = _refused(capsys, "validate", QUICK, *user, *sets("preconditioner.output_module=null"))
    assert "preconditioner.output_module: got None" in line
    assert "'2'" in line
    code, _, err = _run(capsys, "validate", QUICK, *user, *sets("preconditioner.output_module='2'"))
    assert code == 0, err
    assert "# model tests.fixtures.user_model:make_model: 131 parameters; logits module '2'" in err


def test_a_large_model_is_checked_without_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """Built on the meta device: a 10-billion-parameter MLP (40 GB in float32) is checked in a moment."""
    code, _, err = _run(capsys, "validate", QUICK, *sets("model.args.hidden=100000"))
    assert code == 0, err
    assert "# model mlp: 10,007,600,010 parameters; logits module '5'" in err


def test_a_factory_that_needs_real_tensors_is_built_on_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "valued_models.py").write_text(
        "from torch import nn\n\n"
        "def make(hidden: int = 8) -> nn.Module:\n"
        "    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n"
        "    assert model[0].weight.abs().sum().item() > 0  # reads values: impossible on the meta device\n"
        "    model.ngd_output_module = '2'\n"
        "    return model\n"
    )
    job = tmp_path / "job.yaml"
    job.write_text(Path(QUICK).read_text().replace("name: mlp ", "name: 'valued_models:make' "))
    job_sets = sets("model.args={hidden: 8}", "preconditioner.output_module=null")
    code, _, err = _run(capsys, "validate", str(job), *job_sets)
    assert code == 0, err
    assert "610 parameters; logits module '2'" in err
    line = _refused(capsys, "validate", str(job), *sets("model.args={width: 8}"))
    assert "model.args.width" in line


@pytest.mark.parametrize("field", ["model", "data"])
def test_a_factory_that_cannot_be_imported(field: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(
        capsys, "validate", QUICK, *sets(f"{field}.name=no_such_pkg.models:make", f"{field}.args={{}}")
    )
    assert f"{field}.name: cannot import module 'no_such_pkg.models'" in line


def test_data_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(capsys, "validate", QUICK, *sets("data.args={format: dict}"))
    assert "data.args.format: 'digits' takes no argument 'format'" in line
    user = sets("data.name=tests.fixtures.user_model:make_data", "data.args={rows: 3}")
    line = _refused(capsys, "validate", QUICK, *user)
    assert (
        "data.args.rows: 'tests.fixtures.user_model:make_data' takes no argument 'rows'; accepted: n" in line
    )
    # the built-in language-model data takes format: dict (an item format, not an argument)
    lm = sets("model.name=gpt", "model.args={}", "preconditioner.output_module=null")
    code, _, err = _run(
        capsys, "validate", QUICK, *lm, *sets("data.name=synthetic_tokens", "data.args={format: dict}")
    )
    assert code == 0, err


@pytest.mark.usefixtures("no_cuda")
def test_nccl_needs_cuda_unless_validated_for_a_gpu_machine(capsys: pytest.CaptureFixture[str]) -> None:
    nccl = sets("distributed.backend=nccl")
    line = _refused(capsys, "validate", QUICK, *nccl)
    assert "distributed.backend: got 'nccl', which needs CUDA, and this machine does not have it" in line
    assert "--target gpu" in line
    code, _, err = _run(capsys, "validate", QUICK, *nccl, "--target", "gpu")
    assert code == 0, err
    line = _refused(capsys, "validate", QUICK, *nccl, "--target", "cpu")
    assert "the target machine does not have it" in line
    # train refuses it at its start too, with the same line (no traceback from the process group)
    line = _refused(capsys, "train", QUICK, *nccl)
    assert line.startswith("ngd-dist train: ")
    assert "distributed.backend: got 'nccl', which needs CUDA" in line


@pytest.mark.usefixtures("no_cuda")
def test_autocast_without_cuda_is_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "validate", QUICK, *sets("precision.dtype=bf16"))
    assert code == 0, err
    assert "# precision.dtype bfloat16 without CUDA: autocast runs on the CPU" in err


def test_launch_makes_the_checks_before_printing_or_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["launch", QUICK, "--nproc", "2", "--dry-run", *sets("preconditioner.output_module=head")])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "preconditioner.output_module: got 'head'" in err
    missing = tmp_path / "gone"
    line = _refused(
        capsys, "launch", QUICK, "--nproc", "2", "--dry-run", *sets(f"checkpoint.resume={missing}")
    )
    assert f"checkpoint.resume: {missing} does not exist" in line


def test_launch_imports_a_factory_as_its_workers_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Launched workers run `python -m ngd_dist.cli`, with the working directory on sys.path: the
    checks of `launch` and `validate` import user factories from there too."""
    (tmp_path / "cwd_only_models.py").write_text(
        "from torch import nn\n\ndef make() -> nn.Module:\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    user = sets("model.name=cwd_only_models:make", "model.args={}", "preconditioner.output_module='1'")
    for argv in (["validate", QUICK], ["launch", QUICK, "--nproc", "2", "--dry-run"]):
        code, _, err = _run(capsys, *argv, *user)
        assert code == 0, err


def test_launch_target_prints_a_command_for_another_machine(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_job = str(ROOT / "configs" / "gpu_large_batch.yaml")
    code, out, _ = _run(capsys, "launch", gpu_job, "--nproc", "2", "--dry-run", "--target", "gpu")
    assert code == 0
    assert "ngd_dist.service.torchrun" in out
    line = _refused(capsys, "launch", gpu_job, "--nproc", "2", "--target", "gpu")
    assert line.startswith("ngd-dist launch: --target: got 'gpu'; expected here unless --dry-run")

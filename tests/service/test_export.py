"""`ngd-dist export`: a service checkpoint's model weights as safetensors (or a torch.save file) with a
JSON sidecar; the newest checkpoint that verifies; one line and exit 2 for a damaged one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ngd_dist.cli import main
from ngd_dist.service.catalog import build_model
from ngd_dist.service.checkpoint import CheckpointStore
from ngd_dist.service.jobs import job_to_dict, load_job
from tests.support import QUICK, refused_in_process

ARGS = {"in_features": 64, "hidden": 128, "classes": 10}


def _checkpoints(directory: Path, steps: tuple[int, ...], *, prefix: str = "") -> dict[int, nn.Module]:
    """Checkpoints as the trainer writes them (every rank of 2, the job recorded), one model per step."""
    job = job_to_dict(load_job(QUICK))
    models = {}
    for step in steps:
        model = build_model("mlp", ARGS, seed=step)
        weights = {prefix + k: v for k, v in model.state_dict().items()}
        for rank in range(2):
            state = {"step": step, "model": weights, "optimizer": {}, "job": job}
            CheckpointStore(directory, rank=rank, world_size=2).save(step, state)
        models[step] = model
    return models


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    return refused_in_process(capsys, *argv)


def test_export_the_newest_checkpoint_and_load_it_into_a_fresh_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = _checkpoints(tmp_path / "run", (10, 20))
    out = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "exported step 20" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["step"] == 20
    assert sidecar["world_size"] == 2
    assert sidecar["format"] == "safetensors"
    assert sidecar["checkpoint"].endswith("step-00000020.rank0-of2.pt")
    job = sidecar["job"]
    assert job["name"] == "quickstart"
    fresh = build_model(job["model"]["name"], job["model"]["args"], seed=99)
    fresh.load_state_dict(load_file(out))
    x = torch.randn(5, 64)
    torch.testing.assert_close(fresh(x), models[20](x), rtol=0, atol=0)


def test_a_ddp_prefix_is_stripped_and_pt_is_an_alternative(tmp_path: Path) -> None:
    models = _checkpoints(tmp_path / "run", (7,), prefix="module.")
    file = tmp_path / "run" / "step-00000007.rank1-of2.pt"  # any rank's file: the weights are the same
    assert main(["export", str(file), "--out", str(tmp_path / "w.pt"), "--format", "pt"]) == 0
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert list(state) == list(models[7].state_dict())
    fresh = build_model("mlp", ARGS, seed=1)
    fresh.load_state_dict(state)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), models[7](x), rtol=0, atol=0)
    assert json.loads((tmp_path / "w.json").read_text())["format"] == "pt"


def test_tied_weights_are_written(tmp_path: Path) -> None:
    shared = torch.randn(6, 4)
    state = {"step": 1, "model": {"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(6)}}
    CheckpointStore(tmp_path, rank=0, world_size=1).save(1, state)
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "t.safetensors")]) == 0
    loaded = load_file(tmp_path / "t.safetensors")
    assert torch.equal(loaded["embed.weight"], shared)
    assert torch.equal(loaded["head.weight"], shared)


def test_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _checkpoints(tmp_path / "run", (10, 20))
    newest = tmp_path / "run" / "step-00000020.rank0-of2.pt"
    data = bytearray(newest.read_bytes())
    data[100] ^= 0xFF
    newest.write_bytes(bytes(data))
    line = _refused(capsys, "export", str(newest), "--out", str(tmp_path / "m.safetensors"))
    assert line.startswith(f"ngd-dist export: checkpoint {newest}: SHA-256 of the payload does not match")
    assert not (tmp_path / "m.safetensors").exists()
    # the directory falls back to the newest step that verifies, and says what it skipped
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "exported step 10" in out
    assert "skipped a newer checkpoint" in err
    assert "step-00000020.rank0-of2.pt" in err


def test_nothing_to_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "m.safetensors")
    line = _refused(capsys, "export", str(tmp_path / "missing"), "--out", out)
    assert "no such file or directory" in line
    line = _refused(capsys, "export", str(tmp_path), "--out", out)
    assert "holds no checkpoint" in line
    plain = tmp_path / "plain.pt"
    torch.save({"model": {}}, plain)
    line = _refused(capsys, "export", str(plain), "--out", out)
    assert "no checksum trailer" in line
    _checkpoints(tmp_path / "run", (3,))
    line = _refused(
        capsys, "export", str(tmp_path / "run"), "--out", str(tmp_path / "nodir" / "m.safetensors")
    )
    assert "--out: the directory" in line

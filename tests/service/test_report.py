"""`ngd-dist report`: runs' metrics.jsonl as a markdown table and a PNG (hand-written records)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from ngd_dist.cli import main
from ngd_dist.service.runs import read_run
from tests.support import refused_in_process


def _step(step: int, loss: float | None, wall: float, **extra: object) -> dict[str, object]:
    return {
        "step": step, "samples": step * 512, "wall_s": wall, "loss": loss, "lr": 0.1, "damping": 1e-3,
        "kl_scale": None, "gamma": None, "phases": {"forward": 0.01 * step}, **extra,
    }  # fmt: skip


def _write(directory: Path, records: list[dict[str, object]], tail: str = "") -> Path:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return directory


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """An ief run with accuracy evaluations (its last line cut short by a kill) and an ef run without."""
    ief = _write(
        tmp_path / "ief",
        [
            _step(10, 2.0, 1.5),
            _step(20, 1.0, 3.0),
            {"event": "eval", "step": 20, "wall_s": 3.2, "eval_loss": 1.1, "eval_accuracy": 0.81},
            _step(30, 0.5, 4.5, eval_loss=0.9, eval_accuracy=0.79),
            _step(40, None, 6.0),  # a non-finite loss, written as null
        ],
        tail='{"step": 50, "samples": 25600, "wall_s": 7.',
    )
    ef = _write(tmp_path / "ef", [_step(10, 2.2, 1.0), _step(20, 1.8, 125.0)])
    return ief, ef


def test_table_and_plot(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "report.png"
    assert main(["report", *map(str, runs), "--out", str(png)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "| run | steps | final loss | best eval | wall time |"
    assert out[2] == "| ief | 40 | 0.5000 | eval_accuracy 0.81 (step 20) | 6.0 s |"
    assert out[3] == "| ef | 20 | 1.8000 | - | 2m 05s |"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 400)  # three panels: loss/step, loss/wall, accuracy/step
    assert 10_000 < len(data) < 2_000_000


def test_a_truncated_last_line_is_skipped_and_perplexity_is_best_when_lowest(tmp_path: Path) -> None:
    lm = _write(
        tmp_path / "lm",
        [
            _step(5, 4.0, 1.0, eval_loss=3.0, eval_perplexity=20.0),
            _step(10, 3.0, 2.0, eval_loss=2.0, eval_perplexity=7.4),
        ],
        tail='{"step": 15, "loss": 2.',
    )
    run = read_run(lm)
    assert run.truncated
    assert run.last_step == 10
    assert run.best_eval() == ("eval_perplexity", 7.4, 10)


def test_without_evaluations_two_panels(runs: tuple[Path, Path], tmp_path: Path) -> None:
    png = tmp_path / "ef.png"
    assert main(["report", str(runs[1]), "--out", str(png)]) == 0
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (1000, 400)


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    return refused_in_process(capsys, *argv)


def test_runs_that_cannot_be_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no such run directory" in _refused(capsys, "report", str(tmp_path / "nope"))
    (tmp_path / "bare").mkdir()
    assert "holds no metrics.jsonl" in _refused(capsys, "report", str(tmp_path / "bare"))
    _write(tmp_path / "empty", [])
    assert "metrics.jsonl: is empty" in _refused(capsys, "report", str(tmp_path / "empty"))
    bad = _write(
        tmp_path / "bad", [_step(1, 1.0, 1.0)], tail="not json\n" + json.dumps(_step(2, 1.0, 2.0)) + "\n"
    )
    assert "metrics.jsonl: line 2 is not JSON" in _refused(capsys, "report", str(bad))
    typed = _write(tmp_path / "typed", [_step(1, "low", 1.0)])  # type: ignore[arg-type]
    assert "line 1: loss: got 'low'; expected a number or null" in _refused(capsys, "report", str(typed))


def test_plotting_without_matplotlib(
    runs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    line = _refused(capsys, "report", str(runs[0]), "--out", str(tmp_path / "r.png"))
    assert (
        line
        == "ngd-dist report: --out: plotting needs matplotlib, the 'bench' extra: pip install 'ngd_dist[bench]'"
    )
    assert not (tmp_path / "r.png").exists()

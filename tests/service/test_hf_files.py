"""data.name: hf_files: Hugging Face `datasets` read from local json, csv, parquet and text files (never a
download): dict items of the chosen columns, (input, label) tuple items, byte-level text blocks; the
arguments and the 'datasets' extra checked in one line by `validate`; a json file training a dict-batch
model on two ranks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ngd_dist.cli import main
from ngd_dist.service.catalog import build_data
from ngd_dist.service.data.loading import ShardedLoader
from tests.support import (
    assert_same_params,
    checkpoint_params,
    refused_in_process,
    run_cli,
    summary_of,
)

needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="needs the 'datasets' extra"
)


def _clusters(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 4-feature samples around 3 centres, and their class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, (n,), generator=gen)
    centres = 2 * torch.randn(3, 4, generator=gen)
    return centres[labels] + 0.3 * torch.randn(n, 4, generator=gen), labels


def _json_lines(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _clusters(n)
    rows = [
        {"features": f.tolist(), "labels": int(c), "note": f"row {i}"}
        for i, (f, c) in enumerate(zip(x, y, strict=True))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return x, y


@needs_datasets
def test_json_lines_give_dict_items_of_the_columns_asked_for(tmp_path: Path) -> None:
    x, y = _json_lines(tmp_path / "train.jsonl", 10)
    args = {"files": str(tmp_path / "train.jsonl"), "columns": ["features", "labels"], "cache_dir": str(tmp_path / "c")}
    data = build_data("hf_files", args, seed=0)  # format: inferred from .jsonl
    assert len(data) == 10
    item = data[3]
    assert set(item) == {"features", "labels"}
    torch.testing.assert_close(item["features"], x[3])
    assert item["features"].dtype == torch.float32
    assert item["labels"].dtype == torch.int64
    assert int(item["labels"]) == int(y[3])
    loader = ShardedLoader(data, rank=0, world_size=1, batch_size=4, seed=0, shuffle=False)
    batch = next(iter(loader))
    assert isinstance(batch, dict)
    assert tuple(batch["features"].shape) == (4, 4)
    assert batch["labels"].tolist() == y[:4].tolist()
    # every column by default: the text column cannot make a tensor
    with pytest.raises(ValueError, match=r"^data\.args\.columns: column 'note' of .* holds text"):
        build_data("hf_files", {**args, "columns": None}, seed=0)
    # a label under another name becomes 'labels'
    renamed = build_data("hf_files", {**args, "columns": ["features"], "label": "labels"}, seed=0)
    assert set(renamed[0]) == {"features", "labels"}


@needs_datasets
def test_csv_and_parquet_columns_make_input_label_pairs(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "train.csv").write_text("x1,x2,y\n1.5,2,0\n3.5,4,1\n-1,0.25,2\n")
    (tmp_path / "test.csv").write_text("x1,x2,y\n7,8,1\n")
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    common = {"format": "csv", "input": ["x1", "x2"], "label": "y", "cache_dir": str(tmp_path / "c")}
    data = build_data("hf_files", {**common, "files": files}, seed=0)
    assert len(data) == 3
    x, y = data[2]
    assert x.dtype == torch.float32
    assert x.tolist() == [-1.0, 0.25]
    assert int(y) == 2
    test = build_data("hf_files", {**common, "files": files, "split": "test"}, seed=0)
    assert [test[0][0].tolist(), int(test[0][1])] == [[7.0, 8.0], 1]

    datasets.Dataset.from_dict({"pixels": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "cls": [1, 0]}).to_parquet(
        tmp_path / "part-0.parquet"
    )
    pq = build_data(
        "hf_files",
        {"files": [str(tmp_path / "part-*.parquet")], "input": "pixels", "label": "cls", "cache_dir": str(tmp_path / "c")},
        seed=0,
    )
    assert pq[1][0].tolist() == [3.0, 4.0, 5.0]
    assert int(pq[1][1]) == 0
    with pytest.raises(ValueError, match=r"^data\.args\.label: column 'z' is not in .*; its columns: x1, x2, y"):
        build_data("hf_files", {**common, "files": files, "label": "z"}, seed=0)


@needs_datasets
def test_text_files_become_byte_level_language_model_blocks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n")
    data = build_data(
        "hf_files", {"files": str(tmp_path / "a.txt"), "block_size": 8, "cache_dir": str(tmp_path / "c")}, seed=0
    )
    stream = b"hello world\nsecond line\n"
    assert len(data) == len(stream) // 8
    item = data[1]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"].tolist() == list(stream[8:16])
    assert torch.equal(item["labels"], item["input_ids"])
    assert item["attention_mask"].tolist() == [1] * 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "data.args.files: required by 'hf_files': a local file"),
        ({"files": "MISSING"}, "data.args.files: 'MISSING' does not exist"),
        ({"files": "https://example.com/a.json"}, "data.args.files: 'https://example.com/a.json' is a URL"),
        ({"files": "EXISTS.bin"}, "data.args.format: cannot tell the format of 'EXISTS.bin'"),
        ({"files": "EXISTS.bin", "format": "xml"}, "data.args.format: got 'xml'; expected one of json, csv, parquet, text"),
        ({"files": "EXISTS.jsonl", "split": "test"}, "data.args.split: got 'test', but data.args.files"),
        ({"files": "EXISTS.jsonl", "input": "x"}, "data.args.input: needs data.args.label"),
        ({"files": "EXISTS.jsonl", "columns": "x"}, "data.args.columns: got 'x'; expected a list of column names"),
        ({"files": {"train": 3}}, "data.args.files: got {'train': 3}; expected"),
    ],
)
def test_bad_arguments_are_one_line_before_anything_is_read(
    args: dict[str, object], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "EXISTS.bin").write_text("x")
    (tmp_path / "EXISTS.jsonl").write_text("{}\n")

    def here(value: object) -> object:
        if isinstance(value, str) and value.startswith(("EXISTS", "MISSING")):
            return str(tmp_path / value)
        return value

    args = {k: here(v) for k, v in args.items()}
    expected = message.replace("'MISSING'", repr(str(tmp_path / "MISSING"))).replace(
        "'EXISTS", repr(str(tmp_path))[:-1] + "/EXISTS"
    )
    with pytest.raises(ValueError, match=r"^data\.") as err:
        build_data("hf_files", args, seed=0)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": {"name": "mlp"}, "data": {"name": "hf_files", "args": args}}))
    line = refused_in_process(capsys, "validate", str(job))
    assert line.startswith(f"ngd-dist validate: {job}: {expected}"), line


def test_without_the_datasets_extra_a_job_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"data": {"name": "hf_files", "args": {"files": str(tmp_path / "train.jsonl")}}}))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    line = refused_in_process(capsys, "validate", str(job))
    assert line == (
        f"ngd-dist validate: {job}: data.name: hf_files needs the 'datasets' extra: pip install 'ngd_dist[datasets]'"
    )
    with pytest.raises(ValueError, match=r"^data\.name: hf_files needs the 'datasets' extra: pip install"):
        build_data("hf_files", {"files": str(tmp_path / "train.jsonl")}, seed=0)
    # validating for another machine does not look at this one's packages or files
    assert main(["validate", str(job), "--target", "cpu"]) == 0


@needs_datasets
def test_a_json_file_trains_a_dict_batch_model_on_two_ranks(tmp_path: Path) -> None:
    """`ngd-dist launch --nproc 2`: the model takes only `model(features=...)`, so every batch is a dict."""
    _json_lines(tmp_path / "train.jsonl", 160)
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {name: 'tests.fixtures.user_model:make_dict_model', args: {hidden: 16}}\n"
        f"data: {{name: hf_files, args: {{format: json, files: ['{tmp_path / 'train.jsonl'}'], "
        f"columns: [features, labels], cache_dir: '{tmp_path / 'cache'}'}}, num_workers: 1}}\n"
        "batch: {per_rank: 8}\n"
        "train: {steps: 12, log_every: 6}\n"
        "optimizer: {name: sgd, lr: 0.2}\n"
        "schedule: {name: constant}\n"
        "preconditioner: {curvature: ief, factor_every: 1, inverse_every: 3}\n"
        f"checkpoint: {{dir: '{tmp_path / 'run'}', every: 12}}\n"
        "metrics: {port: 0}\n"
    )
    proc = run_cli("launch", str(job), "--launcher", "torchrun", "--nproc", "2", timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary, first, last = summary_of(proc.stdout)
    assert "ranks=2 skipped=0" in summary, summary
    assert last < first - 0.3, summary
    run = tmp_path / "run"
    assert_same_params(checkpoint_params(run, 12, 1, 2), checkpoint_params(run, 12, 0, 2), "rank 1 vs 0")
    assert "Generating train split" not in proc.stderr  # no progress bars of datasets under the trainer's


@needs_datasets
def test_a_file_that_does_not_parse_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.jsonl").write_text('{"x": [1.0], "labels": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"^data\.args\.files: reading '.*bad\.jsonl' as json failed: ArrowInvalid: JSON parse error"):
        build_data("hf_files", {"files": str(tmp_path / "bad.jsonl"), "cache_dir": str(tmp_path / "c")}, seed=0)
    assert "bad.jsonl" not in capfd.readouterr().err  # said once, in the error

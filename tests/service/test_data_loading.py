"""A job's data through torch.utils.data: map-style and iterable Datasets fed by a DataLoader per rank
(disjoint shards, deterministic order, per-sample work in the workers), dict batches, the job's data
fields, and a bit-identical resume of a map-style user dataset (one process)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch

from ngd_dist.cli import main
from ngd_dist.service.catalog import build_data
from ngd_dist.service.data.loading import (
    DataError,
    ShardedLoader,
    ShardSampler,
    TensorDicts,
    TensorPairs,
    collate,
)
from ngd_dist.service.jobs import JobError, job_from_dict
from tests.fixtures.data_sources import Numbered, NumberedDicts, Stream
from tests.support import assert_same_params, checkpoint_params


def _loaders(dataset: object, world: int, **options: object) -> list[ShardedLoader]:
    return [
        ShardedLoader(dataset, rank=r, world_size=world, batch_size=3, seed=5, **options)  # type: ignore[arg-type]
        for r in range(world)
    ]


def _ids(batch: object) -> list[int]:
    return [int(v) for v in batch[1]]  # type: ignore[index]


def test_a_map_style_dataset_is_sharded_disjointly_in_a_fixed_order_and_fetched_in_workers() -> None:
    data = Numbered(50)
    serial = [[_ids(b) for b in loader] for loader in _loaders(data, 2)]
    with_workers = _loaders(data, 2, num_workers=2, prefetch_factor=2)
    state = torch.get_rng_state()
    fetched = [list(loader) for loader in with_workers]
    assert torch.equal(torch.get_rng_state(), state)  # the loader never draws from the global RNG
    assert [[_ids(b) for b in batches] for batches in fetched] == serial  # same batches, any num_workers
    assert {int(w) for batches in fetched for b in batches for w in b[0][:, 1]} == {1, 2}  # in the workers
    rows = [i for epoch in serial for batch in epoch for i in batch]
    assert len(rows) == len(set(rows)) == 8 * 6  # disjoint over the ranks; 50 % 6 dropped
    # the same order as the in-memory data of the built-ins (the permutation seeded by (seed, epoch))
    pairs = TensorPairs(torch.arange(50.0).unsqueeze(1), torch.arange(50))
    assert [[_ids(b) for b in loader] for loader in _loaders(pairs, 2)] == serial
    assert serial[1][0] == ShardSampler(50, rank=1, world_size=2, batch_size=3, seed=5).rows(0, 0)
    second = [_ids(b) for b in with_workers[0]]  # epoch 1: another permutation, workers kept
    assert second != serial[0]
    assert with_workers[0].state_dict() == {"epoch": 2, "index": 0}


def test_a_map_style_position_resumes_at_the_exact_batch_with_workers() -> None:
    data = Numbered(40)
    reference = [_ids(b) for b in islice(_loaders(data, 2)[1].forever(), 20)]  # 6 a epoch: crosses 3
    first = _loaders(data, 2, num_workers=2)[1]
    got = [_ids(b) for b in islice(first.forever(), 8)]
    state = first.state_dict()
    assert state == {"epoch": 1, "index": 2}
    resumed = _loaders(data, 2, num_workers=1)[1]
    resumed.load_state_dict(state)
    got += [_ids(b) for b in islice(resumed.forever(), 12)]
    assert got == reference


def test_dict_items_make_dict_batches_and_bad_items_are_one_line() -> None:
    batches = list(_loaders(NumberedDicts(12), 1)[0])
    assert len(batches) == 4
    assert set(batches[0]) == {"input_ids", "labels"}
    assert batches[0]["input_ids"].shape == (3, 2)
    assert torch.equal(batches[0]["input_ids"][:, 0], batches[0]["labels"])
    memory = TensorDicts({"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(6)})
    assert memory.__getitems__([4, 1]).batch["labels"].tolist() == [4, 1]
    with pytest.raises(DataError, match="a dict batch needs 'labels'"):
        collate([{"input_ids": torch.zeros(2)}])
    with pytest.raises(DataError, match=r"a batch is a list of 3; expected \(inputs, targets\)"):
        collate([(torch.zeros(1), torch.zeros(1), torch.zeros(1))])


def test_an_iterable_dataset_is_sharded_by_rank_and_worker_and_resumes_by_skipping_batches() -> None:
    loaders = _loaders(Stream(40), 2, num_workers=2)
    epochs = [[[_ids(b) for b in loader] for loader in loaders] for _ in range(2)]
    rows = [i for rank in epochs[0] for batch in rank for i in batch]
    # 4 shards (2 ranks x 2 workers) of 10 items each: 3 full batches per worker, 1 item dropped
    assert len(rows) == len(set(rows)) == 4 * 9
    assert all(len(rank) == 6 for rank in epochs[0])
    assert epochs[0] == epochs[1]  # the same stream each epoch, in the same order
    first_batch = next(iter(loaders[0]))[0]
    assert float(first_batch[0, 0]) >= 2000  # set_epoch(2) was called: the stream's epoch-2 items
    reference = [_ids(b) for b in islice(_loaders(Stream(40), 2, num_workers=2)[1].forever(), 10)]
    first = _loaders(Stream(40), 2, num_workers=2)[1]
    got = [_ids(b) for b in islice(first.forever(), 4)]
    assert first.state_dict() == {"epoch": 0, "index": 4}
    resumed = _loaders(Stream(40), 2, num_workers=2)[1]
    resumed.load_state_dict(first.state_dict())
    got += [_ids(b) for b in islice(resumed.forever(), 6)]
    assert got == reference
    with pytest.raises(DataError, match="gave rank 1 no full batch of 3 samples in epoch 0"):
        next(iter(_loaders(Stream(4), 2)[1]))


def test_build_data_wraps_tensors_and_keeps_datasets_whatever_their_size() -> None:
    pairs = build_data("synthetic_tokens", {"n_sequences": 4, "block_size": 3, "vocab_size": 7}, seed=0)
    assert isinstance(pairs, TensorPairs)
    dicts = build_data("synthetic_tokens", {"n_sequences": 4, "block_size": 3, "vocab_size": 7, "format": "dict"}, seed=0)
    assert isinstance(dicts, TensorDicts)
    assert torch.equal(dicts.tensors["input_ids"], pairs.inputs)
    assert torch.equal(dicts.tensors["labels"], pairs.inputs)  # the HF convention: the trainer shifts
    big = build_data("tests.fixtures.data_sources:make_noisy_pairs", {"n": 300_000}, seed=0)
    assert len(big) == 300_000  # type: ignore[arg-type]  # not stacked: no in-memory limit
    with pytest.raises(ValueError, match=r"data\.args\.format: got 'rows'; expected one of pairs, dict"):
        build_data("synthetic_tokens", {"format": "rows"}, seed=0)
    with pytest.raises(ValueError, match=r"data\.args\.format: 'digits' takes no argument 'format'"):
        build_data("digits", {"format": "dict"}, seed=0)


def test_the_data_fields_of_a_job() -> None:
    job = job_from_dict({"data": {"num_workers": 2, "pin_memory": True, "prefetch_factor": 4}})
    assert (job.data.num_workers, job.data.pin_memory, job.data.prefetch_factor) == (2, True, 4)
    default = job_from_dict({})
    assert (default.data.num_workers, default.data.pin_memory, default.data.prefetch_factor) == (0, False, None)
    bad = [
        ({"prefetch_factor": 4}, "data.prefetch_factor: got 4; expected null unless data.num_workers >= 1"),
        ({"num_workers": -1}, "data.num_workers: got -1; expected"),
        ({"pin_memory": "yes"}, "data.pin_memory: got 'yes'; expected"),
    ]
    for fields, message in bad:
        with pytest.raises(JobError) as err:
            job_from_dict({"data": fields})
        assert str(err.value).startswith(f"<dict>: {message}"), str(err.value)
        assert "\n" not in str(err.value)


def test_a_map_style_user_dataset_resumes_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One process, 2 DataLoader workers: 6 steps straight vs 3 steps then a resume to 6 (epochs of 4
    steps, so the resume is mid-epoch and the run crosses an epoch)."""
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {name: 'tests.fixtures.user_model:make_tagged_model', args: {hidden: 8}}\n"
        "data: {name: 'tests.fixtures.data_sources:make_noisy_pairs', args: {n: 70}, num_workers: 2}\n"
        "batch: {per_rank: 16}\n"
        "optimizer: {name: sgd, lr: 0.1}\n"
        "schedule: {name: constant}\n"
        "preconditioner: {curvature: ief, factor_every: 1, inverse_every: 2}\n"
        "metrics: {port: 0}\n"
    )
    common = ["--set", "checkpoint.every=3", "--set", "train.log_every=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", str(job), *common, "--set", f"checkpoint.dir={full}", "--set", "train.steps=6"]) == 0
    assert main(["train", str(job), *common, "--set", f"checkpoint.dir={part}", "--set", "train.steps=3"]) == 0
    assert main(["train", str(job), *common, "--set", f"checkpoint.dir={part}", "--set", "train.steps=6"]) == 0
    assert "resumed_from=3" in capsys.readouterr().out
    assert_same_params(checkpoint_params(part, 6, 0, 1), checkpoint_params(full, 6, 0, 1), "resumed vs straight")


@pytest.mark.parametrize(("factory", "features"), [("make_noisy_pairs", 4), ("make_stream", 1)])
def test_the_quality_probe_draws_from_a_user_dataset(factory: str, features: int) -> None:
    """Map-style: a seeded draw of items; iterable: the first items of the stream."""
    from ngd_dist.service.environment import Environment
    from ngd_dist.service.trainer import Worker

    job = job_from_dict({
        "model": {"name": "tests.fixtures.user_model:make_tagged_model"},
        "data": {"name": f"tests.fixtures.data_sources:{factory}"},
        "batch": {"per_rank": 8},
        "metrics": {"port": 1, "quality_every": 2, "quality_probe": 5},  # port 1: the probe is built, nothing served
    })
    probe = Worker(job, Environment(0, 1, 0, torch.device("cpu"), "single")).parts.quality
    assert probe is not None
    assert tuple(probe.inputs.shape) == (5, features)
    assert tuple(probe.targets.shape) == (5,)
    if factory == "make_stream":
        assert probe.targets.tolist() == [0, 1, 2, 3, 4]

"""Image data from local folders: the ImageFolder layout and CIFAR-10's binary version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ngd_dist.service.catalog import build_data
from tests.support import QUICK, assert_same_params, checkpoint_params, run_cli, sets, summary_of


def _image_folder(root: Path) -> dict[str, list[np.ndarray]]:
    pil = pytest.importorskip("PIL.Image")
    made: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for cls in ("cat", "ant"):  # classes are sorted: ant = 0, cat = 1
        (root / cls).mkdir(parents=True)
        made[cls] = []
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            pil.fromarray(pixels).save(root / cls / f"{i}.png")
            made[cls].append(pixels)
    (root / "ant" / "notes.txt").write_text("not an image")
    return made


def test_an_image_folder_is_read_item_by_item_with_sorted_class_labels(tmp_path: Path) -> None:
    made = _image_folder(tmp_path / "train")
    data = build_data("image_folder", {"path": str(tmp_path / "train")}, seed=0)
    assert len(data) == 6
    x, y = data[4]  # cat/1.png
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, 8, 8)
    assert int(y) == 1
    torch.testing.assert_close(x, torch.from_numpy(made["cat"][1]).permute(2, 0, 1).float() / 255)
    grey = build_data("image_folder", {"path": str(tmp_path / "train"), "channels": 1, "size": 4}, seed=0)
    assert tuple(grey[0][0].shape) == (1, 4, 4)
    with pytest.raises(ValueError, match=r"data\.args\.path: .* has no class sub-folders"):
        build_data("image_folder", {"path": str(tmp_path / "train" / "ant")}, seed=0)


def _cifar_bin(root: Path, records: int) -> np.ndarray:
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (records, 3073), dtype=np.uint8)
    data[:, 0] = np.arange(records) % 10
    for i in range(1, 6):
        data.tofile(root / f"data_batch_{i}.bin")
    data[:2].tofile(root / "test_batch.bin")
    return data


def test_cifar10_binary_batches_are_memory_mapped_records(tmp_path: Path) -> None:
    data = _cifar_bin(tmp_path / "cifar-10-batches-bin", 4)
    train = build_data("cifar10", {"path": str(tmp_path)}, seed=0)
    assert len(train) == 20
    x, y = train[7]  # batch 2, record 3
    assert int(y) == 3
    torch.testing.assert_close(x, torch.from_numpy(data[3, 1:].copy()).float().view(3, 32, 32) / 255)
    assert len(build_data("cifar10", {"path": str(tmp_path), "split": "test"}, seed=0)) == 2
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"is 100 bytes, not a whole number of 3073-byte CIFAR-10 records"):
        build_data("cifar10", {"path": str(tmp_path), "split": "test"}, seed=0)
    (tmp_path / "py" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "py" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Python \(pickle\) version, which is not loaded"):
        build_data("cifar10", {"path": str(tmp_path / "py" / "cifar-10-batches-py")}, seed=0)


def test_a_job_trains_on_an_image_folder_with_loader_workers(tmp_path: Path) -> None:
    _image_folder(tmp_path / "images")
    result = run_cli(
        "train", QUICK,
        *sets("metrics.port=0", "train.steps=3", "train.log_every=3", "train.eval_every=0",
              'model={"name": "small_cnn", "args": {"channels": 3, "classes": 2, "side": 8}}',
              f'data={{"name": "image_folder", "args": {{"path": "{tmp_path / "images"}"}}, "num_workers": 1}}',
              "batch.per_rank=4", f"checkpoint.dir={tmp_path / 'ckpt'}"),
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary, first, last = summary_of(result.stdout)
    assert "done: steps=3" in summary
    assert first > 0
    assert last > 0


def test_cifar10_augmentation_crops_and_flips_by_seed_epoch_and_index(tmp_path: Path) -> None:
    data = _cifar_bin(tmp_path / "cifar-10-batches-bin", 4)
    plain = build_data("cifar10", {"path": str(tmp_path)}, seed=0)
    augmented = build_data("cifar10", {"path": str(tmp_path), "augment": True, "padding": 2}, seed=0)
    assert len(augmented) == len(plain) == 20
    assert not hasattr(plain, "set_epoch")  # no augmentation: the loader's workers persist across epochs

    def is_crop_or_flip_of(x: torch.Tensor, original: torch.Tensor, pad: int) -> bool:
        padded = torch.nn.functional.pad(original, (pad, pad, pad, pad))
        for image in (padded, padded.flip(-1)):
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    if torch.equal(image[:, dy : dy + 32, dx : dx + 32], x):
                        return True
        return False

    draws = []
    for epoch in (0, 1):
        augmented.set_epoch(epoch)
        draws.append([augmented[i][0] for i in range(20)])
    for i in range(20):
        x, y = augmented[i]
        assert int(y) == int(plain[i][1])
        assert tuple(x.shape) == (3, 32, 32)
        assert torch.equal(x, draws[1][i])  # a function of (seed, epoch, index): the same when read again
        original = torch.from_numpy(data[i % 4, 1:].copy()).float().view(3, 32, 32) / 255
        torch.testing.assert_close(plain[i][0], original)
        assert is_crop_or_flip_of(x, original, 2)
    assert sum(not torch.equal(a, b) for a, b in zip(*draws, strict=True)) > 10  # new draws each epoch
    assert sum(not torch.equal(a, p[0]) for a, p in zip(draws[0], plain, strict=True)) > 10
    other_seed = build_data("cifar10", {"path": str(tmp_path), "augment": True, "padding": 2, "seed": 1}, seed=0)
    assert any(not torch.equal(other_seed[i][0], draws[0][i]) for i in range(20))


def test_cifar10_with_augmentation_in_two_loader_workers_resumes_mid_epoch_bit_identical(tmp_path: Path) -> None:
    """`ngd-dist launch --nproc 2`, 2 loader workers a rank: 6 steps straight, against a resume at step 3
    of the same run (epochs of 5 steps: the resume is mid-epoch, the run crosses into the next)."""
    _cifar_bin(tmp_path / "cifar" / "cifar-10-batches-bin", 8)  # 40 training images
    common = sets(
        "metrics.port=0", "train.steps=6", "train.log_every=3", "train.eval_every=0", "checkpoint.every=3",
        "schedule.name=constant", "batch.per_rank=4",
        'model={"name": "small_cnn", "args": {"channels": 3, "classes": 10, "side": 32, "width": 1}}',
        f'data={{"name": "cifar10", "args": {{"path": "{tmp_path / "cifar"}", "augment": true}}, "num_workers": 2}}',
    )  # fmt: skip
    launch = ["launch", QUICK, "--launcher", "torchrun", "--nproc", "2", *common]
    full, part = tmp_path / "full", tmp_path / "part"
    straight = run_cli(*launch, *sets(f"checkpoint.dir={full}"), timeout=180)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-3000:]
    part.mkdir()
    for rank in (0, 1):
        name = f"step-00000003.rank{rank}-of2.pt"
        (part / name).write_bytes((full / name).read_bytes())
    resumed = run_cli(*launch, *sets(f"checkpoint.dir={part}"), timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed_from=3" in resumed.stdout, resumed.stdout[-2000:]
    for rank in (0, 1):
        assert_same_params(checkpoint_params(part, 6, rank, 2), checkpoint_params(full, 6, rank, 2), f"rank {rank}")
    assert_same_params(checkpoint_params(full, 6, 1, 2), checkpoint_params(full, 6, 0, 2), "rank 1 vs 0")


def test_augmentation_is_refused_with_a_held_out_split() -> None:
    from ngd_dist.service.jobs import JobError, job_from_dict

    job = {"data": {"name": "cifar10", "args": {"path": "x", "augment": True}, "holdout": 0.1}, "train": {"eval_every": 5}}
    with pytest.raises(JobError, match=r"data\.args\.augment: got True; expected false with data\.holdout"):
        job_from_dict(job)
    job_from_dict({**job, "train": {"eval_every": 0}})

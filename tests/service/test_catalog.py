"""Built-in models and datasets, the sharded loader, and the model/data registry."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.preconditioner import KFACPreconditioner
from ngd_dist.service.catalog import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    build_data,
    build_model,
    dataset_task_of,
    output_module_of,
    task_of,
)
from ngd_dist.service.data.datasets import (
    ShardedLoader,
    digits,
    image_folder_tensors,
    split_holdout,
    synthetic_images,
    synthetic_tokens,
    text_file,
)
from ngd_dist.service.data.loading import TensorPairs
from ngd_dist.service.models import gpt, mlp, resnet18, small_cnn
from tests.support import FIXTURES


def build_dataset(name: str, args: dict[str, object] | None, **kwargs: object) -> tuple[Tensor, Tensor]:
    """The job's data as ``(inputs, targets)`` tensors: :func:`build_data`'s items, stacked."""
    data = build_data(name, args, **kwargs)  # type: ignore[arg-type]
    if isinstance(data, TensorPairs):
        return data.inputs, data.targets
    items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])



def _kfac_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, head: str) -> KFACPreconditioner:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    precond = KFACPreconditioner(
        model,
        KFACConfig(curvature="ief", output_module=head, factor_every=1, inverse_every=1),
        optimizer=opt,
    )
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    precond.step()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    return precond


# -- models ------------------------------------------------------------------------------------------


def test_model_output_shapes() -> None:
    assert mlp()(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert small_cnn()(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert resnet18(width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet18(num_classes=7, in_channels=1, width=4)(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    model = gpt(vocab_size=50, block_size=16, d_model=32, n_layer=1, n_head=4)
    assert model(torch.randint(50, (2, 16))).shape == (2, 16, 50)
    assert model(torch.randint(50, (2, 5))).shape == (2, 5, 50)  # shorter than block_size


def test_mlp_and_small_cnn_layer_names_unchanged() -> None:
    assert [n for n, m in mlp().named_modules() if isinstance(m, nn.Linear)] == ["1", "3", "5"]
    assert [n for n, m in small_cnn().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))] == [
        "0",
        "2",
        "5",
    ]


def test_resnet18_structure_and_one_kfac_step() -> None:
    model = resnet18()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 20
    assert linears == ["fc"]
    assert all(c.groups == 1 and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000

    torch.manual_seed(0)
    small = resnet18(width=4)
    precond = _kfac_step(small, torch.randn(4, 3, 16, 16), torch.randint(10, (4,)), "fc")
    assert len(precond.layers) == 21 + 20  # and the 20 BatchNorms, element-wise
    assert not precond.skipped


def test_gpt_is_causal_and_takes_a_kfac_step() -> None:
    torch.manual_seed(0)
    model = gpt(vocab_size=40, block_size=12, d_model=16, n_layer=2, n_head=2).eval()
    ids = torch.randint(40, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 40
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(40, (1, 13)))

    model.train()
    precond = _kfac_step(model, ids, torch.randint(40, (2, 12)), "head")
    # 2 embeddings + per block q, k, v, out, fc, proj and 2 LayerNorms + the final LayerNorm + head
    assert len(precond.layers) == 2 + 8 * 2 + 1 + 1
    assert not precond.skipped


def test_gpt_rejects_bad_shape_arguments() -> None:
    with pytest.raises(ValueError, match="divisible by n_head"):
        gpt(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        gpt(n_layer=0)


# -- datasets ----------------------------------------------------------------------------------------


def test_digits() -> None:
    x, y = digits()
    assert x.shape == (1797, 1, 8, 8)
    assert y.shape == (1797,)
    assert y.dtype == torch.int64


def test_synthetic_images_deterministic_and_class_structured() -> None:
    x1, y1 = synthetic_images(n=300, channels=3, size=16, classes=5, seed=3)
    x2, y2 = synthetic_images(n=300, channels=3, size=16, classes=5, seed=3)
    x3, y3 = synthetic_images(n=300, channels=3, size=16, classes=5, seed=4)
    assert x1.shape == (300, 3, 16, 16)
    assert x1.dtype == torch.float32
    assert y1.dtype == torch.int64
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert not torch.equal(y1, y3)
    assert torch.bincount(y1).tolist() == [60] * 5
    # without noise, clutter and shifts a class is its prototype up to contrast
    clean, labels = synthetic_images(n=50, channels=1, size=7, classes=2, noise=0.0, clutter=0.0, seed=0)
    flat = F.normalize(clean.flatten(1), dim=1)
    same = flat[labels == 0] @ flat[labels == 0].T
    assert torch.allclose(same, torch.ones_like(same), atol=1e-5)


def test_synthetic_tokens_deterministic_and_next_token_targets() -> None:
    x1, y1 = synthetic_tokens(n_sequences=64, block_size=16, vocab_size=30, seed=1)
    x2, y2 = synthetic_tokens(n_sequences=64, block_size=16, vocab_size=30, seed=1)
    x3, _ = synthetic_tokens(n_sequences=64, block_size=16, vocab_size=30, seed=2)
    assert x1.shape == y1.shape == (64, 16)
    assert x1.dtype == y1.dtype == torch.int64
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert int(x1.min()) >= 0
    assert int(x1.max()) < 30
    # a bigram chain: far fewer distinct (token, next) pairs than uniform sampling would give
    pairs = torch.unique(x1 * 30 + y1).numel()
    assert pairs < 0.6 * 30 * 30


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("héllo wörld, natural gradients!\n" * 3, encoding="utf-8")
    raw = path.read_bytes()
    x, y = text_file(path, block_size=8)
    assert x.shape == y.shape == ((len(raw) - 1) // 8, 8)
    assert x.dtype == torch.int64
    assert bytes(x.flatten().tolist()) == raw[: x.numel()]
    assert bytes(y.flatten().tolist()) == raw[1 : x.numel() + 1]

    with pytest.raises(ValueError, match=r"missing\.txt.*does not exist"):
        text_file(tmp_path / "missing.txt")
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match=r"short\.txt.*too short.*block_size=8"):
        text_file(short, block_size=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt.*is empty"):
        text_file(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        text_file(binary, block_size=8)


def test_image_folder_tensors(tmp_path: Path) -> None:
    path = tmp_path / "set.pt"
    images, labels = torch.randn(6, 1, 4, 4), torch.arange(6)
    torch.save({"images": images, "labels": labels}, path)
    x, y = image_folder_tensors(path)
    assert torch.equal(x, images)
    assert torch.equal(y, labels)
    with pytest.raises(ValueError, match=r"nothere\.pt.*does not exist"):
        image_folder_tensors(tmp_path / "nothere.pt")
    torch.save({"images": images, "targets": labels}, path)
    with pytest.raises(ValueError, match=r"set.pt.*lacks key\(s\) \['labels'\]"):
        image_folder_tensors(path)
    torch.save({"images": images, "labels": labels[:5]}, path)
    with pytest.raises(ValueError, match="must match"):
        image_folder_tensors(path)


def test_split_holdout() -> None:
    x, y = torch.arange(20).float(), torch.arange(20)
    (xa, ya), (xb, yb) = split_holdout(x, y, 0.25, seed=1)
    assert len(xa) == 15
    assert len(xb) == 5
    assert torch.equal(xa.long(), ya)
    assert torch.equal(xb.long(), yb)
    assert sorted(torch.cat([ya, yb]).tolist()) == list(range(20))
    (_, ya2), _ = split_holdout(x, y, 5, seed=1)
    assert torch.equal(ya, ya2)
    with pytest.raises(ValueError, match="at least one sample on each side of 20, got 20"):
        split_holdout(x, y, 20)


# -- sharded loader ----------------------------------------------------------------------------------


def _data(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n).float().unsqueeze(1), torch.arange(n)


def test_sharded_loader_ranks_are_disjoint_slices_of_the_global_batch() -> None:
    x, y = _data()
    world, per_rank = 3, 4
    loaders = [
        ShardedLoader(x, y, rank=r, world_size=world, batch_size=per_rank, seed=7) for r in range(world)
    ]
    single = ShardedLoader(x, y, rank=0, world_size=1, batch_size=world * per_rank, seed=7)
    assert len(single) == len(loaders[0]) == 103 // 12
    seen: list[int] = []
    for epoch in range(2):
        batches = [list(loader) for loader in loaders]
        global_batches = list(single)
        assert all(len(b) == len(global_batches) for b in batches)
        epoch_rows: list[int] = []
        for step, (gx, gy) in enumerate(global_batches):
            parts = [batches[r][step] for r in range(world)]
            assert all(px.shape == (per_rank, 1) and py.shape == (per_rank,) for px, py in parts)
            assert torch.equal(torch.cat([py for _, py in parts]), gy)
            assert torch.equal(torch.cat([px for px, _ in parts]), gx)
            epoch_rows += gy.tolist()
        assert len(set(epoch_rows)) == len(epoch_rows) == 8 * 12  # disjoint, last partial batch dropped
        seen.append(hash(tuple(epoch_rows)))
        assert all(loader.state_dict() == {"epoch": epoch + 1, "index": 0} for loader in loaders)
    assert seen[0] != seen[1]  # a new permutation each epoch
    other = ShardedLoader(x, y, rank=0, world_size=1, batch_size=12, seed=8)
    assert not torch.equal(
        next(iter(other))[1], next(iter(ShardedLoader(x, y, rank=0, world_size=1, batch_size=12, seed=7)))[1]
    )


def test_sharded_loader_resume_continues_identically() -> None:
    x, y = _data(50)
    reference = ShardedLoader(x, y, rank=1, world_size=2, batch_size=3, seed=11)
    expected = [b.tolist() for _, b in islice(reference.forever(), 30)]  # 8 batches/epoch: crosses 3 epochs

    first = ShardedLoader(x, y, rank=1, world_size=2, batch_size=3, seed=11)
    got = [b.tolist() for _, b in islice(first.forever(), 13)]
    state = first.state_dict()
    assert state == {"epoch": 1, "index": 5}
    resumed = ShardedLoader(x, y, rank=1, world_size=2, batch_size=3, seed=11)
    resumed.load_state_dict(dict(state))
    got += [b.tolist() for _, b in islice(resumed.forever(), 17)]
    assert got == expected

    # a position at an epoch boundary, and the rest of an epoch by plain iteration
    at_end = ShardedLoader(x, y, rank=1, world_size=2, batch_size=3, seed=11)
    at_end.load_state_dict({"epoch": 2, "index": 3})
    assert [b.tolist() for _, b in at_end] == expected[19:24]
    assert at_end.state_dict() == {"epoch": 3, "index": 0}


def test_sharded_loader_errors() -> None:
    x, y = _data(10)
    with pytest.raises(ValueError, match="rank"):
        ShardedLoader(x, y, rank=2, world_size=2, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch of 12"):
        ShardedLoader(x, y, rank=0, world_size=3, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="targets"):
        ShardedLoader(x, y[:5], rank=0, world_size=1, batch_size=1, seed=0)
    loader = ShardedLoader(x, y, rank=0, world_size=1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="past the 5 batches"):
        loader.load_state_dict({"epoch": 0, "index": 6})
    with pytest.raises(ValueError, match="'epoch' and 'index'"):
        loader.load_state_dict({"epoch": 0})


# -- registry ----------------------------------------------------------------------------------------


def test_builtin_models_by_name() -> None:
    hf = {"hf_causal_lm", "hf_sequence_classification"}  # their built models declare the logits module
    assert set(BUILTIN_MODELS) == {"mlp", "small_cnn", "resnet18", "gpt", *hf}
    assert {n: output_module_of(n) for n in BUILTIN_MODELS} == {
        "mlp": "5",
        "small_cnn": "5",
        "resnet18": "fc",
        "gpt": "head",
        "hf_causal_lm": None,
        "hf_sequence_classification": None,
    }
    assert task_of("gpt") == "language_model"
    assert task_of("resnet18") == "classification"
    model = build_model("resnet18", {"width": 4, "num_classes": 3})
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    assert output_module_of("resnet18", model) == "fc"
    deep = build_model("mlp", {"depth": 3})
    assert output_module_of("mlp", deep) == "7"
    assert isinstance(dict(deep.named_modules())["7"], nn.Linear)
    assert output_module_of("gpt", build_model("gpt", {"d_model": 16, "n_head": 2})) == "head"


def test_build_model_seed_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = build_model("gpt", {"d_model": 16, "n_head": 2}, seed=5)
    b = build_model("gpt", {"d_model": 16, "n_head": 2}, seed=5)
    c = build_model("gpt", {"d_model": 16, "n_head": 2}, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.get_parameter("head.weight"), c.get_parameter("head.weight"))


def test_builtin_datasets_by_name(tmp_path: Path) -> None:
    assert set(BUILTIN_DATASETS) == {
        "digits", "synthetic_images", "synthetic_tokens", "text", "tensor_file", "image_folder", "cifar10", "hf_files",
    }
    assert build_dataset("digits", {}, seed=0)[0].shape == (1797, 1, 8, 8)
    args = {"n_sequences": 8, "block_size": 4, "vocab_size": 10}
    x1, _ = build_dataset("synthetic_tokens", args, seed=1)
    x2, _ = build_dataset("synthetic_tokens", args, seed=2)
    x3, _ = build_dataset("synthetic_tokens", {**args, "seed": 1}, seed=2)  # explicit data.args.seed wins
    assert not torch.equal(x1, x2)
    assert torch.equal(x1, x3)
    assert torch.equal(
        build_dataset("synthetic_images", {"n": 20, "size": 8}, seed=3)[0],
        synthetic_images(n=20, size=8, seed=3)[0],
    )
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 3)
    assert build_dataset("text", {"path": str(text), "block_size": 4}, seed=0)[0].shape == (7, 4)
    torch.save({"images": torch.zeros(3, 2), "labels": torch.zeros(3, dtype=torch.long)}, tmp_path / "d.pt")
    assert build_dataset("tensor_file", {"path": str(tmp_path / "d.pt")}, seed=0)[0].shape == (3, 2)
    assert dataset_task_of("text") == "language_model"
    assert dataset_task_of("digits") == "classification"
    assert dataset_task_of("pkg.mod:f") is None


def test_user_factories() -> None:
    model = build_model("user_model:make_model", {"hidden": 5}, import_paths=[FIXTURES])
    assert model(torch.randn(2, 4)).shape == (2, 3)
    assert model.get_parameter("0.weight").shape == (5, 4)
    assert output_module_of("user_model:make_model", model) is None
    assert task_of("user_model:make_model", model) == "classification"
    tagged = build_model("user_model:make_tagged_model", None, import_paths=[FIXTURES])
    assert output_module_of("user_model:make_tagged_model", tagged) == "2"
    bad = build_model("user_model:make_badly_tagged_model", {}, import_paths=[FIXTURES])
    with pytest.raises(ValueError, match="ngd_output_module='head' names none"):
        output_module_of("user_model:make_badly_tagged_model", bad)
    # importable as a package path too (the repository root is on sys.path under pytest)
    assert isinstance(build_model("tests.fixtures.user_model:make_model", {}), nn.Sequential)

    x, y = build_dataset("user_model:make_data", {"n": 10}, seed=0, import_paths=[FIXTURES])
    assert x.shape == (10, 4)
    assert y.shape == (10,)
    s1 = build_dataset("user_model:make_seeded_data", {}, seed=1, import_paths=[FIXTURES])
    s2 = build_dataset("user_model:make_seeded_data", {}, seed=2, import_paths=[FIXTURES])
    assert not torch.equal(s1[0], s2[0])
    dx, dy = build_dataset("user_model:make_dataset", {"n": 6}, seed=0, import_paths=[FIXTURES])
    assert dx.shape == (6, 4)
    assert dy.tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    ("name", "args", "pattern"),
    [
        (
            "resnet50",
            {},
            r"model.name: unknown built-in model 'resnet50' \(did you mean 'resnet18'\?\); built-ins: mlp, small_cnn, resnet18, gpt",
        ),
        ("", {}, "model.name must be a non-empty string"),
        (
            "no_such_pkg.models:make",
            {},
            "model.name: cannot import module 'no_such_pkg.models'.*no module named 'no_such_pkg'",
        ),
        ("user_model:nope", {}, "model.name: 'user_model' has no attribute 'nope'"),
        ("user_model:NOT_CALLABLE", {}, "not a callable factory"),
        ("user_model:make_model:x", {}, "not of the form 'package.module:factory'"),
        (
            "user_model:make_model",
            {"width": 3},
            "model.args.width: 'user_model:make_model' takes no argument 'width'; accepted: hidden",
        ),
        (
            "user_model:make_model",
            {"hidden": "big"},
            r"model.args: 'user_model:make_model' rejected the arguments \{'hidden': 'big'\}",
        ),
        (
            "user_model:broken",
            {},
            "model.args: building 'user_model:broken' with {} failed: RuntimeError: boom",
        ),
        (
            "resnet18",
            {"depth": 3},
            "model.args.depth: 'resnet18' takes no argument 'depth'; accepted: num_classes, in_channels, width",
        ),
        ("resnet18", {"width": "64"}, r"model.args.width: 'resnet18' expects an integer, got '64' \(str\)"),
        ("gpt", {"dropout": True}, "model.args.dropout: 'gpt' expects a number"),
        ("gpt", {"d_model": 30}, "model.args: building 'gpt'.*divisible by n_head"),
        ("gpt", ["d_model"], "model.args must be a mapping"),
    ],
)
def test_build_model_errors(name: str, args: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_model(name, args, import_paths=[FIXTURES])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "args", "pattern"),
    [
        ("cifar100", {}, "data.name: unknown built-in dataset 'cifar100'.*digits, synthetic_images"),
        ("text", {}, "data.args.path: required by 'text' but not given"),
        ("text", {"path": "/no/such/file.txt"}, "/no/such/file.txt"),
        ("digits", {"seed": 1}, "data.args.seed: 'digits' takes no argument 'seed'"),
        (
            "synthetic_images",
            {"n": 0},
            "data.args: building 'synthetic_images'.*n must be a positive integer",
        ),
        ("user_model:make_not_data", {}, "data.name: 'user_model:make_not_data' returned a str"),
        ("user_model.missing:make", {}, "data.name: cannot import module 'user_model.missing'"),
    ],
)
def test_build_dataset_errors(name: str, args: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_dataset(name, args, seed=0, import_paths=[FIXTURES])


def test_task_of_unknown_and_tagged() -> None:
    with pytest.raises(ValueError, match="unknown built-in model"):
        task_of("transformer")
    with pytest.raises(ValueError, match="unknown built-in model"):
        output_module_of("transformer")
    model = nn.Linear(2, 2)
    model.ngd_task = "language_model"  # type: ignore[assignment]
    assert task_of("pkg.mod:f", model) == "language_model"
    model.ngd_task = "regression"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="ngd_task='regression'"):
        task_of("pkg.mod:f", model)

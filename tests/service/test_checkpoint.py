"""Checkpoint store: atomic writes, checksums, safe loading, fallback, pruning, RNG, preemption, agreement."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ngd_dist.service.checkpoint import (
    CheckpointError,
    CheckpointStore,
    PreemptionHandler,
    agree_on_step,
    capture_rng_state,
    restore_rng_state,
)
from ngd_dist.service.checkpoint import store as ckpt

# ------------------------------------------------------------------------------------------ helpers


def realistic_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
        opt.step()
        sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "data": {"epoch": 3, "index": 1234, "order_seed": 7, "name": "digits", "fraction": 0.25},
        "config": {"lr": 0.1, "curvature": "ief", "flags": [True, False, None], "shape": (2, 3)},
    }


def assert_same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def write_marker(path: str) -> None:
    Path(path).write_text("executed")


class Evil:
    """Unpickling this object would call write_marker: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (write_marker, (self.marker,))


def wrap_as_checkpoint(payload: bytes, *, step: int, rank: int = 0, world_size: int = 1) -> bytes:
    """A file with a valid trailer and checksum around an arbitrary payload."""
    import hashlib

    footer = {
        "format": ckpt.FORMAT,
        "version": ckpt.FORMAT_VERSION,
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    encoded = json.dumps(footer).encode()
    return payload + encoded + len(encoded).to_bytes(8, "big") + ckpt.MAGIC


# ------------------------------------------------------------------------------------- round trips


def test_round_trip_of_a_realistic_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = realistic_state()
    path = store.save(5, state)
    assert path == tmp_path / "step-00000005.rank0-of1.pt"
    loaded = store.load(path)
    assert_same(state, loaded)
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0
    assert store.latest_valid()[0] == 5  # type: ignore[index]
    assert leftovers(tmp_path) == []
    footer = store.verify(path)
    assert (footer["step"], footer["rank"], footer["world_size"]) == (5, 0, 1)


def test_every_documented_type_round_trips_and_tensors_load_on_cpu(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state: dict[str, Any] = {
        "od": OrderedDict([("b", 1), ("a", 2)]),
        "set": {1, 2, 3},
        "bytes": b"\x00\xff",
        "complex": 1 + 2j,
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "param": nn.Parameter(torch.ones(2)),
        "gen": torch.Generator().manual_seed(3).get_state(),
        "big_int": 2**70,
        "keys": {0: "int key", 1.5: "float key", None: "none key", True: "bool key"},
        "half": torch.arange(4, dtype=torch.float16),
    }
    loaded = store.load(store.save(0, state))
    for key in ("od", "set", "bytes", "complex", "size", "dtype", "device", "big_int", "keys"):
        assert loaded[key] == state[key], key
        assert type(loaded[key]) is type(state[key]), key
    assert isinstance(loaded["param"], nn.Parameter)
    assert torch.equal(loaded["param"], state["param"])
    assert torch.equal(loaded["gen"], state["gen"])
    assert loaded["half"].dtype == torch.float16


def test_resaving_a_step_replaces_it_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(10, {"v": 1})
    store.save(10, {"v": 2})
    assert store.load(store.path_for(10)) == {"v": 2}

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="could not be written: simulated crash"):
        store.save(10, {"v": 3})
    monkeypatch.undo()
    assert store.load(store.path_for(10)) == {"v": 2}
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------- atomicity


def test_crash_before_rename_keeps_previous_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    store.save(10, {"step": 10})
    before = sorted(p.name for p in tmp_path.iterdir())

    def crash(*args, **kwargs):
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(
        CheckpointError, match=r"step-00000020\.rank0-of1\.pt: could not be written: power lost"
    ):
        store.save(20, {"step": 20})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial final file, no temp file
    assert not store.path_for(20).exists()
    assert store.latest_valid() == (10, {"step": 10})


def test_crash_during_fsync_and_interrupt_during_write_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"a": torch.ones(3)})

    def fail_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(CheckpointError, match="disk full"):
        store.save(2, {"a": torch.zeros(3)})
    monkeypatch.undo()

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):  # not swallowed, but cleaned up
        store.save(3, {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert store.steps() == [1]
    assert leftovers(tmp_path) == []
    step, state = store.latest_valid()
    assert step == 1
    assert torch.equal(state["a"], torch.ones(3))


# ---------------------------------------------------------------------------------- damage detection


def test_truncated_checkpoint_is_detected_and_previous_one_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    store.save(100, realistic_state(0))
    newest = store.save(200, realistic_state(1))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step-00000200.*(truncated|trailer)"):
        store.load(newest)
    with caplog.at_level(logging.WARNING, logger="ngd_dist.service.checkpoint"):
        found = store.latest_valid()
    assert found is not None
    assert found[0] == 100
    assert_same(found[1]["model"], realistic_state(0)["model"])
    assert any("skipping step 200" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cut", [0, 3, 16, -1, -20])
def test_other_truncations_are_detected(tmp_path: Path, cut: int) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(1, {"w": torch.randn(10)})
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=str(path)):
        store.load(path)


def test_corrupted_byte_is_detected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"w": torch.zeros(1000)})
    path = store.save(2, {"w": torch.zeros(1000)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor bytes: the zip and pickle still parse
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"SHA-256 .* does not match"):
        store.load(path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        store.verify(path)
    assert store.latest_valid()[0] == 1  # type: ignore[index]


def test_corrupted_footer_is_detected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(1, {"w": torch.zeros(10)})
    data = path.read_bytes()
    digest = store.verify(path)["sha256"]
    flipped = data.replace(digest.encode(), ("0" if digest[0] != "0" else "1").encode() + digest[1:].encode())
    path.write_bytes(flipped)
    with pytest.raises(CheckpointError, match="SHA-256"):
        store.load(path)
    path.write_bytes(data.replace(b'"size"', b'"sizX"'))
    with pytest.raises(CheckpointError, match="'size' is missing"):
        store.load(path)
    path.write_bytes(data[:-20] + b"\x00" + data[-19:])
    with pytest.raises(CheckpointError, match="footer"):
        store.load(path)


def test_missing_trailer_is_detected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"ok": 1})
    plain = store.path_for(2)
    torch.save({"ok": 2}, plain)  # a checkpoint without the checksum trailer
    with pytest.raises(CheckpointError, match="no checksum trailer"):
        store.load(plain)
    assert store.latest_valid() == (1, {"ok": 1})


def test_missing_file_and_misnamed_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match=r"step-00000007.*no such file"):
        store.load(store.path_for(7))
    src = store.save(7, {"x": 1})
    os.replace(src, store.path_for(9))  # renamed by hand
    with pytest.raises(CheckpointError, match="holds step 7 of rank 0 of 1, but is named for step 9"):
        store.load(store.path_for(9))


# ------------------------------------------------------------------------------------- safe loading


def test_arbitrary_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    store = CheckpointStore(tmp_path / "ckpt")
    # sanity: the object really executes when unpickled unsafely
    buffer = io.BytesIO()
    torch.save({"evil": Evil(marker)}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert marker.exists()
    marker.unlink()

    # a plain torch.save file at a checkpoint name: refused before unpickling
    torch.save({"evil": Evil(marker)}, store.path_for(1))
    with pytest.raises(CheckpointError, match="no checksum trailer"):
        store.load(store.path_for(1))
    # a file with a valid trailer and checksum: the weights_only loader refuses it
    store.path_for(2).write_bytes(wrap_as_checkpoint(buffer.getvalue(), step=2))
    store.verify(store.path_for(2))  # integrity alone passes
    with pytest.raises(CheckpointError, match="cannot be unpickled safely"):
        store.load(store.path_for(2))
    assert store.latest_valid() is None
    assert not marker.exists()


def test_save_refuses_state_that_could_not_be_loaded_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\['evil'\]\[0\] is a .*Evil"):
        store.save(1, {"evil": [Evil(tmp_path / "m")]})
    with pytest.raises(CheckpointError, match=r"key .* is a tuple"):
        store.save(1, {"d": {(1, 2): 3}})
    with pytest.raises(CheckpointError, match="step=-1"):
        store.save(-1, {})
    with pytest.raises(CheckpointError, match="state is a list"):
        store.save(1, [1, 2])  # type: ignore[arg-type]
    assert store.steps() == []
    assert leftovers(tmp_path) == []


def test_save_refuses_numpy_values_naming_the_entry(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\['data'\]\['arr'\] is a numpy.ndarray"):
        store.save(1, {"data": {"arr": np.zeros(3)}})
    with pytest.raises(CheckpointError, match=r"state\['loss'\] is a numpy.float64"):
        store.save(1, {"loss": np.float64(1.0)})
    assert store.steps() == []


def test_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="rank=2 with world_size=2"):
        CheckpointStore(tmp_path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size=0"):
        CheckpointStore(tmp_path, world_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file"):
        CheckpointStore(tmp_path / "file")


# ------------------------------------------------------------------------------------------- pruning


def test_keep_prunes_older_steps_only_after_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    other = CheckpointStore(tmp_path, keep=2, rank=1, world_size=2)
    other.save(1, {"rank": 1})
    for step in range(1, 6):
        store.save(step, {"step": step})
    assert store.steps() == [4, 5]

    def crash(*args, **kwargs):
        raise OSError("preempted mid-save")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError):
        store.save(6, {"step": 6})
    monkeypatch.undo()
    assert store.steps() == [4, 5]  # nothing deleted for a save that did not complete
    assert other.steps() == [1]  # other ranks' files are never touched
    assert store.latest_valid() == (5, {"step": 5})

    store.save(6, {"step": 6}, prune=False)
    assert store.steps() == [4, 5, 6]
    assert [p.name for p in store.prune()] == ["step-00000004.rank0-of1.pt"]
    assert store.steps() == [5, 6]


def test_damaged_files_do_not_count_towards_keep(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.save(1, {"step": 1})
    damaged = store.save(2, {"step": 2})
    damaged.write_bytes(damaged.read_bytes()[:10])
    (tmp_path / ".step-00000009.rank0-of1.pt.leftover.tmp").write_bytes(b"crashed run")
    store.save(3, {"step": 3})
    assert store.steps() == [1, 3]  # step 1 kept (2 is damaged), damaged 2 and the leftover removed
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------- RNG


def test_rng_capture_and_restore_reproduce_the_same_numbers(tmp_path: Path) -> None:
    random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = capture_rng_state()
    first = (random.random(), torch.rand(5), torch.randn(2), random.gauss(0, 1), torch.randint(0, 9, (4,)))
    # through a checkpoint: the state survives weights_only loading
    store = CheckpointStore(tmp_path)
    loaded = store.load(store.save(1, {"rng": state}))["rng"]
    random.random(), torch.rand(100)
    restore_rng_state(loaded)
    second = (random.random(), torch.rand(5), torch.randn(2), random.gauss(0, 1), torch.randint(0, 9, (4,)))
    assert first[0] == second[0]
    assert first[3] == second[3]
    for a, b in zip(first[1:3] + first[4:], second[1:3] + second[4:], strict=True):
        assert torch.equal(a, b)


def test_numpy_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    np.random.seed(1)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    state = capture_rng_state()
    assert isinstance(state["numpy"]["key"], torch.Tensor)
    first = (np.random.rand(3), np.random.randn())
    store = CheckpointStore(tmp_path)
    loaded = store.load(store.save(1, {"rng": state}))["rng"]
    np.random.rand(11)
    restore_rng_state(loaded)
    second = (np.random.rand(3), np.random.randn())
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    with pytest.raises(ValueError, match="'numpy' entry"):
        restore_rng_state({**state, "numpy": {"key": torch.zeros(3)}})


def test_rng_state_without_numpy(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("numpy")
    saved_with_numpy = capture_rng_state()
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now raises ImportError
    state = capture_rng_state()
    assert "numpy" not in state
    assert {"python", "torch"} <= set(state)
    with caplog.at_level(logging.WARNING, logger="ngd_dist.service.checkpoint"):
        restore_rng_state(saved_with_numpy)
    assert any("NumPy is not importable" in r.getMessage() for r in caplog.records)


def test_restore_rng_state_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="version"):
        restore_rng_state({"python": random.getstate()})
    good = capture_rng_state()
    with pytest.raises(ValueError, match="'torch' entry"):
        restore_rng_state({**good, "torch": [1, 2]})
    with pytest.raises(ValueError, match="'python' entry"):
        restore_rng_state({**good, "python": 3})
    with pytest.raises(ValueError, match="'cuda' entry"):
        restore_rng_state({**good, "cuda": "nope"})


# ---------------------------------------------------------------------------------------- preemption


def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_preemption_handler_sets_flag_and_restores_handlers() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionHandler() as preempt:
        assert not preempt.requested
        assert preempt.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: preempt.requested)
        assert preempt.signal_name == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before
    assert preempt.requested  # still readable after the block


def test_second_signal_goes_to_the_previous_handler() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionHandler(repeat_window=0) as preempt:
            os.kill(os.getpid(), signal.SIGINT)
            assert wait_for(lambda: preempt.requested)
            assert preempt.signal_name == "SIGINT"
            assert calls == []
            os.kill(os.getpid(), signal.SIGINT)
            assert wait_for(lambda: calls == [signal.SIGINT])
    finally:
        signal.signal(signal.SIGINT, previous)


def test_preemption_handler_outside_main_thread_is_a_clear_error() -> None:
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with PreemptionHandler():
                pass
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "cannot install signal handlers" in str(errors[0])


# ----------------------------------------------------------------------------------------- agreement


class FakeWorld:
    """A MIN all-reduce across threads: each thread is one rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: dict[int, int] = {}
        self.barrier = threading.Barrier(size)
        self.calls = 0

    def all_reduce_min(self, rank: int):
        def reduce(value: int) -> int:
            self.values[rank] = value
            self.barrier.wait()
            result = min(self.values.values())
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return result

        return reduce

    def run(self, fn) -> list:
        results: list = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.all_reduce_min(rank))
            except BaseException as exc:
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize(
    ("per_rank", "expected"),
    [
        ([[10, 20, 30], [10, 20, 30]], 30),
        ([[10, 20, 30], [10, 20]], 20),  # one rank missed the last save
        ([[20, 40], [10, 30, 40]], 40),
        ([[20, 40], [10, 20, 30]], 20),  # the MIN of the newest steps (30) is missing on rank 0
        ([[20, 40], [20, 30]], 20),
        ([[20, 40], [10, 30]], None),  # no step valid everywhere
        ([[5], [], [5]], None),  # a rank with nothing
        ([[1, 2, 3], [3, 2], [2, 3, 9]], 3),
        ([[], []], None),
    ],
)
def test_agree_on_step_finds_newest_step_valid_on_all_ranks(per_rank, expected) -> None:
    world = FakeWorld(len(per_rank))
    results = world.run(lambda rank, reduce: agree_on_step(per_rank[rank], reduce))
    assert results == [expected] * len(per_rank)


def test_agree_on_step_single_rank_and_bad_reduce() -> None:
    assert agree_on_step([3, 1, 2], lambda v: v) == 3
    assert agree_on_step([], lambda v: v) is None
    assert agree_on_step(lambda bound: None, lambda v: v) is None
    with pytest.raises(ValueError, match="expected the MIN"):
        agree_on_step([3], lambda v: v + 1)
    with pytest.raises(ValueError, match="expected ints >= 0"):
        agree_on_step([-2], lambda v: v)


def test_latest_agreed_over_ranks_skips_a_step_damaged_on_one_rank(tmp_path: Path) -> None:
    stores = [CheckpointStore(tmp_path, keep=5, rank=r, world_size=2) for r in range(2)]
    for step in (10, 20, 30):
        for rank, store in enumerate(stores):
            store.save(step, {"step": step, "rank": rank})
    stores[1].save(40, {"step": 40, "rank": 1})  # rank 0 was preempted before saving 40
    bad = stores[1].path_for(30)
    bad.write_bytes(bad.read_bytes()[:-5])
    assert stores[0].latest_valid()[0] == 30
    assert stores[1].latest_valid()[0] == 40
    world = FakeWorld(2)
    results = world.run(lambda rank, reduce: stores[rank].latest_agreed(reduce))
    assert results == [(20, {"step": 20, "rank": 0}), (20, {"step": 20, "rank": 1})]

    empty = FakeWorld(2)
    (tmp_path / "other").mkdir()
    fresh = [CheckpointStore(tmp_path / "other", rank=r, world_size=2) for r in range(2)]
    assert empty.run(lambda rank, reduce: fresh[rank].latest_agreed(reduce)) == [None, None]


def test_files_of_other_ranks_and_world_sizes_are_ignored(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, rank=1, world_size=2).save(50, {"r": 1})
    CheckpointStore(tmp_path, rank=0, world_size=4).save(60, {"r": 0})
    mine = CheckpointStore(tmp_path, rank=0, world_size=2)
    assert mine.steps() == []
    assert mine.latest_valid() is None
    mine.save(40, {"r": 0})
    assert mine.latest_valid() == (40, {"r": 0})

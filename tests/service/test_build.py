"""A job turned into a rank's parts: the logits module resolved on a copy of the config, one clock."""

from __future__ import annotations

import pytest
import torch

from ngd_dist import KFACConfig
from ngd_dist.service.build import build, with_logits_module
from ngd_dist.service.catalog import build_model
from ngd_dist.service.environment import Environment
from ngd_dist.service.jobs import JobError, load_job
from tests.fixtures.user_model import make_model
from tests.support import QUICK

USER_MODEL = "tests.fixtures.user_model:make_model"


def test_the_catalogue_names_the_logits_module_on_a_copy_prefixed_under_ddp() -> None:
    model = build_model("mlp", {"in_features": 64, "hidden": 16, "classes": 10}, seed=0)
    config = KFACConfig(curvature="ief")
    plain = with_logits_module(config, "mlp", model, wrapped=False)
    wrapped = with_logits_module(config, "mlp", model, wrapped=True)
    assert (plain.output_module, wrapped.output_module) == ("5", "module.5")
    assert config.output_module is None  # the validated config is left as it was
    named = with_logits_module(KFACConfig(output_module="3"), "mlp", model, wrapped=True)
    assert named.output_module == "module.3"  # the job's own name wins over the catalogue's


def test_a_curvature_that_needs_logits_without_a_known_head_is_one_line_naming_the_key() -> None:
    model = make_model()
    with pytest.raises(JobError, match=r"preconditioner\.output_module.*its last Linear is '2'"):
        with_logits_module(KFACConfig(curvature="mc"), USER_MODEL, model, wrapped=False)
    config = KFACConfig(curvature="ef")
    assert with_logits_module(config, USER_MODEL, model, wrapped=False) is config  # EF needs none


def test_the_parts_share_one_clock_with_the_preconditioner(tmp_path) -> None:
    job = load_job(QUICK, [f"checkpoint.dir={tmp_path}", "preconditioner.output_module=null"])
    parts = build(job, Environment(0, 1, 0, torch.device("cpu"), "single"))
    assert parts.precond is not None
    assert parts.precond.clock is parts.clock
    assert parts.precond.config.output_module == "5"
    assert job.preconditioner.kfac.output_module is None
    assert parts.model is parts.base_model  # one rank: no DDP wrapper
    assert parts.global_batch == job.batch.per_rank


def test_metrics_synchronize_phases_gives_the_clock_a_device_sync_on_cuda_only(tmp_path, monkeypatch) -> None:
    """metrics.synchronize_phases: on CUDA every phase boundary waits for the device (queued work is
    charged to the phase that queued it); on the CPU work is synchronous and nothing is added."""
    import ngd_dist.service.build as build_module

    job = load_job(QUICK, [f"checkpoint.dir={tmp_path}", "metrics.synchronize_phases=true"])
    assert job.metrics.synchronize_phases is True
    cpu = build(job, Environment(0, 1, 0, torch.device("cpu"), "single"))
    assert cpu.clock.sync is None
    waits: list[str] = []
    monkeypatch.setattr(build_module, "device_sync", lambda device: lambda: waits.append(device.type))
    synced = build(job, Environment(0, 1, 0, torch.device("cpu"), "single"))
    with synced.clock("forward"):
        pass
    assert waits == ["cpu", "cpu"]
    off = build(load_job(QUICK, [f"checkpoint.dir={tmp_path}"]), Environment(0, 1, 0, torch.device("cpu"), "single"))
    assert off.clock.sync is None

"""The per-rank Prometheus exporter: /metrics, /healthz, ports and counter semantics."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.service.metrics import MetricsExporter, MetricsPortError
from ngd_dist.testing.distributed import free_port
from tests.support import FakeClock, http_get


def scrape(exporter: MetricsExporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(exporter.url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    labels.setdefault("rank", "3")
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def exporter(clock: FakeClock) -> Iterator[MetricsExporter]:
    ex = MetricsExporter(rank=3, world_size=4, port=free_port(), clock=clock)
    try:
        yield ex
    finally:
        ex.close()


def test_observe_step_values_and_rank_label(exporter: MetricsExporter, clock: FakeClock) -> None:
    clock.advance(2.5)
    before = time.time()
    for step in range(1, 4):
        exporter.observe_step(
            step=step,
            samples=32,
            tokens=320,
            seconds=0.5,
            loss=2.0 / step,
            grad_norm=1.5,
            phases={"forward": 0.2, "optimizer": 0.01, "evaluation": 0.3, "not_a_phase": 1.0},
        )
    after = time.time()
    s = scrape(exporter)
    assert value(s, "ngd_steps_total") == 3
    assert value(s, "ngd_samples_total") == 96
    assert value(s, "ngd_tokens_total") == 960
    assert value(s, "ngd_samples_per_second") == pytest.approx(64.0)
    assert value(s, "ngd_tokens_per_second") == pytest.approx(640.0)
    assert value(s, "ngd_step_seconds_count") == 3
    assert value(s, "ngd_step_seconds_sum") == pytest.approx(1.5)
    assert value(s, "ngd_phase_seconds_count", phase="forward") == 3
    assert value(s, "ngd_phase_seconds_sum", phase="optimizer") == pytest.approx(0.03)
    assert value(s, "ngd_phase_seconds_count", phase="decomposition") == 0
    assert value(s, "ngd_phase_seconds_sum", phase="evaluation") == pytest.approx(0.9)  # the trainer's
    assert not any(dict(labels).get("phase") == "not_a_phase" for _, labels in s)
    assert value(s, "ngd_loss") == pytest.approx(2.0 / 3)
    assert value(s, "ngd_grad_norm") == 1.5
    assert before <= value(s, "ngd_last_step_timestamp_seconds") <= after  # Unix time of the last step
    assert value(s, "ngd_seconds_since_checkpoint") == 2.5  # no checkpoint yet: since the start
    assert all(dict(labels).get("rank") == "3" for _, labels in s)


def test_seconds_since_checkpoint_computed_at_scrape(exporter: MetricsExporter, clock: FakeClock) -> None:
    clock.advance(0.75)
    assert value(scrape(exporter), "ngd_seconds_since_checkpoint") == 0.75
    exporter.mark_checkpoint()
    assert value(scrape(exporter), "ngd_seconds_since_checkpoint") == 0
    clock.advance(3.5)
    assert value(scrape(exporter), "ngd_seconds_since_checkpoint") == 3.5


def test_exposition_parses_and_follows_naming_conventions(exporter: MetricsExporter) -> None:
    exporter.observe_step(step=1, samples=4, seconds=0.1)
    _, text = http_get(exporter.url + "/metrics")
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith("ngd_"), family.name
        for sample in family.samples:
            assert sample.labels.get("rank") == "3", sample
            assert set(sample.labels) <= {"rank", "phase", "kind", "stat", "reason", "le"}, sample
    counters = [
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# TYPE") and line.endswith("counter")
    ]
    assert "ngd_steps_total" in counters
    assert "ngd_communication_bytes_total" in counters
    for name in counters:
        assert name.endswith("_total"), name
    for family in families:
        if family.type == "counter":
            for sample in family.samples:
                assert sample.name.endswith(("_total", "_created")), sample.name
    expected = {
        "ngd_steps_total",
        "ngd_samples_total",
        "ngd_tokens_total",
        "ngd_communication_bytes_total",
        "ngd_decompositions_total",
        "ngd_decomposition_failures_total",
        "ngd_decomposition_retries_total",
        "ngd_nonfinite_rejected_total",
        "ngd_skipped_steps_total",
        "ngd_samples_per_second",
        "ngd_tokens_per_second",
        "ngd_step_seconds_count",
        "ngd_phase_seconds_bucket",
        "ngd_loss",
        "ngd_grad_norm",
        "ngd_damping",
        "ngd_kl_clip_scale",
        "ngd_refresh_interval_steps",
        "ngd_seconds_since_checkpoint",
        "ngd_last_step_timestamp_seconds",
    }
    sample_names = {sample.name for family in families for sample in family.samples}
    assert expected <= sample_names


def _kfac_steps(model: nn.Module, precond: KFACPreconditioner, n: int, batch) -> None:
    for _ in range(n):
        model.zero_grad()
        x, y = batch(8, 6, 3)
        F.cross_entropy(model(x), y).backward()
        precond.step()


def test_preconditioner_counters_are_monotonic(exporter: MetricsExporter, tanh_mlp, classification_batch) -> None:
    model = tanh_mlp(6, 5, 3, seed=0)
    precond = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ef", factor_every=1, inverse_every=1))
    _kfac_steps(model, precond, 2, classification_batch)
    exporter.observe_preconditioner(precond)
    first = scrape(exporter)
    assert value(first, "ngd_decompositions_total") == precond.stats.decompositions > 0
    assert value(first, "ngd_damping") == pytest.approx(precond.stats.damping)
    assert value(first, "ngd_kl_clip_scale") == pytest.approx(precond.stats.kl_scale)
    assert value(first, "ngd_preconditioned_fraction") == pytest.approx(precond.coverage) == 1.0
    assert value(first, "ngd_factor_memory_bytes", kind="factors") == precond.memory.factors > 0
    assert value(first, "ngd_factor_memory_bytes", kind="decompositions") == precond.memory.decompositions > 0
    sent = precond.comm_bytes
    for kind in ("factors", "decompositions", "gradients", "preconditioned", "meta"):
        assert value(first, "ngd_communication_bytes_total", kind=kind) == sent.get(kind, 0)
    intervals = list(precond.intervals().values())
    assert value(first, "ngd_factors") == len(intervals) == 4
    assert value(first, "ngd_refresh_interval_steps", stat="min") == min(intervals)
    assert value(first, "ngd_refresh_interval_steps", stat="max") == max(intervals)
    _kfac_steps(model, precond, 2, classification_batch)
    exporter.observe_preconditioner(precond)
    exporter.observe_preconditioner(precond)  # no change: no double counting
    second = scrape(exporter)
    assert value(second, "ngd_decompositions_total") == precond.stats.decompositions
    # a fresh preconditioner (e.g. after recovery) restarts its counts: the exported ones still grow
    fresh = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ef", factor_every=1, inverse_every=1))
    _kfac_steps(model, fresh, 1, classification_batch)
    exporter.observe_preconditioner(fresh)
    third = scrape(exporter)
    for key, before in first.items():
        if key[0].endswith("_total"):
            assert second[key] >= before, key
            assert third[key] >= second[key], key
    assert (
        value(third, "ngd_decompositions_total") == precond.stats.decompositions + fresh.stats.decompositions
    )


def test_healthz_goes_stalled_and_recovers(clock: FakeClock) -> None:
    ex = MetricsExporter(rank=3, world_size=4, port=free_port(), stall_seconds=2.0, clock=clock)
    try:
        health = ex.url + "/healthz"
        clock.advance(1.75)  # not yet stalled: 200 with no step seen yet
        assert http_get(health) == (200, "ok step 0\n")
        clock.advance(0.25)  # stall_seconds since the start, no step: stalled
        assert http_get(health) == (503, "stalled since 2.0 seconds at start (no step yet) (stall_seconds=2)\n")
        ex.observe_step(step=7, samples=1, seconds=0.01)
        assert http_get(health) == (200, "ok step 7\n")
        clock.advance(1.5)
        ex.observe_step(step=7, samples=1, seconds=0.01)  # the step counter did not advance
        assert http_get(health)[0] == 200
        clock.advance(0.5)  # stall_seconds since step 7 was first seen
        assert http_get(health) == (503, "stalled since 2.0 seconds at step 7 (stall_seconds=2)\n")
        ex.observe_step(step=8, samples=1, seconds=0.01)
        assert http_get(health) == (200, "ok step 8\n")
        assert http_get(ex.url + "/nope")[0] == 404
    finally:
        ex.close()


def test_taken_port_raises_naming_it() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsPortError, match=rf"127\.0\.0\.1:{port}.*metrics\.port.*0 to disable"):
            MetricsExporter(rank=0, world_size=1, port=port)
    assert issubclass(MetricsPortError, RuntimeError)


def test_port_zero_disables() -> None:
    ex = MetricsExporter(rank=0, world_size=1, port=0)
    assert ex.url == ""
    ex.observe_step(step=1, samples=1, seconds=0.1, loss=1.0, phases={"optimizer": 0.1})
    ex.mark_checkpoint()
    ex.observe_preconditioner(object())  # type: ignore[arg-type]
    ex.close()


def test_local_rank_offsets_the_port() -> None:
    base = free_port() - 1
    ex = MetricsExporter(rank=5, world_size=8, port=base, local_rank=1)
    try:
        assert ex.port == base + 1
        assert ex.url == f"http://127.0.0.1:{base + 1}"
        assert http_get(ex.url + "/healthz")[0] == 200
    finally:
        ex.close()


def test_close_frees_the_port() -> None:
    port = free_port()
    ex = MetricsExporter(rank=0, world_size=1, port=port)
    assert http_get(ex.url + "/metrics")[0] == 200
    ex.close()
    ex.close()  # idempotent
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    again = MetricsExporter(rank=0, world_size=1, port=port)
    again.close()


def test_job_throughput_on_rank_0_only_and_quality_series_once_observed(exporter: MetricsExporter) -> None:
    zero = MetricsExporter(rank=0, world_size=4, port=free_port())
    try:
        for ex in (zero, exporter):
            ex.observe_job(samples=4 * 32, tokens=4 * 320, seconds=0.5)
            ex.observe_job(samples=4 * 32, tokens=4 * 320, seconds=1.5)
        s0, s3 = scrape(zero), scrape(exporter)
        assert value(s0, "ngd_job_samples_per_second", rank="0") == pytest.approx(128.0)
        assert value(s0, "ngd_job_tokens_per_second", rank="0") == pytest.approx(1280.0)
        assert not any(name.startswith("ngd_job_") for name, _ in s3)
        assert not any(name.startswith("ngd_quality_") for name, _ in s3)  # absent until observed
        exporter.observe_quality(gamma=0.25, seconds=0.125)
        s3 = scrape(exporter)
        assert value(s3, "ngd_quality_gamma") == 0.25
        assert value(s3, "ngd_quality_seconds") == 0.125
    finally:
        zero.close()


def test_evaluations_are_exported(exporter: MetricsExporter) -> None:
    from ngd_dist.service.evaluate import Evaluation

    exporter.observe_eval(Evaluation(0.25, 100, accuracy=0.9))
    exporter.observe_eval(Evaluation(3.5, 40, perplexity=33.1))
    got = scrape(exporter)
    assert value(got, "ngd_eval_loss") == 3.5
    assert value(got, "ngd_eval_accuracy") == 0.9
    assert value(got, "ngd_eval_perplexity") == pytest.approx(33.1)

"""The update-quality indicator γ (iEF paper, Eq. 15) against explicit Fisher matrices."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor, nn
from torch.func import functional_call

from ngd_dist.kfac.quality import QualityProbe, quality_indicator
from ngd_dist.service.environment import Environment
from ngd_dist.service.jobs import Job, load_job
from ngd_dist.service.metrics import MetricsExporter
from ngd_dist.service.models import gpt
from ngd_dist.service.trainer import Worker
from ngd_dist.testing.distributed import all_ranks, distributed_test, free_port, free_ports
from tests.support import ROOT, http_get


def _flat_model_fn(model: nn.Module, inputs: Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def logits(flat: Tensor) -> Tensor:
        parts = dict(
            zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)), strict=True)
        )
        return functional_call(model, parts, (inputs,))

    return logits


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model: nn.Module, vector: Tensor) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = vector[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return out


def brute_force(model: nn.Module, x: Tensor, y: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """The explicit Gauss-Newton matrix F (P x P) and gradient (P,) of the mean loss on (x, y)."""
    f = _flat_model_fn(model, x)
    theta = _flat(model)
    jac = torch.autograd.functional.jacobian(f, theta)  # (*logit shape, P)
    z = f(theta).detach()
    if kind == "mse":
        n = z.shape[0]
        rows = jac.reshape(n, -1, theta.numel())
        fisher = sum(j.T @ j for j in rows) / n
        loss = lambda t: 0.5 * (f(t) - y).square().reshape(n, -1).sum() / n  # noqa: E731
    else:
        classes = z.shape[-1]
        rows = jac.reshape(-1, classes, theta.numel())
        zf, yf = z.reshape(-1, classes), y.reshape(-1)
        keep = (yf != -100).nonzero().flatten().tolist()
        n = len(keep)
        fisher = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
        for i in keep:
            p = zf[i].softmax(-1)
            h = torch.diag(p) - torch.outer(p, p)
            fisher += rows[i].T @ h @ rows[i]
        fisher /= n
        loss = lambda t: F.cross_entropy(f(t).reshape(-1, classes), yf)  # noqa: E731
    grad = torch.autograd.functional.jacobian(loss, theta)
    return fisher, grad


def reference_gamma(fisher: Tensor, grad: Tensor, d: Tensor) -> float:
    return math.sqrt(float(d @ fisher @ d)) / abs(float(d @ grad))


@pytest.mark.parametrize("method", ["jvp", "double_backward"])
def test_gamma_matches_the_explicit_fisher_for_classification(method: str, tanh_mlp, classification_batch) -> None:
    model = tanh_mlp(4, 5, 3, seed=0, dtype=torch.float64)
    x, y = classification_batch(16, 4, 3, dtype=torch.float64)
    fisher, grad = brute_force(model, x, y, "classification")
    for trial in range(3):
        d = torch.randn_like(grad) if trial else -grad
        q = quality_indicator(model, x, y, _unflat(model, d), method=method)  # type: ignore[arg-type]
        assert q.gamma == pytest.approx(reference_gamma(fisher, grad, d), rel=1e-9)
        assert q.curvature == pytest.approx(float(d @ fisher @ d), rel=1e-9)
        assert q.slope == pytest.approx(float(d @ grad), rel=1e-9)
        assert q.loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-12)
        assert q.rows == 16


def test_gamma_matches_the_explicit_fisher_for_a_language_model() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Tanh(), nn.Linear(5, 7)).double()
    x, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    y[1, 2] = -100  # ignored, as F.cross_entropy ignores it
    fisher, grad = brute_force(model, x, y, "language_model")
    d = torch.randn_like(grad)
    q = quality_indicator(model, x, y, _unflat(model, d), loss="language_model")
    assert q.rows == 11
    assert q.gamma == pytest.approx(reference_gamma(fisher, grad, d), rel=1e-9)


def test_gamma_matches_the_explicit_gauss_newton_for_squared_error(tanh_mlp) -> None:
    model = tanh_mlp(4, 5, 2, seed=2, dtype=torch.float64)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    fisher, grad = brute_force(model, x, y, "mse")
    d = torch.randn_like(grad)
    q = quality_indicator(model, x, y, _unflat(model, d), loss="mse")
    assert q.gamma == pytest.approx(reference_gamma(fisher, grad, d), rel=1e-9)
    assert q.loss == pytest.approx(0.5 * float((model(x) - y).square().sum().detach()) / 10, rel=1e-12)


def test_gamma_is_invariant_to_the_scale_and_sign_of_the_direction(tanh_mlp, classification_batch) -> None:
    model = tanh_mlp(4, 5, 3, seed=3, dtype=torch.float64)
    x, y = classification_batch(8, 4, 3, dtype=torch.float64)
    d = [torch.randn_like(p) for p in model.parameters()]
    base = quality_indicator(model, x, y, d).gamma
    assert math.isfinite(base)
    assert base > 0
    for scale in (1e-6, -1.0, 3.0, 1e4):
        scaled = quality_indicator(model, x, y, [scale * t for t in d])
        assert scaled.gamma == pytest.approx(base, rel=1e-10)
    as_dict = quality_indicator(
        model, x, y, dict(zip([n for n, _ in model.named_parameters()], d, strict=True))
    )
    assert as_dict.gamma == base


def _ill_conditioned_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """Softmax regression on features whose scales span 4 orders of magnitude."""
    torch.manual_seed(4)
    scales = torch.logspace(2, -2, 12, dtype=torch.float64)
    x = torch.randn(96, 12, dtype=torch.float64) * scales
    y = torch.randint(0, 3, (96,))
    return nn.Linear(12, 3).double(), x, y


def test_natural_gradient_attains_the_lower_bound_and_beats_the_gradient() -> None:
    model, x, y = _ill_conditioned_problem()
    fisher, grad = brute_force(model, x, y, "classification")
    # gamma(d) >= (g' F+ g)^-1/2 for every d (Cauchy-Schwarz in the F inner product), with equality at
    # d = F+ g; a tiny damping gives F+ g here, since g has no part in F's null space (logit shifts).
    natural = torch.linalg.pinv(fisher, hermitian=True) @ grad
    bound = 1.0 / math.sqrt(float(grad @ natural))
    eye = torch.eye(len(grad), dtype=torch.float64)
    damped = torch.linalg.solve(fisher + 1e-12 * fisher.trace() * eye, grad)
    gamma_ng = quality_indicator(model, x, y, _unflat(model, natural)).gamma
    gamma_damped = quality_indicator(model, x, y, _unflat(model, damped)).gamma
    gamma_sgd = quality_indicator(model, x, y, _unflat(model, grad)).gamma
    assert gamma_ng == pytest.approx(bound, rel=1e-6)
    assert gamma_damped == pytest.approx(bound, rel=1e-3)
    assert gamma_sgd > 10 * gamma_ng  # 13.9 here
    torch.manual_seed(5)
    for _ in range(20):
        assert quality_indicator(model, x, y, _unflat(model, torch.randn_like(grad))).gamma >= bound * (
            1 - 1e-9
        )


def test_the_model_is_left_exactly_as_it_was() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3), nn.Dropout(0.2)
    )
    model.train()
    model[5].eval()  # a submodule deliberately in eval mode stays so
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    model[4].weight.grad = None  # one parameter without .grad
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    d = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    first = quality_indicator(model, x, y, d)
    second = quality_indicator(model, x, y, d, method="double_backward")
    assert first.gamma == pytest.approx(second.gamma, rel=1e-5)  # deterministic: dropout is off
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # parameters, running statistics, num_batches_tracked
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        assert p.grad is None or torch.equal(p.grad, grads[n]), n


def test_a_tiny_gpt_gives_the_same_gamma_in_forward_mode_and_double_backward() -> None:
    torch.manual_seed(7)
    model = gpt(vocab_size=11, block_size=8, d_model=16, n_layer=1, n_head=2).double()
    x, y = torch.randint(0, 11, (4, 8)), torch.randint(0, 11, (4, 8))
    d = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    a = quality_indicator(model, x, y, d, loss="language_model", method="jvp")
    b = quality_indicator(model, x, y, d, loss="language_model", method="double_backward")
    assert a.rows == 32
    assert math.isfinite(a.gamma)
    assert a.gamma > 0
    assert a.gamma == pytest.approx(b.gamma, rel=1e-9)


def test_parameters_given_explicitly_are_where_gamma_is_evaluated(tanh_mlp, classification_batch) -> None:
    model = tanh_mlp(4, 5, 3, seed=8, dtype=torch.float64)
    x, y = classification_batch(8, 4, 3, dtype=torch.float64)
    other = tanh_mlp(4, 5, 3, dtype=torch.float64)
    d = [torch.randn_like(p) for p in model.parameters()]
    at_other = quality_indicator(model, x, y, d, params=dict(other.named_parameters()))
    assert at_other.gamma == pytest.approx(quality_indicator(other, x, y, d).gamma, rel=1e-12)
    assert at_other.gamma != pytest.approx(quality_indicator(model, x, y, d).gamma, rel=1e-6)


def test_probe_measures_the_step_that_was_applied(tanh_mlp, classification_batch) -> None:
    """Plain SGD on the probe batch itself: the update is -lr * grad, so gamma is gamma(grad) at theta_before."""
    model = tanh_mlp(4, 5, 3, seed=9, dtype=torch.float64)
    data_x, data_y = classification_batch(100, 4, 3, dtype=torch.float64)
    rng = torch.get_rng_state()
    probe = QualityProbe.draw(model, data_x, data_y, size=16, seed=3, loss="classification")
    assert torch.equal(torch.get_rng_state(), rng)
    again = QualityProbe.draw(model, data_x, data_y, size=16, seed=3, loss="classification")
    assert torch.equal(probe.inputs, again.inputs)
    assert len(probe.inputs) == 16
    assert (
        len(QualityProbe.draw(model, data_x, data_y, size=500, seed=3, loss="classification").inputs) == 100
    )
    fisher, grad = brute_force(model, probe.inputs, probe.targets, "classification")
    before = probe.snapshot()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    F.cross_entropy(model(probe.inputs), probe.targets).backward()
    opt.step()
    q = probe.measure(before)
    assert probe.method == "jvp"
    assert q.gamma == pytest.approx(reference_gamma(fisher, grad, -grad), rel=1e-9)
    assert q.slope < 0


def test_bf16_weights_are_probed_in_float32(tanh_mlp, classification_batch) -> None:
    """DeepSpeed's bf16 weights: the probe widens weights and step to float32 (it failed on a dtype mismatch)."""
    model = tanh_mlp(6, 8, 3, seed=4)
    x, y = classification_batch(32, 6, 3)
    wide = QualityProbe.draw(model, x, y, size=32, seed=0, loss="classification")
    low = QualityProbe.draw(copy.deepcopy(model).to(torch.bfloat16), x, y, size=32, seed=0, loss="classification")
    steps = {n: 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    gamma = {}
    for name, probe in (("fp32", wide), ("bf16", low)):
        before = probe.snapshot()
        with torch.no_grad():
            for n, p in probe.model.named_parameters():
                p.add_(steps[n].to(p.dtype))
        gamma[name] = probe.measure(before).gamma
    assert math.isfinite(gamma["bf16"])
    assert gamma["bf16"] > 0
    # bf16 rounds the weights and their step (8 bits of mantissa): the same gamma to a few percent
    assert gamma["bf16"] == pytest.approx(gamma["fp32"], rel=0.1)
    assert all(p.dtype == torch.bfloat16 for p in low.model.parameters())


def test_bad_arguments_are_named(tanh_mlp, classification_batch) -> None:
    model = tanh_mlp(4, 5, 3, dtype=torch.float64)
    x, y = classification_batch(4, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not parameters"):
        quality_indicator(model, x, y, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"direction\['0.weight'\]: shape"):
        quality_indicator(model, x, y, {"0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="one per parameter"):
        quality_indicator(model, x, y, [torch.zeros(1)])
    with pytest.raises(ValueError, match="loss: got 'hinge'"):
        quality_indicator(model, x, y, [], loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets: 3 values for 4 rows"):
        quality_indicator(model, x, y[:3], {"0.bias": torch.ones(5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="size"):
        QualityProbe.draw(model, x, y, size=0, seed=0, loss="classification")
    zero = quality_indicator(model, x, y, {"0.bias": torch.zeros(5, dtype=torch.float64)})
    assert math.isnan(zero.gamma)


# -- the training worker -------------------------------------------------------------------------

GPT_SMALL = [
    "model.args={vocab_size: 32, block_size: 16, d_model: 32, n_layer: 1, n_head: 2, dropout: 0.0}",
    "data.args={n_sequences: 256, block_size: 16, vocab_size: 32, seed: 0}",
    "batch.per_rank=8",
    "schedule.warmup_steps=0",
    "preconditioner.factor_every=1",
    "preconditioner.inverse_every=2",
]


def _job(config: str, directory: Path, port: int, quality_every: int, *extra: str) -> Job:
    overrides = [
        "train.steps=6",
        f"metrics.quality_every={quality_every}",
        f"metrics.port={port}",
        f"checkpoint.dir={directory}",
        "checkpoint.every=0",
        "checkpoint.resume=never",
        *extra,
    ]
    return load_job(ROOT / "configs" / config, overrides)


def _train(job: Job, env: Environment) -> tuple[Worker, dict[tuple[str, str], float]]:
    """Run ``job`` in this process; scrape /metrics over HTTP just before the exporter closes."""
    texts: list[str] = []
    original = MetricsExporter.close

    def scrape_then_close(self: MetricsExporter) -> None:
        if self._server is not None:
            texts.append(http_get(self.url + "/metrics", timeout=10)[1])
        original(self)

    MetricsExporter.close = scrape_then_close  # type: ignore[method-assign]
    try:
        torch.manual_seed(job.seed + env.rank)
        worker = Worker(job, env)
        worker.run()
    finally:
        MetricsExporter.close = original  # type: ignore[method-assign]
    samples = {
        (s.name, s.labels.get("rank", "")): s.value
        for family in text_string_to_metric_families(texts[0])
        for s in family.samples
        if "phase" not in s.labels and "le" not in s.labels
    }
    return worker, samples


@pytest.mark.parametrize(
    ("config", "extra"), [("quickstart.yaml", []), ("gpt_lm.yaml", GPT_SMALL)], ids=["mlp", "gpt"]
)
def test_a_job_exports_gamma_without_changing_what_it_trains(
    config: str, extra: list[str], tmp_path: Path
) -> None:
    env = Environment(0, 1, 0, torch.device("cpu"), "single")
    off, off_metrics = _train(_job(config, tmp_path / "off", free_port(), 0, *extra), env)
    on, on_metrics = _train(_job(config, tmp_path / "on", free_port(), 2, *extra), env)
    gamma = on_metrics[("ngd_quality_gamma", "0")]
    assert math.isfinite(gamma)
    assert gamma > 0
    assert 0 < on_metrics[("ngd_quality_seconds", "0")] < 60
    assert on.parts.quality is not None
    assert on.parts.quality.method == "jvp"
    assert on.report.last_gamma == gamma
    assert len(on.parts.quality.inputs) == 32
    assert not any(name.startswith("ngd_quality") for name, _ in off_metrics)
    assert off.parts.quality is None
    for (name, p), q in zip(off.parts.base_model.named_parameters(), on.parts.base_model.parameters(), strict=True):
        assert torch.equal(p, q), name  # bit-identical: the probe changes nothing in training
    # world size 1: the job-wide rates are this rank's
    for kind in ("samples", "tokens"):
        assert on_metrics[(f"ngd_job_{kind}_per_second", "0")] == on_metrics[(f"ngd_{kind}_per_second", "0")]
    assert (on_metrics[("ngd_job_tokens_per_second", "0")] > 0) == (config == "gpt_lm.yaml")


@distributed_test(world_sizes=(2,), timeout=180)
def test_two_ranks_export_their_own_gamma_and_rank_0_the_job_throughput(
    rank: int, world_size: int, tmp_path: Path
) -> None:
    port = all_ranks(free_ports(world_size) if rank == 0 else 0)[0]  # one base port: rank r serves port + r
    env = Environment(rank, world_size, rank, torch.device("cpu"), "torchrun")
    _, samples = _train(_job("quickstart.yaml", tmp_path, port, 1, "train.steps=3"), env)
    gamma = samples[("ngd_quality_gamma", str(rank))]
    assert math.isfinite(gamma)
    assert gamma > 0
    assert len(set(all_ranks(gamma))) == world_size  # each rank its own probe batch
    if rank == 0:
        # both ranks' samples (256 each) over rank 0's step times
        job_rate, own_rate = samples[("ngd_job_samples_per_second", "0")], samples[("ngd_samples_per_second", "0")]
        assert job_rate == pytest.approx(2 * own_rate, rel=1e-12)
        assert job_rate > 0
        assert samples[("ngd_job_tokens_per_second", "0")] == 0
    else:
        assert not any(name.startswith("ngd_job_") for name, _ in samples)


@pytest.mark.parametrize("wrap", ["logits", "tuple"])
@pytest.mark.parametrize("method", ["jvp", "double_backward"])
def test_a_model_returning_an_output_object_is_measured_on_its_logits(
    wrap: str, method: str, tanh_mlp, classification_batch
) -> None:
    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            z = self.inner(x)
            return type("Out", (), {"logits": z})() if wrap == "logits" else (z, None)

    model = tanh_mlp(4, 5, 3, seed=0, dtype=torch.float64)
    x, y = classification_batch(16, 4, 3, dtype=torch.float64)
    wrapped = Wrapped(model)
    d = {f"inner.{n}": torch.randn_like(p) for n, p in model.named_parameters()}
    plain = quality_indicator(model, x, y, {n.removeprefix("inner."): t for n, t in d.items()}, method=method)
    got = quality_indicator(wrapped, x, y, d, method=method)  # type: ignore[arg-type]
    assert got.gamma == pytest.approx(plain.gamma, rel=1e-12)

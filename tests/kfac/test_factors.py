"""The A and G factors against their per-sample definitions, computed independently in float64.

The references never use the library: each layer's input rows (Linear rows, hand-sliced Conv2d
patches, Embedding one-hots) and output gradients are taken from a separate copy of the model, and
the output gradient of every loss row is found by its own ``autograd.grad`` of that row's loss.
Every reference first checks its own row layout: sum_rows g a^T must equal the autograd weight
gradient.

Conventions checked (see ``ngd_dist/kfac/curvature/modules.py``): A is the mean over rows of a a^T (a
vector of token frequencies for Embedding); G is (1/S) sum_n w_n sum_{rows k of n} g_nk g_nk^T with
S the layer's sample count (rows for Linear/Embedding, batch size for Conv2d), g_nk = dl_n/dout_k,
w_n = 1 (EF) or 1/max(||dl_n/dz_n||^2, ief_floor) (iEF); the sampled Fisher ("mc") is compared
with the exact expectation sum_c p_nc g_nk(c) g_nk(c)^T.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngd_dist import KFACConfig, KFACPreconditioner

# -- models ------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Three Linear layers; on (B, T, d) inputs every (b, t) is a sample."""

    def __init__(self, bias: bool = True, d_in: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 7, bias=bias)
        self.fc2 = nn.Linear(7, 6, bias=bias)
        self.head = nn.Linear(6, classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    """Conv2d with stride 2, padding and dilation (bias), then an asymmetric 'same' Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2, bias=True)
        self.conv2 = nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2), bias=False)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.flatten(1))


class EmbNet(nn.Module):
    """Embedding, then a Linear head on (B, T, d): one loss row per token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(idx)))


class OffsetNet(nn.Module):
    """Logits = head(...) + offset: the offset (an input) makes chosen samples arbitrarily confident."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc1(x))) + offset


@dataclass
class Case:
    model: nn.Module
    inputs: tuple[Tensor, ...]
    labels: Tensor
    names: tuple[str, ...]
    splits: tuple[int, ...]
    """Micro-batch sizes (along dim 0) for the gradient-accumulation test."""


def _sharpen(model: nn.Module, factor: float = 3.0) -> None:
    """Scale the head so predictions are confident and iEF weights vary a lot between samples."""
    with torch.no_grad():
        model.head.weight.mul_(factor)


def make_case(kind: str, batch: int | None = None, dtype: torch.dtype = torch.float64) -> Case:
    torch.manual_seed(1234)
    if kind in ("linear", "linear_nobias"):
        model = MLP(bias=kind == "linear")
        b = batch or 6
        inputs: tuple[Tensor, ...] = (torch.randn(b, 5),)
        labels = torch.randint(4, (b,))
        names, splits = ("fc1", "fc2", "head"), (2, 4)
    elif kind == "seq":
        model = MLP()
        b = batch or 3
        inputs = (torch.randn(b, 4, 5),)
        labels = torch.randint(4, (b, 4))
        names, splits = ("fc1", "fc2", "head"), (1, 2)
    elif kind == "conv":
        model = ConvNet()
        b = batch or 4
        inputs = (torch.randn(b, 2, 9, 9),)
        labels = torch.randint(3, (b,))
        names, splits = ("conv1", "conv2", "head"), (1, 3)
    elif kind == "emb":
        model = EmbNet()
        b = batch or 3
        # token 8 never occurs (its A entry must be 0), several tokens repeat
        inputs = (torch.tensor([[0, 1, 1, 2, 7], [3, 3, 3, 0, 5], [6, 1, 2, 4, 4]])[:b],)
        labels = torch.randint(3, (b, 5))
        names, splits = ("emb", "head"), (1, 2)
    else:
        raise AssertionError(kind)
    _sharpen(model)
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    return Case(model, inputs, labels, names, splits)


KINDS = ["linear", "linear_nobias", "seq", "conv", "emb"]

# -- independent float64 reference ------------------------------------------------------------


def _patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(B * positions, C_in * kh * kw) input patches, sliced by hand (no F.unfold)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    xp = F.pad(x, pads)
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(h_out):
        for j in range(w_out):
            window = xp[
                :, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw
            ]
            assert window.shape[2:] == (kh, kw)
            rows.append(window.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1).reshape(-1, rows[0].shape[1])


def _a_rows(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Embedding):
        return F.one_hot(x.reshape(-1), module.num_embeddings).double()
    a = _patches(module, x.double()) if isinstance(module, nn.Conv2d) else x.double().reshape(-1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    return a


def _out_rows(module: nn.Module, grad: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
    return grad.reshape(-1, grad.shape[-1])


def _weight_grad_matrix(module: nn.Module, grads: dict[str, Tensor]) -> Tensor:
    w = grads["weight"]
    if isinstance(module, nn.Embedding):
        return w.t()
    m = w.reshape(w.shape[0], -1)
    if module.bias is not None:
        m = torch.cat([m, grads["bias"].unsqueeze(1)], dim=1)
    return m


def _samples(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        return out.shape[0]
    return out.numel() // out.shape[-1]


def reference(case: Case, curvature: str, ief_floor: float = 1e-12) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (A, G)} from the per-sample definitions, in float64 on a copy of the model."""
    model = copy.deepcopy(case.model).double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in case.inputs)
    modules = dict(model.named_modules())
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        modules[n].register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
        for n in case.names
    ]
    logits = model(*inputs)
    for h in handles:
        h.remove()
    classes = logits.shape[-1]
    z = logits.reshape(-1, classes)
    y = case.labels.reshape(-1)
    losses = F.cross_entropy(z, y, reduction="none")
    outs = [seen[n][1] for n in case.names]
    a_rows = {n: _a_rows(modules[n], seen[n][0]) for n in case.names}

    # Self-check of the row layout: sum over rows of g a^T is the weight gradient.
    total_grads = torch.autograd.grad(losses.sum(), outs, retain_graph=True)
    for n, grad in zip(case.names, total_grads, strict=True):
        params = dict(modules[n].named_parameters())
        pgrads = torch.autograd.grad(losses.sum(), list(params.values()), retain_graph=True)
        expected = _weight_grad_matrix(modules[n], dict(zip(params, pgrads, strict=True)))
        torch.testing.assert_close(_out_rows(modules[n], grad).t() @ a_rows[n], expected)

    probs = torch.softmax(z.detach(), dim=-1)
    s = (probs - F.one_hot(y, classes).double()).square().sum(dim=-1)  # ||dl_n/dz_n||^2, closed form
    g_sum: dict[str, Tensor | float] = dict.fromkeys(case.names, 0.0)
    for r in range(z.shape[0]):
        if curvature == "mc":
            terms = []
            for c in range(classes):
                loss_c = F.cross_entropy(z[r : r + 1], torch.tensor([c]), reduction="sum")
                terms.append((probs[r, c], torch.autograd.grad(loss_c, outs, retain_graph=True)))
        else:
            weight = 1.0 if curvature == "ef" else 1.0 / max(float(s[r]), ief_floor)
            terms = [(weight, torch.autograd.grad(losses[r], outs, retain_graph=True))]
        for weight, grads in terms:
            for n, grad in zip(case.names, grads, strict=True):
                j = _out_rows(modules[n], grad)
                g_sum[n] += weight * (j.t() @ j)
    result: dict[str, tuple[Tensor, Tensor]] = {}
    for n, out in zip(case.names, outs, strict=True):
        a = a_rows[n]
        a_ref = a.mean(dim=0) if isinstance(modules[n], nn.Embedding) else a.t() @ a / a.shape[0]
        result[n] = (a_ref.detach(), (g_sum[n] / _samples(modules[n], out)).detach())
    return result


# -- running the library -----------------------------------------------------------------------


def run_kfac(
    case: Case,
    curvature: str,
    *,
    mark: str | None = "module",
    batches: list[tuple[tuple[Tensor, ...], Tensor]] | None = None,
    reduction: str = "mean",
    autocast: bool = False,
    **config: object,
) -> tuple[dict[str, tuple[Tensor, Tensor]], KFACPreconditioner]:
    """One step of the preconditioner (one or several forward/backward pairs); {layer: (A, G)}."""
    cfg = {"factor_dtype": "float64", "factor_every": 1, "inverse_every": 1, "statistics_rows": None, **config}
    pc = KFACPreconditioner(
        case.model,
        KFACConfig(
            curvature=curvature,  # type: ignore[arg-type]
            factor_decay=0.0,
            kl_clip=None,
            output_module="head" if mark == "module" else None,
            loss_reduction=reduction,  # type: ignore[arg-type]
            **cfg,  # type: ignore[arg-type]
        ),
        optimizer=None,
    )
    for inputs, labels in batches if batches is not None else [(case.inputs, case.labels)]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = case.model(*inputs)
            if mark == "call":
                pc.mark_output(logits)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction
            )
        loss.backward()
    pc.step()
    factors = {layer.name: (layer.a, layer.g) for layer in pc.layers}
    assert set(factors) == set(case.names)
    return factors, pc


def assert_factor(actual: Tensor | None, expected: Tensor, rtol: float | None = None, what: str = "") -> None:
    """Elementwise, relative to the largest entry; float64 factors are held to float64 accuracy."""
    assert actual is not None, what
    assert tuple(actual.shape) == tuple(expected.shape), what
    assert torch.isfinite(actual).all(), what
    if rtol is None:
        rtol = 1e-9 if actual.dtype == torch.float64 else 1e-6
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.norm(actual.double() - expected) / torch.linalg.norm(expected))


IEF_RTOL = 1e-6
"""iEF weights 1/s_n are computed from float32 logit gradients, whatever factor_dtype is."""


def assert_all(
    factors: dict[str, tuple[Tensor, Tensor]],
    ref: dict[str, tuple[Tensor, Tensor]],
    rtol: float | None = None,
    g_rtol: float | None = None,
) -> None:
    for name, (a_ref, g_ref) in ref.items():
        a, g = factors[name]
        assert_factor(a, a_ref, rtol, f"{name}.a")
        assert_factor(g, g_ref, g_rtol if g_rtol is not None else rtol, f"{name}.g")


def g_rtol(curvature: str) -> float | None:
    return IEF_RTOL if curvature == "ief" else None


# -- EF and iEF: exact ------------------------------------------------------------------------


@pytest.mark.parametrize("mark", ["module", "call"])
@pytest.mark.parametrize("curvature", ["ef", "ief"])
@pytest.mark.parametrize("kind", KINDS)
def test_ef_ief_factors_match_per_sample_definition(kind: str, curvature: str, mark: str) -> None:
    case = make_case(kind)
    ref = reference(case, curvature)
    factors, _ = run_kfac(case, curvature, mark=mark)
    assert_all(factors, ref, g_rtol=g_rtol(curvature))


def test_ief_weights_matter_on_these_cases() -> None:
    """The iEF weights matter here (so the iEF comparisons above could catch unweighted G)."""
    for kind in KINDS:
        case = make_case(kind)
        ef, ief = reference(case, "ef"), reference(case, "ief")
        for name in case.names:
            g_ef, g_ief = ef[name][1], ief[name][1]
            ratio = g_ief / torch.trace(g_ief) - g_ef / torch.trace(g_ef)
            assert float(ratio.abs().max()) > 1e-3, (kind, name)


@pytest.mark.parametrize("kind", KINDS)
def test_ef_without_marked_output_uses_layer_sample_count(kind: str) -> None:
    """No logits marked: per-sample units come from each layer's own sample count."""
    case = make_case(kind)
    factors, _ = run_kfac(case, "ef", mark=None)
    assert_all(factors, reference(case, "ef"))


@pytest.mark.parametrize("curvature", ["ef", "ief"])
@pytest.mark.parametrize("kind", ["linear", "seq", "conv", "emb"])
def test_sum_reduction(kind: str, curvature: str) -> None:
    """loss_reduction='sum' with a summed loss gives the same per-sample factors."""
    case = make_case(kind)
    factors, _ = run_kfac(case, curvature, mark="call", reduction="sum")
    assert_all(factors, reference(case, curvature), g_rtol=g_rtol(curvature))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_factors_do_not_depend_on_batch_size(kind: str) -> None:
    """Per-sample units: the same samples repeated give the same factors (mean loss)."""
    case = make_case(kind)
    doubled = [(tuple(torch.cat([x, x]) for x in case.inputs), torch.cat([case.labels, case.labels]))]
    for curvature in ("ef", "ief"):
        ref = reference(case, curvature)
        factors, _ = run_kfac(make_case(kind), curvature, batches=doubled)
        assert_all(factors, ref, g_rtol=g_rtol(curvature))


# -- gradient accumulation ------------------------------------------------------------------


@pytest.mark.parametrize("curvature", ["ef", "ief"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_accumulation_matches_concatenated_batch(kind: str, curvature: str) -> None:
    """Two unequal micro-batches (each with its own mean loss and mark) == one pass over both."""
    case = make_case(kind)
    ref = reference(case, curvature)
    one_pass, _ = run_kfac(make_case(kind), curvature, mark="call")
    micro = []
    start = 0
    for size in case.splits:
        micro.append((tuple(x[start : start + size] for x in case.inputs), case.labels[start : start + size]))
        start += size
    assert start == case.labels.shape[0]
    accumulated, _ = run_kfac(case, curvature, mark="call", batches=micro)
    assert_all(accumulated, ref, g_rtol=g_rtol(curvature))
    for name in case.names:
        for got, want in zip(accumulated[name], one_pass[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


# -- iEF floor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ief_floor", [1e-12, 1e-4])
def test_ief_floor_bounds_vanishing_logit_gradients(ief_floor: float) -> None:
    torch.manual_seed(7)
    model = OffsetNet().double()
    x = torch.randn(5, 5, dtype=torch.float64)
    y = torch.tensor([2, 0, 3, 1, 1])
    offset = torch.zeros(5, 4, dtype=torch.float64)
    offset[0, 2] = 1000.0  # softmax is exactly one-hot in float64: dl_0/dz_0 == 0, s_0 == 0
    offset[1, 0] = 9.0  # s_1 ~ 1e-7: between the two floors
    offset[2, 3] = 30.0  # s_2 ~ 1e-26: below both floors
    case = Case(model, (x, offset), y, ("fc1", "head"), (2, 3))
    with torch.no_grad():
        z = model(x, offset)
    s = (torch.softmax(z, -1) - F.one_hot(y, 4).double()).square().sum(-1)
    assert float(s[0]) == 0.0
    assert 0 < float(s[2]) < 1e-20
    assert 1e-9 < float(s[1]) < 1e-5

    # Sample 0 is a real sample whose gradient is exactly zero, not an ignored token: counted.
    factors, _ = run_kfac(case, "ief", mark="call", ief_floor=ief_floor, infer_ignored_rows=False)
    for a, g in factors.values():
        assert torch.isfinite(a).all()
        assert torch.isfinite(g).all()
    assert_all(factors, reference(case, "ief", ief_floor=ief_floor), g_rtol=IEF_RTOL)
    # The head's output gradient is the logit gradient, so each sample adds trace w_n s_n =
    # min(1, s_n / floor) <= 1: trace(G_head) is the mean of those, whatever the confidence.
    g_head = factors["head"][1].double()
    expected_trace = (s / s.clamp_min(ief_floor)).mean()
    assert float(torch.trace(g_head)) <= 1.0 + 1e-6
    torch.testing.assert_close(torch.trace(g_head), expected_trace, rtol=1e-6, atol=1e-9)


def test_ief_floor_applies_to_float32_model() -> None:
    """A float32 model whose confident sample has an exactly zero logit gradient stays finite."""
    torch.manual_seed(7)
    model = OffsetNet()
    x = torch.randn(4, 5)
    y = torch.tensor([1, 0, 3, 2])
    offset = torch.zeros(4, 4)
    offset[0, 1] = 200.0
    case = Case(model, (x, offset), y, ("fc1", "head"), (2, 2))
    factors, _ = run_kfac(case, "ief", mark="call", factor_dtype="float32", infer_ignored_rows=False)
    for a, g in factors.values():
        assert torch.isfinite(a).all()
        assert torch.isfinite(g).all()
    ref = reference(case, "ief")
    assert_all(factors, ref, rtol=1e-4)


# -- MC: in expectation, and exactly per draw -------------------------------------------------


def _repeat(case: Case, times: int) -> list[tuple[tuple[Tensor, ...], Tensor]]:
    reps = [1] * case.labels.dim()
    inputs = tuple(x.repeat(times, *([1] * (x.dim() - 1))) for x in case.inputs)
    return [(inputs, case.labels.repeat(times, *reps[1:]))]


@pytest.mark.parametrize("kind", KINDS)
def test_mc_matches_exact_fisher_in_expectation(kind: str) -> None:
    """A large batch (the same samples repeated) of label draws averages to the exact Fisher."""
    case = make_case(kind)
    with torch.no_grad():
        case.labels = case.model(*case.inputs).argmin(dim=-1)  # least likely: EF is far from Fisher
    fisher = reference(case, "mc")
    ef = reference(case, "ef")
    factors, _ = run_kfac(case, "mc", batches=_repeat(case, 2000))
    tol = 0.08
    for name in case.names:
        a, g = factors[name]
        assert_factor(a, fisher[name][0], what=f"{name}.a")  # A is exact
        assert torch.isfinite(g).all()
        err = rel_err(g, fisher[name][1])
        assert err < tol, (name, err)
        # the tolerance can tell the Fisher from the empirical Fisher of the real labels
        assert rel_err(ef[name][1], fisher[name][1]) > 3 * tol, name


def _mc_every_step() -> KFACConfig:
    """Sampled-Fisher statistics of every step, each one on its own (no running average)."""
    return KFACConfig(
        curvature="mc",
        factor_decay=0.0,
        kl_clip=None,
        output_module="head",
        factor_dtype="float64",
        factor_every=1,
        inverse_every=1,
    )


def test_mc_average_over_steps_converges_and_draws_change() -> None:
    case = make_case("linear")
    fisher = reference(case, "mc")
    pc = KFACPreconditioner(
        case.model,
        _mc_every_step(),
    )
    sums = {name: torch.zeros_like(fisher[name][1]) for name in case.names}
    previous = None
    changed = 0
    steps = 600
    for _ in range(steps):
        logits = case.model(*case.inputs)
        F.cross_entropy(logits, case.labels).backward()
        pc.step()
        case.model.zero_grad()
        for layer in pc.layers:
            sums[layer.name] += layer.g.double()
        g_head = next(layer.g for layer in pc.layers if layer.name == "head").clone()
        changed += previous is not None and not torch.equal(previous, g_head)
        previous = g_head
    assert changed > steps // 2  # the generator advances: new labels on most steps
    for name in case.names:
        err = rel_err(sums[name] / steps, fisher[name][1])
        assert err < 0.08, (name, err)


@pytest.mark.parametrize("kind", ["linear", "seq", "conv", "emb"])
def test_mc_single_sample_is_one_label_outer_product(kind: str) -> None:
    """With one loss row, each draw gives exactly sum_k g_k(c) g_k(c)^T for one class c (all layers)."""
    case = make_case(kind, batch=1)
    if kind in ("seq", "emb"):  # one token: keep a single position
        case.inputs = (case.inputs[0][:, :1],)
        case.labels = case.labels[:, :1]
    with torch.no_grad():
        classes = case.model(*case.inputs).shape[-1]
    per_class = []
    for c in range(classes):
        labelled = Case(case.model, case.inputs, torch.full_like(case.labels, c), case.names, case.splits)
        per_class.append(reference(labelled, "ef"))
    pc = KFACPreconditioner(
        case.model,
        _mc_every_step(),
    )
    drawn = set()
    for _ in range(12):
        logits = case.model(*case.inputs)
        F.cross_entropy(logits.reshape(-1, classes), case.labels.reshape(-1)).backward()
        pc.step()
        case.model.zero_grad()
        got = {layer.name: layer.g.double() for layer in pc.layers}
        matches = [
            c
            for c in range(classes)
            if all(torch.allclose(got[n], per_class[c][n][1], rtol=1e-5, atol=1e-7) for n in case.names)
        ]
        assert len(matches) >= 1, kind
        drawn.add(matches[0])
    assert len(drawn) >= 2  # not always the same label


def test_mc_labels_follow_seed() -> None:
    def g_of(seed: int) -> Tensor:
        case = make_case("linear", batch=16)
        factors, _ = run_kfac(case, "mc", seed=seed)
        return factors["head"][1]

    torch.testing.assert_close(g_of(3), g_of(3), rtol=0, atol=0)
    assert not torch.allclose(g_of(3), g_of(4))


# -- A without a materialised row layout, and row subsampling -----------------------------------

CONVS = [
    {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2, "bias": True},
    {"kernel_size": (2, 3), "padding": "same", "dilation": (1, 2), "bias": False},
    {"kernel_size": (3, 1), "stride": (1, 2), "padding": (2, 0), "bias": True},
    {"kernel_size": 3, "padding": 0, "bias": True},
    {"kernel_size": 1, "bias": False},
]


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("options", CONVS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_conv_a_statistic_matches_hand_sliced_patches(options: dict[str, object], diagonal: bool) -> None:
    """The conv A statistic (built from the input's own layout, the bias entry from sums) equals
    sum_rows [a, 1][a, 1]^T over hand-sliced patches, for padding / stride / dilation / bias."""
    from ngd_dist.kfac.curvature.modules import Conv2dMath

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **options).double()  # type: ignore[arg-type]
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    for batch in (x, x[0]):  # batched, and one unbatched sample
        rows = _a_rows(conv, batch if batch.dim() == 4 else batch.unsqueeze(0))
        got, count = Conv2dMath().a_statistic(conv, batch, torch.float64, diagonal=diagonal)
        assert count == rows.shape[0]
        assert_factor(got, rows.square().sum(dim=0) if diagonal else rows.t() @ rows, rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_a_statistic_matches_rows_with_a_ones_column(bias: bool) -> None:
    from ngd_dist.kfac.curvature.modules import LinearMath

    torch.manual_seed(0)
    linear = nn.Linear(5, 3, bias=bias).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)  # every (b, t) is a row
    rows = _a_rows(linear, x)
    got, count = LinearMath().a_statistic(linear, x, torch.float64)
    assert count == 24
    assert_factor(got, rows.t() @ rows, rtol=1e-12)


def test_a_statistic_builds_no_ones_column_and_no_unfold() -> None:
    """Neither the bias column nor F.unfold's transposed patches are materialised."""
    from unittest import mock

    from ngd_dist.kfac.curvature.modules import Conv2dMath, LinearMath

    conv, linear = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(5, 3)
    with (
        mock.patch("torch.cat", side_effect=AssertionError("torch.cat")),
        mock.patch("torch.nn.functional.unfold", side_effect=AssertionError("F.unfold")),
    ):
        Conv2dMath().a_statistic(conv, torch.randn(2, 3, 6, 6), torch.float32)
        LinearMath().a_statistic(linear, torch.randn(7, 5), torch.float32)


def assert_unbiased(estimates: list[Tensor], exact: Tensor) -> None:
    """The mean of independent estimates is as close to ``exact`` as unbiased ones' would be: within
    4 typical single errors / sqrt(count); and a single one is not exact (something was drawn)."""
    typical = sum(rel_err(e, exact) for e in estimates[:50]) / min(50, len(estimates))
    assert typical > 0.05
    mean_err = rel_err(sum(estimates) / len(estimates), exact)  # type: ignore[arg-type]
    assert mean_err < 4 * typical / len(estimates) ** 0.5, (typical, mean_err)


@pytest.mark.parametrize("kind", ["conv", "conv_nobias", "linear", "g"])
def test_row_sample_is_an_unbiased_estimate(kind: str) -> None:
    """Averaged over many draws, a statistic from `limit` drawn rows approaches the full one, at the
    rate of independent draws; the row count is every row's; a limit above the rows changes nothing."""
    from ngd_dist.kfac.curvature.modules import Conv2dMath, LinearMath, RowSample, gram, weighted_rows

    torch.manual_seed(0)
    limit, draws = 12, 3000
    if kind == "g":  # G rows (B, H, W, C) with per-sample weights, as the backward hook gives them
        rows = torch.randn(5, 4, 3, 6, dtype=torch.float64)
        weights = torch.rand(5, dtype=torch.float64)

        def stat(sample: RowSample | None) -> Tensor:
            return gram(weighted_rows(rows, weights, 0.5, torch.float64, sample), torch.float64)
    else:
        module: nn.Module
        if kind == "linear":
            module, math_, x = nn.Linear(4, 3).double(), LinearMath(), torch.randn(60, 4, dtype=torch.float64)
        else:
            module = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2, bias=kind == "conv").double()
            math_, x = Conv2dMath(), torch.randn(4, 2, 9, 9, dtype=torch.float64)
        exact, rows_in_x = math_.a_statistic(module, x, torch.float64)

        def stat(sample: RowSample | None) -> Tensor:
            if sample is None:
                return exact
            got, count = math_.sampled_a_statistic(module, x, torch.float64, sample)
            assert count == rows_in_x
            return got
    full = stat(None)
    torch.testing.assert_close(stat(RowSample(10**6, torch.Generator())), full, rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    assert_unbiased([stat(RowSample(limit, gen)) for _ in range(draws)], full.double())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_row_sample_gathers_the_drawn_patches(channels_last: bool) -> None:
    """A draw's statistic is exactly (rows / drawn) sum over the drawn hand-sliced patches, padding
    entries zero, whatever the input's memory layout."""
    from ngd_dist.kfac.curvature.modules import Conv2dMath, RowSample

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)).double()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    rows = _a_rows(conv, x)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    keep = RowSample(9, torch.Generator().manual_seed(5)).draw(rows.shape[0], x.device)
    assert keep is not None
    sample = RowSample(9, torch.Generator().manual_seed(5))  # the same draw
    got, count = Conv2dMath().sampled_a_statistic(conv, x, torch.float64, sample)
    picked = rows[keep]
    assert_factor(got, picked.t() @ picked * (count / 9), rtol=1e-12)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "100"])
def test_statistics_rows_must_be_a_positive_integer_or_none(value: object) -> None:
    with pytest.raises(ValueError, match=r"^KFACConfig\.statistics_rows: got .*; expected an integer >= 1"):
        KFACConfig(statistics_rows=value)  # type: ignore[arg-type]
    assert KFACConfig().statistics_rows == 1024
    assert KFACConfig(statistics_rows=None).statistics_rows is None


@pytest.mark.parametrize("curvature", ["ef", "ief"])
def test_statistics_rows_factors_are_unbiased_and_reproducible(curvature: str) -> None:
    """statistics_rows: each step's A and G estimate the exact ones without bias (their mean over
    steps converges to the per-sample reference), the same seed draws the same rows, and a limit
    above every layer's rows gives the exact factors."""
    case = make_case("conv")
    ref = reference(case, curvature)
    exact, _ = run_kfac(make_case("conv"), curvature, statistics_rows=1000)
    assert_all(exact, ref, g_rtol=g_rtol(curvature))

    def steps(seed: int, n: int) -> list[dict[str, tuple[Tensor, Tensor]]]:
        case = make_case("conv")
        pc = KFACPreconditioner(
            case.model,
            KFACConfig(
                curvature=curvature, factor_decay=0.0, kl_clip=None, output_module="head",  # type: ignore[arg-type]
                factor_dtype="float64", statistics_rows=10, seed=seed, factor_every=1, inverse_every=1,
            ),
        )
        out = []
        for _ in range(n):
            F.cross_entropy(case.model(*case.inputs), case.labels).backward()
            pc.step()
            case.model.zero_grad()
            out.append({la.name: (la.a.clone(), la.g.clone()) for la in pc.layers})
        return out

    runs = steps(0, 400)
    again, other = steps(0, 2), steps(1, 2)
    for name in ("conv1", "conv2"):
        for i in (0, 1):
            assert_unbiased([step[name][i] for step in runs], ref[name][i])
            assert torch.equal(again[1][name][i], runs[1][name][i])
            assert not torch.equal(again[1][name][i], runs[0][name][i])  # a new draw each step
            assert not torch.equal(other[0][name][i], runs[0][name][i])
    assert_all({"head": runs[0]["head"]}, {"head": ref["head"]}, g_rtol=g_rtol(curvature))  # 4 rows: exact


# -- bf16 autocast ------------------------------------------------------------------------------


@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("curvature", ["ef", "ief"])
@pytest.mark.parametrize("kind", ["linear", "seq", "conv", "emb"])
def test_bf16_autocast_factors_are_float32_and_close(kind: str, curvature: str, factor_dtype: str) -> None:
    """A float32 model under bf16 autocast: float32 factors within 2% of the float64 reference."""
    case = make_case(kind, dtype=torch.float32)
    ref = reference(case, curvature)
    factors, pc = run_kfac(case, curvature, autocast=True, factor_dtype=factor_dtype)
    assert pc.stats.nonfinite_rejected == 0
    for name in case.names:
        for what, got, want in (("a", factors[name][0], ref[name][0]), ("g", factors[name][1], ref[name][1])):
            assert got.dtype == torch.float32, (name, what)
            assert torch.isfinite(got).all(), (name, what)
            err = rel_err(got, want)
            assert err < 2e-2, (name, what, err)


def test_bf16_autocast_mc_close_to_exact_fisher() -> None:
    case = make_case("linear", dtype=torch.float32)
    fisher = reference(case, "mc")
    factors, _ = run_kfac(case, "mc", autocast=True, factor_dtype="float32", batches=_repeat(case, 1500))
    for name in case.names:
        a, g = factors[name]
        assert a.dtype == torch.float32
        assert g.dtype == torch.float32
        assert rel_err(a, fisher[name][0]) < 2e-2
        assert rel_err(g, fisher[name][1]) < 0.08, name


@pytest.mark.parametrize("debias", [True, False])
def test_running_factors_are_the_debiased_average_of_the_folds(debias: bool) -> None:
    """With factor_debias (the default) the running factor is sum_k d^(t-k) X_k / sum_k d^(t-k):
    the plain mean of the first folds rather than a first batch that dominates for 1/(1-d) folds;
    without it, X_1 then d X + (1-d) X_new."""
    from ngd_dist.kfac.layer import Factor

    decay = 0.9
    xs = [torch.full((2, 2), float(v), dtype=torch.float64) for v in (1.0, 5.0, 2.0, 7.0)]
    factor = Factor()
    for t, x in enumerate(xs, start=1):
        d = factor.next_decay(decay, debias)
        factor.fold_trace(float(x.trace()), d)
        factor.fold(x, d)
        weights = [decay ** (t - k) for k in range(1, t + 1)]
        if debias:
            want = sum(w * xk for w, xk in zip(weights, xs[:t], strict=True)) / sum(weights)
        else:
            want = xs[0].clone()
            for xk in xs[1:t]:
                want = decay * want + (1 - decay) * xk
        assert torch.allclose(factor.running, want, rtol=1e-12, atol=0)
        assert factor.trace == pytest.approx(float(want.trace()), rel=1e-12)
    assert factor.folds == len(xs)


def test_fold_counts_travel_with_the_checkpoint() -> None:
    from torch import nn

    from ngd_dist import KFACConfig, KFACPreconditioner

    def run(precond: KFACPreconditioner, model: nn.Module, seed: int) -> None:
        torch.manual_seed(seed)
        loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
        model.zero_grad()
        loss.backward()
        precond.step()

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))

    model, other = mlp(), mlp()
    precond = KFACPreconditioner(model, KFACConfig(output_module="2", kl_clip=None, factor_every=1, inverse_every=1))
    for seed in range(3):
        run(precond, model, seed)
    state = precond.state_dict()
    assert state["folds"] == {f"{n}/{f}": 3 for n in ("0", "2") for f in "ag"}
    other.load_state_dict(model.state_dict())
    fresh = KFACPreconditioner(other, KFACConfig(output_module="2", kl_clip=None, factor_every=1, inverse_every=1))
    fresh.load_state_dict(state)
    assert all(la.factors[f].folds == 3 for la in fresh.layers for f in "ag")
    run(precond, model, 3)
    run(fresh, other, 3)
    assert torch.equal(precond.layers[0].factors["a"].running, fresh.layers[0].factors["a"].running)


@pytest.mark.parametrize("padding", ["same", "valid", (1, 2), 2])
@pytest.mark.parametrize(("kernel", "dilation"), [((2, 3), (1, 2)), ((4, 1), (3, 1)), ((3, 3), (1, 1))])
def test_conv_pads_is_the_padding_the_convolution_applies(
    padding: object, kernel: tuple[int, int], dilation: tuple[int, int]
) -> None:
    """The statistics pad the input as nn.Conv2d does: padding by conv_pads, then no padding, is the same convolution."""
    from ngd_dist.kfac.curvature.modules import conv_pads

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, dilation=dilation, padding=padding)
    x = torch.randn(2, 2, 13, 8)
    padded = F.pad(x, conv_pads(conv))
    again = F.conv2d(padded, conv.weight, conv.bias, dilation=dilation)
    torch.testing.assert_close(again, conv(x))

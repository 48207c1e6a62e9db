"""Layers beyond Linear / Conv2d / Embedding, checked against brute-force float64 references.

Hugging Face's ``Conv1D``, normalisation layers (element-wise curvature), tied weights, inputs that
broadcast over the batch, ignored tokens (``ignore_index``), diagonal factors above
``max_factor_dim``, user-registered types, and (with the optional packages) GPT-2 and a ``peft``
LoRA model. The references take per-row gradients straight from autograd on a float64 copy.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac import LinearMath, register_layer_type, unregister_layer_type

EXACT = {
    "method": "eigen", "factor_dtype": "float64", "inverse_dtype": "float64", "factor_decay": 0.0, "kl_clip": None
}
DAMPING = 1e-2
IEF_RTOL = 1e-6
"""The iEF weights come from float32 logit-gradient norms, whatever the factor dtype."""


def _step(
    model: nn.Module, run: Callable[[nn.Module, KFACPreconditioner], Tensor], **config: object
) -> KFACPreconditioner:
    """One preconditioner step after ``run`` (forward, mark, loss) and backward."""
    pc = KFACPreconditioner(model, KFACConfig(**{**EXACT, "damping": DAMPING, **config}))  # type: ignore[arg-type]
    model.zero_grad()
    run(model, pc).backward()
    assert pc.step()
    return pc


def _dense_precondition(a: Tensor, g: Tensor, m: Tensor, damping: float = DAMPING) -> Tensor:
    """``(G (x) A + damping I)^-1 vec(M)`` densely (row-major vec), for full or diagonal factors."""
    a = torch.diag(a) if a.dim() == 1 else a
    g = torch.diag(g) if g.dim() == 1 else g
    k = torch.kron(g, a) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
    return torch.linalg.solve(k, m.double().reshape(-1)).reshape(m.shape)


class Rows:
    """Input and output rows of chosen modules of a float64 copy, and the output rows' gradients."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model = model
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}
        modules = dict(model.named_modules())
        for n in names:
            modules[n].register_forward_hook(lambda m, args, out, n=n: self._keep(n, args[0], out))

    def _keep(self, name: str, x: Tensor, out: Tensor) -> None:
        out.retain_grad()
        self.seen[name] = (x, out)

    def a(self, name: str, bias: bool = True) -> Tensor:
        x = self.seen[name][0]
        rows = x.reshape(-1, x.shape[-1]).double()
        return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1) if bias else rows

    def g(self, name: str) -> Tensor:
        out = self.seen[name][1]
        assert out.grad is not None
        return out.grad.reshape(-1, out.shape[-1]).double()


def _g_reference(g_rows: Tensor, valid: Tensor, weights: Tensor | None = None) -> Tensor:
    """``(1/R) sum_valid w_r (R g_r)(R g_r)^T`` with ``g_r`` rows of the mean loss's gradient."""
    r = int(valid.sum())
    scaled = g_rows * r
    w = valid.double() if weights is None else weights * valid.double()
    return (scaled * w.unsqueeze(1)).t() @ scaled / r


# -- Hugging Face's Conv1D ---------------------------------------------------------------------


class Conv1D(nn.Module):
    """GPT-2's linear layer as transformers writes it: weight (in, out), ``y = x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def _conv1d_classes() -> list[type[nn.Module]]:
    classes: list[type[nn.Module]] = [Conv1D]
    try:
        from transformers.pytorch_utils import Conv1D as HFConv1D
    except ImportError:
        return classes
    return [*classes, HFConv1D]


@pytest.mark.parametrize("conv1d", _conv1d_classes(), ids=lambda c: c.__module__.split(".")[0])
@pytest.mark.parametrize("curvature", ["ef", "ief", "mc"])
def test_conv1d_is_preconditioned_exactly_as_the_linear_it_transposes(
    conv1d: type[nn.Module], curvature: str
) -> None:
    torch.manual_seed(0)
    c1 = conv1d(5, 4)  # type: ignore[call-arg]
    with torch.no_grad():
        c1.weight.normal_(0, 0.3)
        c1.bias.normal_(0, 0.1)
    lin = nn.Linear(4, 5)
    with torch.no_grad():
        lin.weight.copy_(c1.weight.t())
        lin.bias.copy_(c1.bias)
    x, y = torch.randn(3, 6, 4), torch.randint(0, 5, (3, 6))
    pcs = []
    for layer in (c1, lin):
        model = nn.Sequential(layer).double()

        def loss(m: nn.Module, pc: KFACPreconditioner) -> Tensor:
            return F.cross_entropy(m(x.double()).reshape(-1, 5), y.reshape(-1))

        pcs.append(_step(model, loss, curvature=curvature, output_module="0"))
    (conv_layer,), (lin_layer,) = pcs[0].layers, pcs[1].layers
    assert conv_layer.kind == "Conv1D"
    assert lin_layer.kind == "Linear"
    torch.testing.assert_close(conv_layer.a, lin_layer.a)
    torch.testing.assert_close(conv_layer.g, lin_layer.g)
    torch.testing.assert_close(c1.weight.grad, lin.weight.grad.t())
    torch.testing.assert_close(c1.bias.grad, lin.bias.grad)


# -- normalisation layers ----------------------------------------------------------------------


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


NORMS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], Callable[[Tensor], Tensor], int]] = {
    # name: (module, input shape, x_hat by hand, number of leading dims that are rows)
    "layernorm": (lambda: nn.LayerNorm(4), (3, 5, 4), lambda x: (x - x.mean(-1, keepdim=True))
                  / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5), 2),
    "rmsnorm": (lambda: nn.RMSNorm(4, eps=1e-6), (3, 5, 4), lambda x: _rms(x, 1e-6), 2),
    "batchnorm": (lambda: nn.BatchNorm2d(4), (6, 4, 3, 3), lambda x: (x - x.mean((0, 2, 3), keepdim=True))
                  / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5), 1),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (6, 4, 3, 3), lambda x: (
        (x.reshape(6, 2, -1) - x.reshape(6, 2, -1).mean(-1, keepdim=True))
        / torch.sqrt(x.reshape(6, 2, -1).var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape(x.shape), 1),
}  # fmt: skip


class NormNet(nn.Module):
    """``norm`` then a linear head on the channel-last features: logits per row."""

    def __init__(self, norm: nn.Module, channel_first: bool) -> None:
        super().__init__()
        self.norm, self.channel_first = norm, channel_first
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        if self.channel_first:
            h = h.mean(dim=(2, 3))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize("curvature", ["ef", "ief"])
def test_norm_layers_get_the_diagonal_of_per_row_gradients(kind: str, curvature: str) -> None:
    make, shape, x_hat_of, lead = NORMS[kind]
    torch.manual_seed(1)
    norm = make()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.3)
    model = NormNet(norm, channel_first=len(shape) == 4).double()
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    y = torch.randint(0, 3, shape[:lead])

    def loss(m: nn.Module, pc: KFACPreconditioner | None = None) -> Tensor:
        return F.cross_entropy(m(x).reshape(-1, 3), y.reshape(-1))

    ref = copy.deepcopy(model)
    pc = _step(model, loss, curvature=curvature, output_module="head")
    layer = next(la for la in pc.layers if la.name == "norm")
    assert layer.a is not None
    assert layer.a.dim() == 1
    assert layer.g is not None

    # Reference: the norm written out by hand with one copy of scale and shift per row, so that
    # autograd gives each row's gradient; rows are samples (BatchNorm, GroupNorm) or tokens.
    rows = torch.Size(shape[:lead])
    has_bias = getattr(norm, "bias", None) is not None
    gamma_shape = (*rows, 4) if lead == 2 else (*rows, 4, 1, 1)
    gamma = ref.norm.weight.detach().reshape(-1, *([1] * (len(gamma_shape) - lead - 1))).expand(gamma_shape)
    gamma = gamma.clone().requires_grad_(True)
    beta = torch.zeros(gamma_shape, dtype=torch.float64)
    if has_bias:
        beta = ref.norm.bias.detach().reshape(gamma.shape[lead:]).expand(gamma_shape).clone()
    beta.requires_grad_(True)
    logits = ref.head(torch.tanh(
        (x_hat_of(x) * gamma + beta).mean(dim=(2, 3)) if lead == 1 else x_hat_of(x) * gamma + beta))  # fmt: skip
    logits.retain_grad()
    F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()
    parts = [gamma.grad.reshape(rows.numel(), -1)]
    if has_bias:
        parts.append(beta.grad.reshape(rows.numel(), -1))
    u = torch.cat(parts, dim=1) * rows.numel()  # per-row gradients of the per-row loss
    w = torch.ones(rows.numel(), dtype=torch.float64)
    if curvature == "ief":
        w = 1.0 / (logits.grad.reshape(rows.numel(), -1) * rows.numel()).square().sum(-1)
    expected = (u.square() * w.unsqueeze(1)).mean(dim=0)
    rtol = 1e-9 if curvature == "ef" else IEF_RTOL
    torch.testing.assert_close(layer.a, expected, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(layer.g, torch.ones(1, dtype=torch.float64))
    # Eigen form: each gradient entry divided by its curvature plus the damping.
    raw = u.sum(dim=0) / rows.numel()  # the mean loss's gradient of [weight | bias]
    got = torch.cat([norm_p.grad.reshape(-1) for norm_p in layer.math.params(layer.module)])
    torch.testing.assert_close(got, raw / (expected + DAMPING), rtol=rtol, atol=1e-12)


def test_norm_layers_can_be_left_to_the_optimizer() -> None:
    model = NormNet(nn.LayerNorm(4), channel_first=False)
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, layer_types=["Linear"]))
    assert [la.name for la in pc.layers] == ["head"]
    assert pc.skipped["norm"] == "type LayerNorm not in layer_types"


# -- tied weights, broadcast inputs, ignored tokens: a tiny language model ------------------------


class TinyLM(nn.Module):
    """Token and position embeddings, one hidden layer, a head tied to the token embedding."""

    def __init__(self, vocab: int = 7, dim: int = 4, positions: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(positions, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T), as transformers does
        h = self.wte(ids) + self.wpe(position_ids)
        h = h + torch.tanh(self.mix(h)).cumsum(dim=1) / 3  # rows mix along the sequence
        return self.lm_head(h)


def _lm_batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(0, 7, (3, 6))
    labels = torch.randint(0, 7, (3, 6))
    labels[0, 4:] = -100  # padding
    labels[2, 0] = -100
    return ids, labels


def _lm_loss(ids: Tensor, labels: Tensor, *, expand: bool = False, mask: str = "infer"):
    def run(m: nn.Module, pc: KFACPreconditioner | None) -> Tensor:
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1) if expand else None
        logits = m(ids, pos)
        if pc is not None and mask == "mark":
            pc.mark_output(logits, mask=labels != -100)
        if pc is not None and mask == "rows":
            pc.mask_rows(labels != -100)
        return F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)

    return run


def _lm_reference(
    model: TinyLM, ids: Tensor, labels: Tensor, curvature: str
) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (A, G)} by hand: ignored rows left out of G, the weights and the counts."""
    ref = copy.deepcopy(model).double()
    rows = Rows(ref, ["wpe", "mix", "lm_head"])
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = ref(ids, pos)
    F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100).backward()
    valid = labels.reshape(-1) != -100
    weights = None
    if curvature == "ief":
        z = rows.g("lm_head") * int(valid.sum())
        weights = 1.0 / z.square().sum(-1).clamp_min(1e-12)
    out = {}
    for name in ("mix", "lm_head"):
        a = rows.a(name, bias=name == "mix")
        out[name] = (a.t() @ a / a.shape[0], _g_reference(rows.g(name), valid, weights))
    counts = torch.bincount(pos.reshape(-1), minlength=6).double()
    out["wpe"] = (counts / counts.sum(), _g_reference(rows.g("wpe"), valid, weights))
    return out


@pytest.mark.parametrize("curvature", ["ef", "ief"])
@pytest.mark.parametrize("mask", ["infer", "mark", "rows"])
def test_ignored_tokens_and_broadcast_positions_match_the_per_row_reference(
    curvature: str, mask: str
) -> None:
    ids, labels = _lm_batch()
    torch.manual_seed(0)
    model = TinyLM().double()
    expected = _lm_reference(model, ids, labels, curvature)
    output = "lm_head" if mask != "mark" else None
    pc = _step(model, _lm_loss(ids, labels, mask=mask), curvature=curvature, output_module=output)
    got = {la.name: (la.a, la.g) for la in pc.layers}
    assert set(got) == {"wpe", "mix", "lm_head"}  # wte is tied to lm_head
    rtol = 1e-9 if curvature == "ef" else IEF_RTOL
    for name, (a, g) in expected.items():
        torch.testing.assert_close(got[name][0], a, rtol=1e-9, atol=1e-12, msg=f"{name} A")
        torch.testing.assert_close(got[name][1], g, rtol=rtol, atol=1e-12, msg=f"{name} G")


@pytest.mark.parametrize("curvature", ["ef", "ief", "mc"])
def test_position_ids_of_one_row_give_the_factors_of_per_sample_position_ids(curvature: str) -> None:
    ids, labels = _lm_batch()
    labels = ids.clone()  # nothing ignored: every curvature
    pcs = []
    for expand in (False, True):
        torch.manual_seed(0)
        model = TinyLM().double()
        pcs.append(
            _step(model, _lm_loss(ids, labels, expand=expand), curvature=curvature, output_module="lm_head")
        )
    for broadcast, per_sample in zip(pcs[0].layers, pcs[1].layers, strict=True):
        torch.testing.assert_close(broadcast.a, per_sample.a, msg=broadcast.name)
        torch.testing.assert_close(broadcast.g, per_sample.g, msg=broadcast.name)


def test_a_tied_weight_is_preconditioned_once_with_the_heads_factors() -> None:
    ids, labels = _lm_batch()
    torch.manual_seed(0)
    model = TinyLM().double()
    ref = copy.deepcopy(model)
    pc = _step(model, _lm_loss(ids, labels), curvature="ef", output_module="lm_head")
    head = next(la for la in pc.layers if la.name == "lm_head")
    assert head.tied == ("wte",)
    assert pc.skipped["wte"].startswith("tied to lm_head")
    assert sum(la.name in ("wte", "lm_head") for la in pc.layers) == 1
    # The shared weight's gradient (both uses summed) preconditioned with lm_head's A and G.
    _lm_loss(ids, labels)(ref, None).backward()
    expected = _dense_precondition(head.a, head.g, ref.lm_head.weight.grad)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-8, atol=1e-12)
    assert model.wte.weight.grad is model.lm_head.weight.grad


def test_the_kl_clip_counts_a_tied_weight_once() -> None:
    ids, labels = _lm_batch()
    torch.manual_seed(0)
    model = TinyLM().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pc = KFACPreconditioner(
        model, KFACConfig(**{**EXACT, "kl_clip": 1e-6, "output_module": "lm_head"}), optimizer=opt
    )
    _lm_loss(ids, labels)(model, pc).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert pc.step()
    # <P g, g> summed once per preconditioned parameter: wte.weight is lm_head.weight, counted once.
    lr_squared = 0.25
    vg = lr_squared * sum(
        float((raw[n] * p.grad / pc.stats.kl_scale).sum()) for n, p in model.named_parameters()
    )
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names
    assert "lm_head.weight" not in names
    assert pc.stats.kl_scale == pytest.approx(min(1.0, (1e-6 / vg) ** 0.5), rel=1e-6)


# -- diagonal factors above max_factor_dim, and types of your own ---------------------------------


def test_factors_above_max_factor_dim_are_kept_diagonal() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    grads, layers = [], []
    for limit in (100, 5):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5)).double()
        pc = _step(model, lambda m, pc: F.cross_entropy(m(x), y), curvature="ef", max_factor_dim=limit)
        layers.append(pc.layers[0])
        grads.append(torch.cat([model[0].weight.grad, model[0].bias.grad.unsqueeze(1)], 1))
    full, diag = layers
    assert (full.diagonal_a, full.diagonal_g) == (False, False)
    assert (diag.diagonal_a, diag.diagonal_g) == (True, False)  # A is 7 x 7 (bias column), G is 5 x 5
    torch.testing.assert_close(diag.a, full.a.diagonal())
    torch.testing.assert_close(diag.g, full.g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    F.cross_entropy(model(x), y).backward()
    raw = torch.cat([model[0].weight.grad, model[0].bias.grad.unsqueeze(1)], 1)
    torch.testing.assert_close(grads[1], _dense_precondition(diag.a, diag.g, raw), rtol=1e-8, atol=1e-12)


def test_a_registered_type_is_preconditioned_like_the_builtin_it_declares() -> None:
    class MyLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.bias = nn.Parameter(torch.randn(3))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.weight, self.bias)

    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    mine = MyLinear().double()
    lin = nn.Linear(4, 3).double()
    lin.load_state_dict(mine.state_dict())
    with pytest.raises(ValueError, match="type MyLinear has no K-FAC form"):
        KFACPreconditioner(nn.Sequential(mine), KFACConfig(kl_clip=None))
    register_layer_type("MyLinear", MyLinear, LinearMath())
    try:
        pcs = [
            _step(nn.Sequential(m), lambda mm, pc: F.cross_entropy(mm(x), y), curvature="ef")
            for m in (mine, lin)
        ]
    finally:
        unregister_layer_type("MyLinear")
    assert pcs[0].layers[0].kind == "MyLinear"
    torch.testing.assert_close(pcs[0].layers[0].a, pcs[1].layers[0].a)
    torch.testing.assert_close(mine.weight.grad, lin.weight.grad)
    with pytest.raises(ValueError, match=r"^KFACConfig\.layer_types: got 'MyLinear'"):
        KFACConfig(layer_types=["MyLinear"])


# -- Hugging Face GPT-2 and a peft LoRA model (optional packages) ---------------------------------


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def _gpt2_loss(ids: Tensor, labels: Tensor, *, explicit_positions: bool = False):
    def run(m: nn.Module, pc: KFACPreconditioner | None) -> Tensor:
        kwargs = (
            {"position_ids": torch.arange(ids.shape[1]).expand(ids.shape[0], -1)}
            if explicit_positions
            else {}
        )
        logits = m(input_ids=ids, **kwargs).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1), ignore_index=-100)

    return run


def test_gpt2_every_trainable_module_is_preconditioned_or_listed() -> None:
    model = _gpt2()
    pc = KFACPreconditioner(model, KFACConfig(method="eigen", kl_clip=None, output_module="lm_head"))
    kinds = {la.name: la.kind for la in pc.layers}
    assert sum(k == "Conv1D" for k in kinds.values()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert sum(k == "LayerNorm" for k in kinds.values()) == 5
    assert kinds["lm_head"] == "Linear"
    assert "transformer.wte" not in kinds
    assert pc.skipped == {"transformer.wte": pc.skipped["transformer.wte"]}
    assert pc.skipped["transformer.wte"].startswith("tied to lm_head")
    covered = {id(p) for la in pc.layers for p in la.math.params(la.module)}
    assert all(id(p) in covered for p in model.parameters())


@pytest.mark.parametrize("curvature", ["ef", "ief", "mc"])
def test_gpt2_as_transformers_calls_it_gets_the_factors_of_per_sample_positions(curvature: str) -> None:
    ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 5:] = -100
    factors = []
    for explicit in (False, True):
        model = _gpt2()
        pc = _step(model, _gpt2_loss(ids, labels, explicit_positions=explicit), curvature=curvature,
                   output_module="lm_head")  # fmt: skip
        factors.append({la.name: (la.a, la.g) for la in pc.layers})
    for name, (a, g) in factors[0].items():
        torch.testing.assert_close(a, factors[1][name][0], msg=name)
        torch.testing.assert_close(g, factors[1][name][1], msg=name)


def test_peft_lora_only_the_adapters_get_factors_and_their_step_is_exact() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("fc1", nn.Linear(6, 8))
    base.add_module("act", nn.Tanh())
    base.add_module("fc2", nn.Linear(8, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], lora_dropout=0.0))
    model = model.double()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.3)  # peft starts B at zero; any value tests the maths
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    names = [n for n, m in model.named_modules() if "lora_" in n and isinstance(m, nn.Linear)]
    ref = copy.deepcopy(model)
    rows = Rows(ref, names)
    F.cross_entropy(ref(x), y).backward()
    pc = _step(model, lambda m, pc: F.cross_entropy(m(x), y), curvature="ef")
    assert sorted(la.name for la in pc.layers) == sorted(names)
    assert all("frozen" in reason for reason in pc.skipped.values())
    modules = dict(model.named_modules())
    ref_modules = dict(ref.named_modules())
    for name in names:
        a, g = rows.a(name, bias=False), rows.g(name)
        a_ref, g_ref = a.t() @ a / a.shape[0], _g_reference(g, torch.ones(g.shape[0], dtype=torch.bool))
        layer = next(la for la in pc.layers if la.name == name)
        torch.testing.assert_close(layer.a, a_ref, msg=name)
        torch.testing.assert_close(layer.g, g_ref, msg=name)
        expected = _dense_precondition(a_ref, g_ref, ref_modules[name].weight.grad)
        torch.testing.assert_close(modules[name].weight.grad, expected, rtol=1e-8, atol=1e-12, msg=name)


# -- what the summary shows, and a job too large to start -----------------------------------------


def test_summary_lists_each_layer_shapes_ties_memory_coverage_and_what_is_left_out() -> None:
    model = TinyLM()
    model.extra = nn.Conv3d(1, 1, 1)
    pc = KFACPreconditioner(model, KFACConfig(method="eigen", kl_clip=None, output_module="lm_head", max_factor_dim=6))
    text = pc.summary()
    lines = text.splitlines()
    assert lines[0].startswith("K-FAC (ief, eigen): 3 layers preconditioned, ")
    trainable = sum(p.numel() for p in model.parameters())
    assert f"{(trainable - 2) / trainable:.1%} of trainable parameters" in lines[0]  # Conv3d's 2 left out
    assert pc.coverage == pytest.approx((trainable - 2) / trainable)
    assert "of factors" in lines[0]
    assert "of decompositions" in lines[0]
    row = next(line for line in lines if line.strip().startswith("lm_head"))
    assert "Linear" in row
    assert "A 4x4" in row
    assert "G diag 7" in row  # 7 > max_factor_dim
    assert "tied: wte" in row
    assert any(line.startswith("  left out: wte: tied to lm_head") for line in lines)
    assert any(line.startswith("  left out: extra: type Conv3d has no K-FAC form") for line in lines)
    # memory: A of wte... lm_head 4x4 and diag 7, mix 5x5 and 4x4, wpe diag 6 and 4x4; float32
    assert pc.memory.factors == 4 * (16 + 7 + 25 + 16 + 6 + 16)
    assert pc.memory.decompositions == 4 * ((16 + 4) + 7 + (25 + 5) + (16 + 4) + 6 + (16 + 4))


def test_factors_that_cannot_fit_are_refused_at_start_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import ngd_dist.kfac.preconditioner as module

    monkeypatch.setattr(module, "available_bytes", lambda device: 1000)
    with pytest.raises(
        ValueError, match=r"^KFACConfig\.max_factor_dim: the factors and decompositions need "
    ) as info:
        KFACPreconditioner(TinyLM(), KFACConfig(kl_clip=None))
    message = str(info.value)
    assert "\n" not in message
    assert "more than the 1000 B free on cpu" in message
    assert "lower max_factor_dim (now 4096" in message


# -- relative damping ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_relative_damping_is_the_absolute_damping_times_each_layers_mean_eigenvalue(method: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 6, dtype=torch.float64) * 3, torch.randint(0, 4, (16,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    relative = copy.deepcopy(model)

    def loss(m: nn.Module, pc: KFACPreconditioner) -> Tensor:
        return F.cross_entropy(m(x), y)

    pc = _step(relative, loss, curvature="ef", method=method, damping_scale="relative")
    for layer in pc.layers:
        mean = float(layer.a.trace() / layer.a_dim) * float(layer.g.trace() / layer.g_dim)
        assert pc._layer_damping(layer, DAMPING) == pytest.approx(DAMPING * mean, rel=1e-12)
    # The same step as absolute damping set, layer by layer, to damping x mean eigenvalue.
    means = {la.name: float(la.a.trace() / la.a_dim) * float(la.g.trace() / la.g_dim) for la in pc.layers}
    for name, mean in means.items():
        single = copy.deepcopy(model)
        _step(single, loss, curvature="ef", method=method, damping=DAMPING * mean, include=[f"^{name}$"])
        got, want = dict(relative.named_parameters()), dict(single.named_parameters())
        for p in (f"{name}.weight", f"{name}.bias"):
            torch.testing.assert_close(got[p].grad, want[p].grad, rtol=1e-9, atol=1e-12, msg=p)
    with pytest.raises(ValueError, match=r"^KFACConfig\.damping_scale: got 'per-layer'"):
        KFACConfig(damping_scale="per-layer")


def test_the_damped_reciprocal_is_kept_between_decompositions_and_follows_the_damping() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    model = nn.Sequential(nn.Linear(6, 4))
    schedule = [1e-2, 1e-2, 1e-1, 1e-1, 1e-1]
    pc = KFACPreconditioner(
        model, KFACConfig(method="eigen", kl_clip=None, curvature="ef", factor_every=1, inverse_every=4, refresh_warmup=False, damping=lambda step: schedule[step])
    )
    kept = []
    for _ in range(5):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = torch.cat([model[0].weight.grad, model[0].bias.grad.unsqueeze(1)], 1)
        pc.step()
        a, g = pc.layers[0].factors["a"].decomposition, pc.layers[0].factors["g"].decomposition
        kept.append(pc._reciprocals["0"][3])
        fresh = precondition_fresh(a, g, raw, pc.stats.damping)
        torch.testing.assert_close(torch.cat([model[0].weight.grad, model[0].bias.grad.unsqueeze(1)], 1), fresh)
    assert kept[1] is kept[0]  # same decomposition, same damping
    assert kept[2] is not kept[1]  # the damping changed
    assert kept[3] is kept[2]
    assert kept[4] is not kept[3]  # a new decomposition (inverse_every=4)


def precondition_fresh(a, g, m: Tensor, damping: float) -> Tensor:
    from ngd_dist.kfac.linalg import precondition

    return precondition(a, g, m, damping)


def test_a_registered_layer_whose_forward_never_runs_is_warned_about_and_shown() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # applies out_proj's weight itself
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.attn(x, x, x)[0].mean(dim=1))

    torch.manual_seed(0)
    model = Attention()
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ef"))
    assert "in_proj_weight" in pc.skipped["attn"]
    F.cross_entropy(model(torch.randn(5, 6, 4)), torch.randint(0, 3, (5,))).backward()
    with pytest.warns(RuntimeWarning, match=r"layers attn\.out_proj saw no statistics in the first step"):
        pc.step()
    assert pc.idle == {"attn.out_proj"}
    assert "(no statistics seen: its forward never ran)" in pc.summary()
    F.cross_entropy(model(torch.randn(5, 6, 4)), torch.randint(0, 3, (5,))).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc.step()  # once only

"""The exact iEF solver (Eq. 8) and its optimizer mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngd_dist import ExactIEF, exact_ief_direction, per_sample_gradients
from ngd_dist.kfac.exact_ief import damped_ief_direction


@pytest.fixture
def problem(tanh_mlp, classification_batch):
    """``problem(n)``: a seeded float64 two-layer tanh network and ``n`` classification samples."""

    def make(n: int = 10) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        model = tanh_mlp(5, 6, 3, seed=0, dtype=torch.float64)
        return model, *classification_batch(n, 5, 3, dtype=torch.float64)

    return make


def test_per_sample_gradients_and_logit_norms_match_a_loop(problem) -> None:
    model, x, y = problem()
    names = [n for n, _ in model.named_parameters()]
    jacobian, s, losses = per_sample_gradients(model, names, x, y)
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        row = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
        torch.testing.assert_close(jacobian[i], row)
        torch.testing.assert_close(losses[i], loss.detach())
    e = torch.softmax(model(x), dim=1).detach() - F.one_hot(y, 3).double()
    torch.testing.assert_close(s, e.square().sum(dim=1))


def test_eq8_update_changes_each_sample_loss_by_its_logit_gradient_norm(problem) -> None:
    """Eq. 7: with N <= P and lambda -> 0, J delta = s (each loss falls by eta * s_n)."""
    model, x, y = problem()
    names = [n for n, _ in model.named_parameters()]
    jacobian, s, _ = per_sample_gradients(model, names, x, y)
    delta = exact_ief_direction(jacobian, s, 1e-12)
    torch.testing.assert_close(jacobian @ delta, s, rtol=1e-6, atol=1e-9)


def test_damped_form_is_the_damped_ief_natural_gradient(problem) -> None:
    model, x, y = problem(n=30)
    names = [n for n, _ in model.named_parameters()]
    jacobian, s, _ = per_sample_gradients(model, names, x, y)
    damping = 1e-2
    f_ief = jacobian.t() @ torch.diag(1 / s) @ jacobian
    primal = torch.linalg.solve(f_ief + damping * torch.eye(f_ief.shape[0], dtype=f_ief.dtype), jacobian.sum(0))
    torch.testing.assert_close(damped_ief_direction(jacobian, s, damping), primal, rtol=1e-7, atol=1e-9)
    # ... and differs from Eq. 8 at the same damping: the two agree only as damping -> 0.
    assert not torch.allclose(exact_ief_direction(jacobian, s, damping), primal, rtol=1e-3)


def test_exact_ief_mode_trains_a_head(problem) -> None:
    model, x, y = problem(n=24)
    ief = ExactIEF(model, ["2.weight", "2.bias"], damping=1e-7)
    opt = torch.optim.SGD(ief.parameters(), lr=0.5)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        losses.append(float(ief.compute(x, y)))
        opt.step()
    assert model[0].weight.grad is None  # the other parameters are untouched
    assert losses[-1] < 0.7 * losses[0]


def test_exact_ief_rejects_unknown_parameters(problem) -> None:
    model, _, _ = problem()
    with pytest.raises(ValueError, match=r"ExactIEF.names: \['head.weight'\]"):
        ExactIEF(model, ["head.weight"])


# -- inputs, outputs and losses of other shapes ------------------------------------------------------


def _loop_reference(
    forward, samples: list[tuple[tuple, dict]], targets: torch.Tensor, params: list[nn.Parameter], loss_of
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """J, s and the losses by brute force: one forward and two autograd.grad calls per sample."""
    rows, s, losses = [], [], []
    for (args, kwargs), y in zip(samples, targets, strict=True):
        logits = forward(*args, **kwargs)
        loss = loss_of(logits[0], y)
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]))
        (dz,) = torch.autograd.grad(loss, logits)
        s.append(dz.square().sum())
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(s), torch.stack(losses)


def _token_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """One sample's summed cross-entropy over its tokens, token by token, skipping ``ignore_index``."""
    total = logits.new_zeros(())
    for t, label in enumerate(labels.tolist()):
        if label != ignore_index:
            total = total - torch.log_softmax(logits[t], dim=-1)[label]
    return total


class _TwoInputsTupleOut(nn.Module):
    """forward(x, scale) -> (logits, features): a tuple output, two positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x)) * scale.unsqueeze(-1)
        return self.head(h), h


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.loss = logits, None


class _KeywordsObjectOut(_TwoInputsTupleOut):
    """forward(x=..., scale=...) -> an object with ``.logits`` (as a Hugging Face ModelOutput)."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> _Output:  # type: ignore[override]
        return _Output(super().forward(x, scale)[0])


@pytest.mark.parametrize("form", ["tuple-in-tuple-out", "dict-in-object-out"])
def test_tuple_and_keyword_inputs_and_tuple_or_object_outputs(form: str) -> None:
    torch.manual_seed(0)
    model = (_TwoInputsTupleOut() if form == "tuple-in-tuple-out" else _KeywordsObjectOut()).double()
    x, scale = torch.randn(7, 5, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.5
    y = torch.randint(0, 3, (7,))
    inputs = (x, scale) if form == "tuple-in-tuple-out" else {"x": x, "scale": scale}
    names = ["body.weight", "head.weight", "head.bias"]
    jacobian, s, losses = per_sample_gradients(model, names, inputs, y)

    def forward(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = model(x, scale)
        return out[0] if isinstance(out, tuple) else out.logits

    samples = [((x[i : i + 1], scale[i : i + 1]), {}) for i in range(7)]
    params = [dict(model.named_parameters())[n] for n in names]
    want = _loop_reference(forward, samples, y, params, lambda z, t: F.cross_entropy(z, t))
    for got, ref in zip((jacobian, s, losses), want, strict=True):
        torch.testing.assert_close(got, ref)


def test_ignored_targets_contribute_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, -100, 2, 1, -100])
    jacobian, s, losses = per_sample_gradients(model, ["weight", "bias"], x, y)
    for i in (1, 4):
        assert float(losses[i]) == 0.0
        assert float(s[i]) == 0.0
        assert not jacobian[i].any()
    assert jacobian[[0, 2, 3]].abs().sum(dim=1).min() > 0
    custom, _, _ = per_sample_gradients(model, ["weight", "bias"], x, y.clamp(min=0), ignore_index=0)
    assert not custom[[0, 1, 4]].any()
    assert custom[[2, 3]].abs().sum(dim=1).min() > 0


def test_token_logits_sum_each_samples_token_losses() -> None:
    """(N, T, C) logits against (N, T) targets without transformers: an embedding and a head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Tanh(), nn.Linear(6, 11)).double()
    ids = torch.randint(0, 11, (4, 5))
    labels = torch.randint(0, 11, (4, 5))
    labels[0, 1] = labels[2, 0] = labels[2, 4] = -100
    names = ["0.weight", "2.weight", "2.bias"]
    jacobian, s, losses = per_sample_gradients(model, names, ids, labels)
    params = [dict(model.named_parameters())[n] for n in names]
    want = _loop_reference(model, [((ids[i : i + 1],), {}) for i in range(4)], labels, params, _token_ce)
    for got, ref in zip((jacobian, s, losses), want, strict=True):
        torch.testing.assert_close(got, ref)


class _DataDependent(nn.Module):
    """A forward with data-dependent control flow, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) if bool(x.sum() > -1e9) else -self.head(x)


def test_a_forward_vmap_cannot_batch_says_so_and_the_loop_takes_it() -> None:
    torch.manual_seed(0)
    model = _DataDependent().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match=r"vectorize=False"):
        per_sample_gradients(model, ["head.weight"], x, y)
    jacobian, s, losses = per_sample_gradients(model, ["head.weight"], x, y, vectorize=False)
    plain = nn.Linear(4, 3).double()
    plain.load_state_dict(model.head.state_dict())
    for got, ref in zip((jacobian, s, losses), per_sample_gradients(plain, ["weight"], x, y), strict=True):
        torch.testing.assert_close(got, ref)


def test_options_of_the_default_loss_do_not_combine_with_a_loss_fn(problem) -> None:
    model, _, _ = problem()
    with pytest.raises(ValueError, match="shift_labels"):
        ExactIEF(model, ["2.weight"], loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="none"), shift_labels=True)


# -- a Hugging Face causal LM ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    """``gpt2(attention)``: a tiny random GPT-2 LM (1 block, float64, no dropout, eval mode) and a batch:
    input_ids and an attention_mask with padding (N=4, T=6)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip

    def make(attention: str = "eager") -> tuple[nn.Module, dict[str, torch.Tensor]]:
        config._attn_implementation = attention
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).double().eval()
        ids = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[1, 4:] = mask[3, 3:] = 0  # right padding
        return model, {"input_ids": ids, "attention_mask": mask}

    return make


# lm_head.weight is tied to the token embeddings: its gradient is the shared tensor's
GPT2_NAMES = ["lm_head.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"]


def _gpt2_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(2))
    labels[batch["attention_mask"] == 0] = -100
    labels[0, 2] = labels[2, 0] = -100
    return labels


def _gpt2_reference(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor, shift: bool):
    samples = [((), {k: v[i : i + 1] for k, v in batch.items()}) for i in range(len(labels))]
    params = [dict(model.named_parameters(remove_duplicate=False))[n] for n in GPT2_NAMES]

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _token_ce(logits[:-1], y[1:]) if shift else _token_ce(logits, y)

    return _loop_reference(lambda **kw: model(**kw).logits, samples, labels, params, loss_of)


@pytest.mark.parametrize("shift_labels", [False, True], ids=["aligned-labels", "shifted-labels"])
def test_exact_ief_on_a_gpt2_matches_a_per_sample_loop(gpt2, shift_labels: bool) -> None:
    model, batch = gpt2()
    labels = batch["input_ids"].clone() if shift_labels else _gpt2_labels(batch)
    if shift_labels:  # the Hugging Face convention: labels are the inputs, padding -100
        labels[batch["attention_mask"] == 0] = -100
        labels[0, 3] = -100
    j_ref, s_ref, loss_ref = _gpt2_reference(model, batch, labels, shift_labels)
    assert (s_ref > 0).all()

    jacobian, s, losses = per_sample_gradients(model, GPT2_NAMES, batch, labels, shift_labels=shift_labels)
    torch.testing.assert_close(jacobian, j_ref)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(losses, loss_ref)

    ief = ExactIEF(model, GPT2_NAMES, damping=1e-6, shift_labels=shift_labels)
    loss = ief.compute(batch, labels)
    torch.testing.assert_close(loss, loss_ref.mean())
    got = torch.cat([p.grad.flatten() for p in ief.parameters()])
    torch.testing.assert_close(got, exact_ief_direction(j_ref, s_ref, 1e-6))
    assert model.transformer.h[0].attn.c_attn.weight.grad is None


def test_a_gpt2_with_sdpa_attention_and_padding_takes_the_loop(gpt2) -> None:
    """SDPA's mask code branches on the mask's values, which vmap cannot batch: ``vectorize=False``."""
    model, batch = gpt2("sdpa")
    labels = _gpt2_labels(batch)
    j_ref, s_ref, loss_ref = _gpt2_reference(model, batch, labels, shift=False)
    jacobian, s, losses = per_sample_gradients(model, GPT2_NAMES, batch, labels, vectorize=False)
    torch.testing.assert_close(jacobian, j_ref)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(losses, loss_ref)

"""The preconditioned gradient against dense references, and ieKFAC against the exact iEF update."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac.exact_ief import exact_ief_direction, per_sample_gradients


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 5),
        nn.Tanh(),
        nn.Linear(5, 4, bias=False),
    ).double()


def _dense_reference(layer, grad: torch.Tensor, method: str, damping: float) -> torch.Tensor:
    a = torch.diag(layer.a) if layer.a.dim() == 1 else layer.a
    g = layer.g
    if method == "eigen":
        k = torch.kron(g, a) + damping * torch.eye(g.shape[0] * a.shape[0], dtype=g.dtype)
    else:
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        ga = a + pi * math.sqrt(damping) * torch.eye(a.shape[0], dtype=a.dtype)
        gg = g + math.sqrt(damping) / pi * torch.eye(g.shape[0], dtype=g.dtype)
        k = torch.kron(gg, ga)
    return torch.linalg.solve(k, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("curvature", ["ef", "ief"])
def test_preconditioned_gradient_matches_dense_kronecker_solve(method: str, curvature: str) -> None:
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    damping = 0.05
    config = KFACConfig(
        curvature=curvature, method=method, damping=damping, kl_clip=None, output_module="5",
        factor_dtype="float64", inverse_dtype="float64", factor_decay=0.0,
    )
    pc = KFACPreconditioner(model, config)
    F.cross_entropy(model(x), y).backward()
    raw = {layer.name: layer.math.grad_matrix(layer.module).clone() for layer in pc.layers}
    pc.step()
    assert [layer.name for layer in pc.layers] == ["0", "3", "5"]
    for layer in pc.layers:
        expected = _dense_reference(layer, raw[layer.name], method, damping)
        torch.testing.assert_close(layer.math.grad_matrix(layer.module), expected, rtol=1e-8, atol=1e-10)


def test_embedding_gradient_matches_dense_solve_with_diagonal_a() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Linear(3, 5)).double()
    tokens, y = torch.randint(0, 6, (4, 5)), torch.randint(0, 5, (4, 5))
    config = KFACConfig(
        curvature="ef", method="eigen", damping=0.1, kl_clip=None, factor_dtype="float64", inverse_dtype="float64"
    )
    pc = KFACPreconditioner(model, config)
    F.cross_entropy(model(tokens).reshape(-1, 5), y.reshape(-1)).backward()
    raw = pc.layers[0].math.grad_matrix(pc.layers[0].module).clone()
    pc.step()
    layer = pc.layers[0]
    assert layer.a.shape == (7,)
    expected = _dense_reference(layer, raw, "eigen", 0.1)
    torch.testing.assert_close(layer.math.grad_matrix(layer.module), expected, rtol=1e-8, atol=1e-10)
    # Token 6 never occurs: its row gets gradient 0 in, and 0 out.
    assert torch.all(model[0].weight.grad[6] == 0)


def test_kl_clip_scales_all_layers_by_one_factor() -> None:
    torch.manual_seed(2)
    x, y = torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    grads = []
    for kl_clip in (None, 1e-6):
        torch.manual_seed(3)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        pc = KFACPreconditioner(model, KFACConfig(kl_clip=kl_clip, output_module="5"), optimizer=opt)
        F.cross_entropy(model(x), y).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        pc.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    vg = sum(0.5**2 * (p * g).sum() for p, g in zip(grads[0], raw, strict=True))
    nu = min(1.0, math.sqrt(1e-6 / float(vg)))
    assert nu < 1.0
    assert pc.stats.kl_scale == pytest.approx(nu, rel=1e-6)
    for unclipped, clipped in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(clipped, unclipped * nu)


def _kfac_direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, curvature: str, method: str) -> torch.Tensor:
    config = KFACConfig(
        curvature=curvature, method=method, damping=1e-6, kl_clip=None, factor_decay=0.0,
        output_module="2", factor_dtype="float64", inverse_dtype="float64",
    )
    pc = KFACPreconditioner(model, config)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pc.step()
    pc.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_iekfac_is_closer_to_exact_ief_than_ef_kfac(method: str, tanh_mlp, classification_batch) -> None:
    """Wu et al. (Fig. 5): ieKFAC approximates the exact iEF update better than EF-KFAC does.

    A two-layer tanh network (P = 92 parameters) partly fitted to N = 64 samples, so that the
    logit-gradient norms s_n spread over orders of magnitude; small damping; the reference is
    Eq. 8 (N <= P, where it equals the undamped iEF natural gradient).
    """
    iekfac, ekfac = [], []
    for seed in range(8):
        model = tanh_mlp(6, 8, 4, seed=seed, dtype=torch.float64)
        x, y = classification_batch(64, 6, 4, dtype=torch.float64)
        opt = torch.optim.Adam(model.parameters(), lr=0.03)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        names = [n for n, _ in model.named_parameters()]
        jacobian, s, _ = per_sample_gradients(model, names, x, y)
        assert s.max() / s.min() > 1e3
        exact = exact_ief_direction(jacobian, s, 1e-12)
        iekfac.append(F.cosine_similarity(_kfac_direction(model, x, y, "ief", method), exact, dim=0).item())
        ekfac.append(F.cosine_similarity(_kfac_direction(model, x, y, "ef", method), exact, dim=0).item())
    wins = sum(i > e for i, e in zip(iekfac, ekfac, strict=True))
    assert sum(iekfac) / 8 > sum(ekfac) / 8 + 0.02, (iekfac, ekfac)
    assert wins >= 6, (iekfac, ekfac)


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return x @ x.t() / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("g_diagonal", [False, True])
@pytest.mark.parametrize("a_diagonal", [False, True])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_precondition_blocks_match_a_dense_solve(method: str, a_diagonal: bool, g_diagonal: bool) -> None:
    """[dW | db] given as two blocks, never concatenated: the same as the dense Kronecker solve of the
    concatenated matrix, returned as blocks of the input's shapes."""
    from ngd_dist.kfac.linalg import decompose, inverse_shifts, precondition_blocks

    a, g = _spd(6, 0), _spd(4, 1)
    a, g = (torch.diag(a.diagonal()) if a_diagonal else a), (torch.diag(g.diagonal()) if g_diagonal else g)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    damping = 0.05
    shift_a, shift_g = inverse_shifts(float(a.trace()), 6, float(g.trace()), 4, damping)
    decs = []
    for x, diagonal, shift in ((a, a_diagonal, shift_a), (g, g_diagonal, shift_g)):
        d, _ = decompose(x.diagonal() if diagonal else x, method, shift, torch.float64)
        decs.append(d)
    got = precondition_blocks(decs[0], decs[1], [weight, bias], damping)
    eye = torch.eye(24, dtype=torch.float64)
    if method == "eigen":
        k = torch.kron(g, a) + damping * eye
    else:
        k = torch.kron(g + shift_g * torch.eye(4, dtype=g.dtype), a + shift_a * torch.eye(6, dtype=a.dtype))
    want = torch.linalg.solve(k, torch.cat([weight, bias], dim=1).reshape(-1)).reshape(4, 6)
    assert [tuple(b.shape) for b in got] == [(4, 5), (4, 1)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-10, atol=1e-12)


def test_preconditioning_concatenates_no_gradient_matrix() -> None:
    """A step reads [dW | db] as views of .grad and writes the blocks back: no torch.cat."""
    from unittest import mock

    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pc = KFACPreconditioner(model, KFACConfig(output_module="5", factor_dtype="float64"), optimizer=opt)
    F.cross_entropy(model(x), y).backward()
    pc.step()
    layer = pc.layers[0]
    blocks = layer.math.grad_blocks(layer.module)
    assert blocks is not None
    assert [b.data_ptr() for b in blocks] == [p.grad.data_ptr() for p in layer.math.params(layer.module)]
    F.cross_entropy(model(x), y).backward()
    with mock.patch("torch.cat", side_effect=AssertionError("torch.cat in preconditioning")):
        pc._precondition(1)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_an_owner_s_decomposition_is_laid_out_as_a_receiver_s(method: str) -> None:
    """With placement "communication" every rank preconditions with the owner's decomposition: the
    owner's own copy and the broadcast ones (unpacked from a flat buffer, contiguous) must have the
    same memory layout, or the matmuls take different BLAS paths and the ranks' updates differ in
    the last bits (eigh returns column-major eigenvectors)."""
    from ngd_dist.kfac.linalg import decompose

    x = torch.randn(7, 7, dtype=torch.float64)
    result, _ = decompose(x @ x.T + torch.eye(7, dtype=torch.float64), method, 0.1, torch.float32)
    assert result is not None
    assert all(t.is_contiguous() for t in result.tensors())


def test_kl_clip_reads_each_layers_learning_rate_now() -> None:
    """Each layer's lr comes from its own group, as it is at the step (a schedule changes it), and a
    group added later (add_param_group) is found."""
    torch.manual_seed(2)
    x, y = torch.randn(12, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    torch.manual_seed(3)
    model = _model()
    convs = [p for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    others = [p for p in model.parameters() if all(p is not q for q in convs)]
    opt = torch.optim.SGD([{"params": convs, "lr": 0.5}], lr=0.1)
    pc = KFACPreconditioner(
        model, KFACConfig(kl_clip=1e-6, factor_every=1, inverse_every=1, output_module="5"), optimizer=opt
    )

    def clip_scale(lrs: dict[int, float]) -> tuple[float, float]:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = {id(p): p.grad.clone() for p in model.parameters()}
        pc.step()
        scale = pc.stats.kl_scale
        # the unclipped update is the clipped one / scale: sum lr^2 <u, g> over the layers' parameters
        vg = sum(
            lrs.get(id(p), 0.0) ** 2 * (p.grad / scale * raw[id(p)]).sum()
            for la in pc.layers
            for p in la.math.params(la.module)
        )
        return scale, min(1.0, math.sqrt(1e-6 / float(vg)))

    scale, want = clip_scale({id(p): 0.5 for p in convs})  # the Linear layer's weight is in no group
    assert scale == pytest.approx(want, rel=1e-6)
    opt.param_groups[0]["lr"] = 0.05  # a schedule's change, read at the next step
    scale, want = clip_scale({id(p): 0.05 for p in convs})
    assert scale == pytest.approx(want, rel=1e-6)
    opt.add_param_group({"params": others, "lr": 0.2})
    scale, want = clip_scale({**{id(p): 0.05 for p in convs}, **{id(p): 0.2 for p in others}})
    assert scale == pytest.approx(want, rel=1e-6)

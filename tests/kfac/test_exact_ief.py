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

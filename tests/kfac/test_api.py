"""Registration, output marking, the sampled Fisher's extra backward, and accumulation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.grouped = nn.Conv2d(2, 2, 3, groups=2)
        self.norm = nn.LayerNorm(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = self.grouped(torch.relu(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.norm(h))


def test_registration_lists_what_is_left_to_the_optimizer() -> None:
    pc = KFACPreconditioner(Net(), KFACConfig(kl_clip=None))
    assert [layer.name for layer in pc.layers] == ["conv", "norm", "head"]
    assert "groups=2" in pc.skipped["grouped"]


def test_every_module_with_trainable_parameters_is_preconditioned_or_listed_with_a_reason() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.frozen = nn.Linear(2, 2).requires_grad_(False)
            self.conv3 = nn.Conv3d(1, 1, 1)

    model = nn.Sequential(Net(), Odd())
    model.cls = nn.Parameter(torch.zeros(2))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, layer_types=("Conv2d", "Linear")))
    assert [la.name for la in pc.layers] == ["0.conv", "0.head"]
    assert pc.skipped["0.norm"] == "type LayerNorm not in layer_types"
    assert "scale" in pc.skipped["1"]
    assert "type Odd has no K-FAC form" in pc.skipped["1"]
    assert "frozen" in pc.skipped["1.frozen"]
    assert "type Conv3d has no K-FAC form" in pc.skipped["1.conv3"]
    assert "cls" in pc.skipped["(model)"]
    named = {n for n, _ in model.named_modules()} | {"(model)"}
    owners = {la.name for la in pc.layers} | set(pc.skipped)
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            assert (name or "(model)") in owners, name
    assert owners <= named


def test_include_skip_and_types_select_layers() -> None:
    pc = KFACPreconditioner(Net(), KFACConfig(kl_clip=None, skip=("^conv$", "norm")))
    assert [layer.name for layer in pc.layers] == ["head"]
    assert pc.skipped["conv"] == "matches a skip pattern"
    pc = KFACPreconditioner(Net(), KFACConfig(kl_clip=None, layer_types=("Conv2d",)))
    assert [layer.name for layer in pc.layers] == ["conv"]
    assert pc.skipped["head"] == "type Linear not in layer_types"


def test_unregistered_parameters_keep_their_gradient() -> None:
    torch.manual_seed(0)
    model = Net()
    config = KFACConfig(kl_clip=None, curvature="ief", output_module="head", layer_types=["Conv2d", "Linear"])
    pc = KFACPreconditioner(model, config)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    pc.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.grad, before[name])
        assert changed == name.startswith(("conv.", "head.")), name


@pytest.mark.parametrize("curvature", ["ief", "mc"])
def test_unmarked_output_raises_a_clear_error(curvature: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature=curvature))
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    with pytest.raises(RuntimeError, match=r"call precond.mark_output\(logits\) after each forward pass"):
        pc.step()


def test_mark_output_after_backward_is_caught() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ief"))
    logits = model(torch.randn(5, 4))
    F.cross_entropy(logits, torch.randint(0, 3, (5,))).backward()
    pc.mark_output(logits)
    with pytest.raises(RuntimeError, match="mark_output"):
        pc.step()


def test_sampled_fisher_backward_leaves_the_real_gradient_alone(tanh_mlp, classification_batch) -> None:
    model = tanh_mlp(4, 8, 3, seed=0)
    x, y = classification_batch(16, 4, 3)
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="mc"))
    logits = model(x)
    pc.mark_output(logits)
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(logits, y).backward()
    for p, want in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, want)
    assert all(layer.pending_g.count == 16 for layer in pc.layers)


def test_statistics_are_not_captured_in_eval_mode_or_without_grad() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ef"))
    with torch.no_grad():
        model(torch.randn(5, 4))
    model.eval()
    model(torch.randn(5, 4))
    assert pc.layers[0].pending_a.count == 0
    model.train()
    model(torch.randn(5, 4))  # the same forward in training mode is captured
    assert pc.layers[0].pending_a.count == 5


def test_remove_detaches_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ef"))
    model(torch.randn(5, 4))
    assert pc.layers[0].pending_a.count == 5
    pc.remove()
    model(torch.randn(5, 4))
    assert pc.layers[0].pending_a.count == 5


def test_float16_statistics_do_not_overflow(tanh_mlp, classification_batch) -> None:
    """Large iEF weights meet small gradients in float32; long row sums are scaled before the product."""
    model = tanh_mlp(4, 8, 3, seed=0)
    pc = KFACPreconditioner(model, KFACConfig(curvature="ief", factor_dtype="float16", kl_clip=None, output_module="2"))
    x, y = classification_batch(16, 4, 3)
    with torch.no_grad():
        model[2].bias[y[0]] += 12.0  # sample 0 well fitted: s_0 ~ 1e-10, weight ~ 1e10
    F.cross_entropy(model(x), y).backward()
    pc.step()
    assert pc.stats.nonfinite_rejected == 0
    assert all(torch.isfinite(layer.g).all() for layer in pc.layers)

    layer = nn.Linear(3, 2)
    pc = KFACPreconditioner(layer, KFACConfig(curvature="ef", factor_dtype="float16", kl_clip=None))
    layer(torch.ones(70000, 3)).mean().backward()
    pc.step()
    torch.testing.assert_close(pc.layers[0].a, torch.ones(4, 4), rtol=2e-3, atol=0)


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_grad_norm_is_that_of_the_averaged_gradient_before_preconditioning(
    kl_clip, tanh_mlp, classification_batch
) -> None:
    model = tanh_mlp(5, 7, 3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, KFACConfig(curvature="ief", output_module="2", kl_clip=kl_clip), optimizer=opt)
    x, y = classification_batch(16, 5, 3)
    F.cross_entropy(model(x), y).backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert precond.grad_norm() is None
    precond.step()
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert precond.grad_norm() == pytest.approx(raw, rel=1e-6)
    assert after != pytest.approx(raw, rel=1e-3)  # the gradients were replaced, the norm is of the raw ones


def test_measurement_passes_add_nothing_to_the_statistics() -> None:
    """torch.func transforms (per-sample gradients) and statistics_paused() are never gathered."""
    from torch.func import functional_call, grad, vmap

    from ngd_dist.kfac.capture import statistics_paused

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    pc = KFACPreconditioner(model, KFACConfig(kl_clip=None, curvature="ef"))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(theta, xi, yi):
        return F.cross_entropy(functional_call(model, theta, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)  # per-sample gradients, training mode
    grad(sample_loss)(params, x[0], y[0])
    with statistics_paused():
        F.cross_entropy(model(x), y).backward()
    assert all(la.pending_a.count == 0 and la.pending_g.count == 0 for la in pc.layers)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # a training pass still counts
    assert [la.pending_a.count for la in pc.layers] == [16, 16]

"""Every bad KFACConfig field raises ValueError naming the field, the value and what is allowed."""

import pytest
import torch
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner

BAD = [
    ("curvature", "fisher", "one of ef, mc, ief"),
    ("curvature", None, "one of"),
    ("damping", 0.0, "finite number in (0.0"),
    ("damping", -1e-3, "finite number"),
    ("damping", float("nan"), "finite number"),
    ("damping", "1e-3", "finite number"),
    ("factor_decay", 1.0, "[0, 1)"),
    ("factor_decay", -0.1, "finite number in [0.0"),
    ("factor_every", 0, "integer >= 1"),
    ("factor_every", 2.5, "integer >= 1"),
    ("factor_every", True, "integer >= 1"),
    ("inverse_every", 0, "integer >= 1"),
    ("kl_clip", 0.0, "finite number"),
    ("kl_clip", float("inf"), "finite number"),
    ("method", "cholesky", "one of eigen, inverse"),
    ("factor_dtype", "int8", "one of float32"),
    ("factor_dtype", torch.int64, "one of float32"),
    ("inverse_dtype", "bf16", "one of float32, float64"),
    ("layer_types", ("Linear", "LayerNorm"), "names from Linear, Conv2d, Embedding"),
    ("layer_types", "Linear", "a list of strings"),
    ("include", ("[unclosed",), "valid regular expression"),
    ("skip", (3,), "a list of strings"),
    ("output_module", "", "a module name or None"),
    ("ief_floor", 0.0, "finite number in (0.0"),
    ("ief_floor", 2.0, "finite number in (0.0, 1.0]"),
    ("loss_reduction", "none", "one of mean, sum"),
    ("seed", -1, "integer >= 0"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_raises_value_error_naming_it(field, value, allowed) -> None:
    with pytest.raises(ValueError) as info:
        KFACConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"KFACConfig.{field}: got ")
    shown = [value] + (list(value) if isinstance(value, tuple) else [])  # the bad element may be named
    assert any(repr(v) in message for v in shown)
    assert allowed in message


def test_inverse_every_must_be_a_multiple_of_factor_every() -> None:
    with pytest.raises(ValueError, match=r"KFACConfig.inverse_every: got 15; expected a multiple of factor_every=10"):
        KFACConfig(factor_every=10, inverse_every=15)


def test_damping_schedule_is_checked_when_used() -> None:
    config = KFACConfig(damping=lambda step: 1e-2 / (step + 1))
    assert config.damping_at(9) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"KFACConfig.damping: the schedule returned -1.0 at step 3"):
        KFACConfig(damping=lambda step: -1.0).damping_at(3)


def test_dtype_names_are_normalised() -> None:
    config = KFACConfig(factor_dtype="bf16", inverse_dtype="float64")
    assert config.factor_dtype is torch.bfloat16
    assert config.inverse_dtype is torch.float64


def test_preconditioner_level_errors_name_the_field() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"KFACConfig.kl_clip: .* pass optimizer="):
        KFACPreconditioner(model, KFACConfig())
    with pytest.raises(ValueError, match=r"KFACConfig.output_module: got 'head'"):
        KFACPreconditioner(model, KFACConfig(kl_clip=None, output_module="head"))
    with pytest.raises(ValueError, match=r"no module of the model can be preconditioned"):
        KFACPreconditioner(model, KFACConfig(kl_clip=None, skip=("0",)))

"""Every bad KFACConfig field raises ValueError naming the field, the value and what is allowed."""

import typing

import pytest
import torch
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac.config import Assignment, Curvature, LossReduction, Method, Placement, Refresh, Transport

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
    ("max_failed_decompositions", 0, "integer >= 1"),
    ("max_failed_decompositions", 2.0, "integer >= 1"),
    ("layer_types", ("Linear", "Conv3d"), "names from Conv1D, Linear, Conv2d, Embedding, LayerNorm"),
    ("max_factor_dim", 0, "integer >= 1"),
    ("infer_ignored_rows", "yes", "true or false"),
    ("layer_types", "Linear", "a list of strings"),
    ("include", ("[unclosed",), "valid regular expression"),
    ("skip", (3,), "a list of strings"),
    ("output_module", "", "a module name or None"),
    ("ief_floor", 0.0, "finite number in (0.0"),
    ("ief_floor", 2.0, "finite number in (0.0, 1.0]"),
    ("loss_reduction", "none", "one of mean, sum"),
    ("seed", -1, "integer >= 0"),
    ("refresh", "sometimes", "one of fixed, adaptive"),
    ("assignment", "random", "one of round_robin, greedy"),
    ("placement", "disk", "one of memory, communication, hybrid"),
    ("transport", "nccl", "one of torch, mpi"),
    ("method", 3, "one of eigen, inverse"),
    ("comm_dtype", "float16", "one of float32, bfloat16"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_raises_value_error_naming_it(field, value, allowed) -> None:
    with pytest.raises(ValueError, match=rf"^KFACConfig\.{field}: got ") as info:
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
    config = KFACConfig(factor_dtype="bf16", inverse_dtype="float64", comm_dtype="bfloat16")
    assert config.factor_dtype is torch.bfloat16
    assert config.inverse_dtype is torch.float64
    assert config.comm_dtype is torch.bfloat16
    hints = typing.get_type_hints(KFACConfig)
    assert [hints[name] for name in ("factor_dtype", "inverse_dtype", "comm_dtype")] == [torch.dtype] * 3


def test_lists_become_tuples() -> None:
    config = KFACConfig(layer_types=["Linear"], include=["fc"], skip=["head"])
    assert (config.layer_types, config.include, config.skip) == (("Linear",), ("fc",), ("head",))
    assert all(type(v) is tuple for v in (config.layer_types, config.include, config.skip))


def test_string_options_become_enum_members_equal_to_their_names() -> None:
    config = KFACConfig(
        curvature="mc",
        method="inverse",
        loss_reduction="sum",
        refresh="adaptive",
        assignment="greedy",
        placement="hybrid",
        transport="mpi",
    )
    members = {
        "curvature": Curvature.MC,
        "method": Method.INVERSE,
        "loss_reduction": LossReduction.SUM,
        "refresh": Refresh.ADAPTIVE,
        "assignment": Assignment.GREEDY,
        "placement": Placement.HYBRID,
        "transport": Transport.MPI,
    }
    assert {name: getattr(config, name) for name in members} == members
    assert all(getattr(config, name) is member for name, member in members.items())  # members, not strings
    assert config.curvature == "mc"
    assert (str(config.curvature), f"{config.method}", repr(config.placement)) == ("mc", "inverse", "'hybrid'")
    assert "curvature='mc'" in repr(config)
    assert KFACConfig(curvature=Curvature.EF) == KFACConfig(curvature="ef")
    assert Curvature.choices() == ("ef", "mc", "ief")


@pytest.mark.parametrize(
    ("curvature", "needs_logits", "samples_labels", "weights_samples"),
    [("ef", False, False, False), ("mc", True, True, False), ("ief", True, False, True)],
)
def test_what_each_curvature_needs(curvature, needs_logits, samples_labels, weights_samples) -> None:
    member = KFACConfig(curvature=curvature).curvature
    assert (member.needs_logits, member.samples_labels, member.weights_samples) == (
        needs_logits,
        samples_labels,
        weights_samples,
    )


def test_preconditioner_level_errors_name_the_field() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"KFACConfig.kl_clip: .* pass optimizer="):
        KFACPreconditioner(model, KFACConfig())
    with pytest.raises(ValueError, match=r"KFACConfig.output_module: got 'head'"):
        KFACPreconditioner(model, KFACConfig(kl_clip=None, output_module="head"))
    with pytest.raises(ValueError, match=r"no module of the model can be preconditioned"):
        KFACPreconditioner(model, KFACConfig(kl_clip=None, skip=("0",)))

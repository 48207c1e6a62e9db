"""Which module types the preconditioner knows, by name, and how to add one of your own.

Each type has a name (what ``KFACConfig.layer_types`` lists), a test that recognises its modules
and the :class:`~ngd_dist.kfac.curvature.modules.ModuleMath` that computes its statistics. Types
registered with :func:`register_layer_type` are tried before the built-in ones, in the order
registered, so a user's type can take over a subclass of a built-in one.

Built-in types, tried in this order:

- ``Conv1D``: Hugging Face's GPT-2-style linear layer with an ``(in, out)`` weight, matched by class
  name (``transformers`` is never imported);
- ``Linear``, ``Conv2d`` (``groups=1``), ``Embedding`` (dense): Kronecker-factored;
- ``LayerNorm``, ``RMSNorm`` (``nn.RMSNorm`` and classes named ``*RMSNorm``), ``BatchNorm``
  (1d/2d/3d), ``GroupNorm``: element-wise curvature of their scale and shift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ngd_dist.kfac.curvature.modules import (
    Conv2dMath,
    EmbeddingMath,
    LinearMath,
    ModuleMath,
    TransposedLinearMath,
)
from ngd_dist.kfac.curvature.norms import BatchNormMath, GroupNormMath, LayerNormMath, RMSNormMath

Matcher = Callable[[nn.Module], bool]


@dataclass(frozen=True)
class LayerType:
    """A named module type the preconditioner can handle."""

    name: str
    matches: Matcher
    math: ModuleMath


def _class_named(*names: str) -> Matcher:
    def matches(module: nn.Module) -> bool:
        return any(cls.__name__ in names for cls in type(module).__mro__)

    return matches


def _is_hf_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        _class_named("Conv1D")(module)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and isinstance(getattr(module, "bias", None), Tensor)
    )


def _is_rms_norm(module: nn.Module) -> bool:
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    weight = getattr(module, "weight", None)
    named = any(cls.__name__.endswith("RMSNorm") for cls in type(module).__mro__)
    return named and isinstance(weight, Tensor) and weight.dim() >= 1


def _instance_of(cls: type[nn.Module] | tuple[type[nn.Module], ...]) -> Matcher:
    return lambda module: isinstance(module, cls)


_BUILTIN: tuple[LayerType, ...] = (
    LayerType("Conv1D", _is_hf_conv1d, TransposedLinearMath()),
    LayerType("Linear", _instance_of(nn.Linear), LinearMath()),
    LayerType("Conv2d", _instance_of(nn.Conv2d), Conv2dMath()),
    LayerType("Embedding", _instance_of(nn.Embedding), EmbeddingMath()),
    LayerType("LayerNorm", _instance_of(nn.LayerNorm), LayerNormMath()),
    LayerType("RMSNorm", _is_rms_norm, RMSNormMath()),
    LayerType("BatchNorm", _instance_of(nn.modules.batchnorm._BatchNorm), BatchNormMath()),
    LayerType("GroupNorm", _instance_of(nn.GroupNorm), GroupNormMath()),
)
_USER: list[LayerType] = []

BUILTIN_TYPES: tuple[str, ...] = tuple(t.name for t in _BUILTIN)
"""The names of the built-in types, in the order they are tried."""


def register_layer_type(name: str, match: type[nn.Module] | Matcher, math: ModuleMath) -> None:
    """Precondition modules of your own type: ``match`` is a module class (instances and subclasses
    match) or a predicate; ``math`` computes their statistics (subclass
    :class:`~ngd_dist.kfac.curvature.modules.LinearMath` for a linear map, or
    :class:`~ngd_dist.kfac.curvature.modules.ModuleMath`).

    Registering a name again replaces that type. A ``KFACConfig`` built afterwards includes the
    type in its default ``layer_types``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_layer_type: name {name!r}; expected an identifier such as 'MyLinear'")
    if not isinstance(math, ModuleMath):
        got = type(math).__name__
        raise TypeError(f"register_layer_type: math is a {got}; expected a ModuleMath instance")
    matcher: Matcher = _instance_of(match) if isinstance(match, type) else match
    if not callable(matcher):
        raise TypeError(f"register_layer_type: match {match!r}; expected an nn.Module class or a predicate")
    unregister_layer_type(name)
    _USER.append(LayerType(name, matcher, math))


def unregister_layer_type(name: str) -> None:
    """Forget a type registered with :func:`register_layer_type` (built-in types stay)."""
    _USER[:] = [t for t in _USER if t.name != name]


def layer_types() -> tuple[LayerType, ...]:
    """Every known type, in the order they are tried: the registered ones, then the built-in ones."""
    return (*_USER, *_BUILTIN)


def layer_type_names() -> tuple[str, ...]:
    """The names of every known type (what ``KFACConfig.layer_types`` accepts)."""
    seen: dict[str, None] = {}
    for t in layer_types():
        seen.setdefault(t.name, None)
    return tuple(seen)


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The first known type that ``module`` matches, or None."""
    for t in layer_types():
        if t.matches(module):
            return t
    return None


def unsupported_reason(module: nn.Module, kind: LayerType) -> str | None:
    """Why a module of a known type still cannot be preconditioned, or None if it can."""
    reason = kind.math.unsupported(module)
    if reason is not None:
        return reason
    params = kind.math.params(module)
    if not params or not params[0].requires_grad:
        return "the weight is frozen (requires_grad=False)"
    return None

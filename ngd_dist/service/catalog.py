"""Models and datasets by name: the built-ins, or the user's own as ``package.module:factory``.

A job names them as ``model: {name: resnet18, args: {...}}`` and ``data: {name: synthetic_images,
args: {...}}``; :func:`build_model` turns that into an ``nn.Module`` and :func:`build_data` into
the ``torch.utils.data.Dataset`` the job trains on. Every problem with a name or its
arguments raises ``ValueError`` naming the job field (``model.name``, ``data.args.block_size``, ...).

The Hugging Face models (``hf_causal_lm``, ``hf_sequence_classification``,
:mod:`ngd_dist.service.models`) need the ``hf`` extra (``transformers``); without it they are
refused in one line naming ``model.name``. Of the built-in data, ``image_folder`` needs the
``images`` extra (Pillow) and ``hf_files`` (Hugging Face ``datasets`` from local files,
:mod:`ngd_dist.service.data.hf_files`) the ``datasets`` extra (:func:`missing_data_extra`).

User factories
--------------
``name: "my_pkg.my_module:make_model"`` imports ``my_pkg.my_module`` (after putting any
``import_paths`` at the front of ``sys.path``) and calls ``make_model(**args)``. The attribute
after the colon may be dotted (``module:Class.build``).

- A model factory returns an ``nn.Module``. It may set two plain attributes on that module, read
  by :func:`output_module_of` and :func:`task_of`:

  - ``ngd_output_module: str``: the qualified name of the submodule whose output are the logits
    (what ``KFACConfig.output_module`` wants); without it the logits must be marked by hand
    (``precond.mark_output``) for the "mc" and "ief" curvatures;
  - ``ngd_task: "classification" | "language_model"`` (default ``"classification"``):
    classification maps a batch ``(B, ...)`` to logits ``(B, classes)`` against int64 labels
    ``(B,)``; a language model maps token ids ``(B, T)`` to logits ``(B, T, vocab)`` against
    next-token targets ``(B, T)``. Both are trained with cross-entropy over the last dimension.

  A model may take dict batches (``model(**inputs)``, the batch minus ``labels``) and return an
  object with a ``.logits`` attribute (a ``transformers`` ModelOutput) instead of the logits.

- A dataset factory returns ``(inputs, targets)``, two tensors with the same first dimension, or
  any ``torch.utils.data.Dataset``: map-style (``__len__``, ``__getitem__``) or iterable, of any
  size, whose items are ``(input, target)`` pairs or dicts of tensors with ``labels``
  (:mod:`ngd_dist.service.data.loading` says how it is fed and resumed). If it has a parameter
  named ``seed`` and the args do not set one, the job's seed is passed.

- The built-in language-model data (``synthetic_tokens``, ``text``) takes ``format: dict`` in its
  args (default ``pairs``): items ``{"input_ids", "attention_mask", "labels"}`` with ``labels``
  equal to ``input_ids`` (the Hugging Face causal-LM convention: the trainer shifts them).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import keyword
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngd_dist.service import models
from ngd_dist.service.data import datasets, folders, hf_files
from ngd_dist.service.data.loading import TensorDicts, TensorPairs

Task = Literal["classification", "language_model"]
TASKS: tuple[Task, ...] = ("classification", "language_model")

DATA_FORMATS = ("pairs", "dict")
"""``data.args.format`` of the built-in language-model data: ``(inputs, targets)`` items or dicts."""

HF_EXTRA_MODELS = ("hf_causal_lm", "hf_sequence_classification")
"""Built-in models that need the ``hf`` extra (``transformers``)."""


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: its factory, the name of its logits module (None: the built model declares
    it as ``ngd_output_module``) and its task.
    """

    factory: Callable[..., nn.Module]
    output_module: str | None
    task: Task


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in dataset: its factory, the task its targets are for, the extra it needs and the
    check of its arguments that reads no data.
    """

    factory: Callable[..., Any]
    """Returns ``(inputs, targets)`` tensors, or a map-style Dataset read item by item."""
    task: Task | None
    """None: the items are whatever the model's task needs (``hf_files``)."""
    extra: str | None = None
    """The extra of ``pyproject.toml`` it needs (a key of :data:`EXTRA_MODULES`), if any."""
    check: Callable[..., Any] | None = None
    """Called with the factory's arguments by ``ngd-dist validate``: a one-line ``ValueError`` for
    what the factory would refuse (missing files, ...), reading no data."""


BUILTIN_MODELS: Mapping[str, BuiltinModel] = {
    "mlp": BuiltinModel(models.mlp, "5", "classification"),
    "small_cnn": BuiltinModel(models.small_cnn, "5", "classification"),
    "resnet18": BuiltinModel(models.resnet18, "fc", "classification"),
    "gpt": BuiltinModel(models.gpt, "head", "language_model"),
    "hf_causal_lm": BuiltinModel(models.hf_causal_lm, None, "language_model"),
    "hf_sequence_classification": BuiltinModel(models.hf_sequence_classification, None, "classification"),
}
"""Built-in models by job name. ``output_module`` is the logits module with default arguments."""

BUILTIN_DATASETS: Mapping[str, BuiltinDataset] = {
    "digits": BuiltinDataset(datasets.digits, "classification"),
    "synthetic_images": BuiltinDataset(datasets.synthetic_images, "classification"),
    "synthetic_tokens": BuiltinDataset(datasets.synthetic_tokens, "language_model"),
    "text": BuiltinDataset(datasets.text_file, "language_model"),
    "tensor_file": BuiltinDataset(datasets.image_folder_tensors, "classification"),
    "image_folder": BuiltinDataset(folders.image_folder, "classification", extra="images"),
    "cifar10": BuiltinDataset(folders.cifar10, "classification"),
    "hf_files": BuiltinDataset(hf_files.hf_files, None, extra="datasets", check=hf_files.check_args),
}
"""Built-in datasets by job name."""

EXTRA_MODULES: Mapping[str, str] = {
    "deepspeed": "deepspeed",
    "mpi": "mpi4py",
    "images": "PIL",
    "datasets": "datasets",
    "tensorboard": "tensorboard",
}
"""The optional extras of ``pyproject.toml`` the service checks for, and the module each installs."""


def missing_extra(extra: str, what: str) -> str | None:
    """The one-line refusal of ``what`` (``"--launcher deepspeed"``) when the module of ``extra``
    (:data:`EXTRA_MODULES`) is not installed; None when it is.
    """
    module = EXTRA_MODULES[extra]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    package = f" ({module})" if module != extra else ""
    return f"{what} needs the {extra!r} extra{package}: pip install 'ngd_dist[{extra}]'"


def missing_data_extra(name: str) -> str | None:
    """The one-line refusal of built-in data ``name`` when the extra it needs is not installed
    (naming ``data.name``); None when it can be built (or ``name`` is not a built-in).
    """
    spec = BUILTIN_DATASETS.get(name)
    if spec is None or spec.extra is None:
        return None
    return missing_extra(spec.extra, f"data.name: {name}")


def needs_hf_extra(name: str) -> str | None:
    """The one-line refusal of a model that needs the ``hf`` extra when ``transformers`` is not
    installed (naming ``model.name``); None when the model can be built.
    """
    if name not in HF_EXTRA_MODELS:
        return None
    try:
        found = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"model.name: {name} needs the 'hf' extra: pip install 'ngd_dist[hf]'"


def is_user_factory(name: str) -> bool:
    """Whether ``name`` is a ``package.module:factory`` reference rather than a built-in name."""
    return isinstance(name, str) and ":" in name


def build_model(
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
    import_paths: Sequence[str | os.PathLike[str]] = (),
) -> nn.Module:
    """Build the model a job names: a built-in (:data:`BUILTIN_MODELS`) or ``package.module:factory``.

    ``args`` are passed as keyword arguments (built-ins check names and types first). With ``seed``
    the parameters are initialised from ``torch`` CPU generator state seeded by it, and the global
    CPU RNG state is restored afterwards, so every rank builds the same weights. Built-in MLPs and
    CNNs get an ``ngd_output_module`` attribute naming their last ``nn.Linear`` (``"5"`` with the
    default depth); ``ResNet`` and ``GPT`` carry it as a class attribute. Raises ``ValueError``
    naming ``model.name`` or ``model.args[.<arg>]``.
    """
    factory, builtin = _resolve("model", name, BUILTIN_MODELS, import_paths)
    missing = needs_hf_extra(name) if builtin else None
    if missing is not None:
        raise ValueError(missing)
    kwargs = _check_args("model", name, factory, args, builtin=builtin)
    if seed is None:
        model = _call("model", name, factory, kwargs)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        state = torch.get_rng_state()
        try:
            torch.random.default_generator.manual_seed(seed % 2**63)
            model = _call("model", name, factory, kwargs)
        finally:
            torch.set_rng_state(state)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name: {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if builtin and name in ("mlp", "small_cnn"):
        last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        model.ngd_output_module = last
    return model


def build_data(
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    seed: int,
    import_paths: Sequence[str | os.PathLike[str]] = (),
) -> torch.utils.data.Dataset[Any]:
    """The ``torch.utils.data.Dataset`` a job trains on: a built-in or ``package.module:factory``.

    Built-in data is held in memory as tensors and wrapped as a map-style
    :class:`~ngd_dist.service.data.loading.TensorPairs` (or, with ``data.args.format: dict``, a
    :class:`~ngd_dist.service.data.loading.TensorDicts` of ``input_ids``, ``attention_mask`` and
    ``labels``); a user factory's ``(inputs, targets)`` tensors are wrapped the same way, and a
    Dataset it returns (map-style or iterable, any size) is used as it is. Built-ins are listed in
    :data:`BUILTIN_DATASETS`. The job ``seed`` is passed to every factory with a ``seed`` parameter
    unless ``args`` sets ``seed`` itself (an explicit ``data.args.seed`` wins). Raises
    ``ValueError`` naming ``data.name`` or ``data.args[.<arg>]``.
    """
    result, form = _produce(name, args, seed=seed, import_paths=import_paths)
    if isinstance(result, torch.utils.data.Dataset):
        if not isinstance(result, torch.utils.data.IterableDataset) and not (
            hasattr(result, "__len__") and hasattr(result, "__getitem__")
        ):
            raise ValueError(
                f"data.name: {name!r} returned a {type(result).__name__} without __len__; expected a "
                "map-style Dataset (__len__ and __getitem__) or a torch.utils.data.IterableDataset"
            )
        return result
    inputs, targets = _as_tensors(name, result)
    if form == "dict":
        mask = torch.ones_like(inputs)
        return TensorDicts({"input_ids": inputs, "attention_mask": mask, "labels": inputs.clone()})
    return TensorPairs(inputs, targets)


@dataclass(frozen=True)
class DataFactory:
    """A job's data factory, resolved and its arguments checked, not yet called."""

    factory: Callable[..., Any]
    builtin: BuiltinDataset | None
    """The built-in's spec, or None for a ``module:factory`` of the user's."""
    kwargs: dict[str, Any]
    """The checked arguments (a built-in language-model data's ``format`` taken out)."""
    form: str
    """The items' format: ``"pairs"``, or ``"dict"`` when ``data.args.format`` asks for it."""


def check_data_factory(
    name: str, args: Mapping[str, Any] | None, import_paths: Sequence[str | os.PathLike[str]] = ()
) -> DataFactory:
    """Resolve ``data.name`` and check ``data.args`` against the factory, without calling it (what
    ``validate`` checks and what :func:`build_data` then calls). ValueError naming the field.

    The ``format`` of a built-in's items (``"pairs"`` unless ``data.args.format`` says ``"dict"``,
    which the built-in language-model data accepts) is taken out of the arguments.
    """
    factory, builtin = _resolve("data", name, BUILTIN_DATASETS, import_paths)
    form = "pairs"
    own_format = "format" in (_parameters(factory) or {})  # hf_files: the files' format
    if builtin and isinstance(args, Mapping) and "format" in args and not own_format:
        if BUILTIN_DATASETS[name].task != "language_model":
            raise ValueError(
                f"data.args.format: {name!r} takes no argument 'format' (only the language-model data "
                f"{', '.join(n for n, d in BUILTIN_DATASETS.items() if d.task == 'language_model')} does)"
            )
        form = args["format"]
        if form not in DATA_FORMATS:
            raise ValueError(f"data.args.format: got {form!r}; expected one of {', '.join(DATA_FORMATS)}")
        args = {k: v for k, v in args.items() if k != "format"}
    kwargs = _check_args("data", name, factory, args, builtin=builtin)
    return DataFactory(factory, BUILTIN_DATASETS[name] if builtin else None, kwargs, form)


def _produce(
    name: str, args: Mapping[str, Any] | None, *, seed: int, import_paths: Sequence[str | os.PathLike[str]]
) -> tuple[Any, str]:
    """What the data factory returns, and the format of a built-in's items."""
    data = check_data_factory(name, args, import_paths)
    kwargs = dict(data.kwargs)
    if "seed" not in kwargs and "seed" in (_parameters(data.factory) or {}):
        kwargs["seed"] = seed
    return _call("data", name, data.factory, kwargs, builtin=data.builtin is not None), data.form


def output_module_of(name: str, model: nn.Module | None = None) -> str | None:
    """The qualified name of the module whose output are the logits, or None if unknown.

    With ``model`` (as built by :func:`build_model`), its ``ngd_output_module`` attribute wins and
    must name one of its submodules. Otherwise: ``"5"`` for ``mlp`` and ``small_cnn`` (default
    depth), ``"fc"`` for ``resnet18``, ``"head"`` for ``gpt``, and None for a user factory
    without the attribute (and for the Hugging Face built-ins, whose built models declare it:
    ``lm_head``, ``score`` or ``classifier``). An unknown built-in name raises ``ValueError``.
    """
    declared = getattr(model, "ngd_output_module", None) if model is not None else None
    if declared is not None:
        assert model is not None
        if not isinstance(declared, str) or declared not in dict(model.named_modules()):
            raise ValueError(
                f"model.name: {name!r} built a model whose ngd_output_module={declared!r} names none of "
                "its submodules"
            )
        return declared
    spec = BUILTIN_MODELS.get(name)
    if spec is not None:
        return spec.output_module
    if not is_user_factory(name):
        raise ValueError(_unknown("model", name, BUILTIN_MODELS))
    return None


def task_of(name: str, model: nn.Module | None = None) -> Task:
    """``"classification"`` or ``"language_model"`` for a model name (and the built model).

    A built-in's task is fixed (``gpt`` is the language model). For a user factory, the model's
    ``ngd_task`` attribute if set (checked), else ``"classification"``.
    """
    spec = BUILTIN_MODELS.get(name)
    if spec is not None:
        return spec.task
    if not is_user_factory(name):
        raise ValueError(_unknown("model", name, BUILTIN_MODELS))
    declared = getattr(model, "ngd_task", "classification") if model is not None else "classification"
    if declared not in TASKS:
        raise ValueError(
            f"model.name: {name!r} built a model with ngd_task={declared!r}; expected one of {TASKS}"
        )
    return declared


def dataset_task_of(name: str) -> Task | None:
    """The task a built-in dataset's targets are for; None for a user factory."""
    spec = BUILTIN_DATASETS.get(name)
    if spec is not None:
        return spec.task
    if not is_user_factory(name):
        raise ValueError(_unknown("data", name, BUILTIN_DATASETS))
    return None


# -- resolution ------------------------------------------------------------------------------------


def _unknown(field: str, name: object, builtins: Mapping[str, object]) -> str:
    kind = "model" if field == "model" else "dataset"
    close = difflib.get_close_matches(str(name), list(builtins), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"{field}.name: unknown built-in {kind} {name!r}{hint}; built-ins: {', '.join(builtins)}; "
        f"or give 'package.module:factory' for your own"
    )


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() and not keyword.iskeyword(part) for part in text.split("."))


def _resolve(
    field: str,
    name: str,
    builtins: Mapping[str, BuiltinModel] | Mapping[str, BuiltinDataset],
    import_paths: Sequence[str | os.PathLike[str]],
) -> tuple[Callable[..., Any], bool]:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{field}.name must be a non-empty string, got {name!r}")
    spec = builtins.get(name)
    if spec is not None:
        return spec.factory, True
    if not is_user_factory(name):
        raise ValueError(_unknown(field, name, builtins))
    module_name, _, attr_path = name.partition(":")
    if not _dotted(module_name) or not _dotted(attr_path):
        raise ValueError(
            f"{field}.name: {name!r} is not of the form 'package.module:factory' "
            "(dotted identifiers on both sides of one colon)"
        )
    for entry in reversed([os.fspath(p) for p in import_paths]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(
                f"{field}.name: cannot import module {module_name!r} for {name!r}: no module named "
                f"{exc.name!r} (is its directory on sys.path / in import_paths?)"
            ) from exc
        raise ValueError(
            f"{field}.name: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise ValueError(
            f"{field}.name: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for depth, part in enumerate(attr_path.split(".")):
        if not hasattr(target, part):
            owner = ".".join([module_name, *attr_path.split(".")[:depth]])
            raise ValueError(f"{field}.name: {owner!r} has no attribute {part!r} (from {name!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{field}.name: {name!r} is a {type(target).__name__}, not a callable factory")
    return target, False


def _parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    """The factory's parameters, or None when it has no introspectable signature."""
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None


def _check_args(
    field: str, name: str, factory: Callable[..., Any], args: Mapping[str, Any] | None, *, builtin: bool
) -> dict[str, Any]:
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise ValueError(f"{field}.args must be a mapping of argument names to values, got {args!r}")
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{field}.args: argument names must be identifiers, got {key!r}")
        kwargs[key] = value
    params = _parameters(factory)
    if params is None:  # no signature to check against: the call itself will tell
        return kwargs
    named = {
        p.name: p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = ", ".join(named) or "none"
    for key in kwargs:
        if key not in named and not takes_any:
            raise ValueError(f"{field}.args.{key}: {name!r} takes no argument {key!r}; accepted: {accepted}")
    for param in named.values():
        filled_later = field == "data" and param.name == "seed"
        if param.default is inspect.Parameter.empty and param.name not in kwargs and not filled_later:
            raise ValueError(f"{field}.args.{param.name}: required by {name!r} but not given")
    if builtin:
        for key, value in kwargs.items():
            if key in named:  # the rest go to a **kwargs (a configuration's fields)
                _check_type(field, name, named[key], value)
    return kwargs


def _check_type(field: str, name: str, param: inspect.Parameter, value: Any) -> None:
    default = param.default
    if default is inspect.Parameter.empty:  # paths
        ok, expected = isinstance(value, (str, os.PathLike)), "a path string"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        return
    if not ok:
        raise ValueError(
            f"{field}.args.{param.name}: {name!r} expects {expected}, got {value!r} ({type(value).__name__})"
        )


def _call(
    field: str, name: str, factory: Callable[..., Any], kwargs: dict[str, Any], *, builtin: bool = False
) -> Any:
    try:
        return factory(**kwargs)
    except ValueError as exc:
        if builtin and str(exc).startswith(f"{field}."):  # a built-in's own one line, naming the key
            raise
        raise ValueError(
            f"{field}.args: building {name!r} with {kwargs!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except TypeError as exc:
        raise ValueError(f"{field}.args: {name!r} rejected the arguments {kwargs!r}: {exc}") from exc
    except Exception as exc:
        raise ValueError(
            f"{field}.args: building {name!r} with {kwargs!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _as_tensors(name: str, result: Any) -> tuple[Tensor, Tensor]:
    if isinstance(result, (tuple, list)) and len(result) == 2:
        inputs, targets = result
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise ValueError(
                f"data.name: {name!r} returned a pair of {type(inputs).__name__} and "
                f"{type(targets).__name__}; expected two tensors"
            )
    else:
        raise ValueError(
            f"data.name: {name!r} returned a {type(result).__name__}; expected (inputs, targets) tensors "
            "or a map-style torch.utils.data.Dataset"
        )
    if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"data.name: {name!r} returned inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)}; "
            "they need the same, non-zero first dimension"
        )
    return inputs, targets

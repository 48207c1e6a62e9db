"""Exact improved-empirical-Fisher updates for small parameter sets (Wu et al. 2024, Eq. 8).

For a batch of N samples with per-sample losses l_n, per-sample gradients J (N x P) and
s_n = ||dl_n/dz_n||^2 (z_n all of the sample's logits: every token's, for a sequence), the iEF
update direction is

    delta = J^T (J J^T + lambda I)^-1 s,

solved in float64 through the N x N Gram matrix, so it costs O(N^2 P + N^3) and suits heads,
adapters and prompt parameters (N << P). Note that with lambda > 0 this is *not*
(F_iEF + lambda I)^-1 grad L, which equals J^T (J J^T + lambda diag(s))^-1 s; the two agree as
lambda -> 0 (:func:`damped_ief_direction` gives the latter).

The model may be called with one tensor, a tuple of tensors (positional arguments) or a dict
(keyword arguments, as Hugging Face models take ``input_ids`` and ``attention_mask``); every tensor
is batched on dim 0. Its output may be the logits, a tuple or list (element 0), or an object with
``.logits`` (a transformers ``ModelOutput``) or a ``"logits"`` key. Logits are (N, C) against
targets (N,), or (N, T, C) against (N, T) for token-level losses: the default loss of a sample is
the *sum* of its tokens' cross-entropies, skipping targets equal to ``ignore_index`` (which then add
nothing to the loss, to J or to s); ``shift_labels=True`` scores logits[:, :-1] against
targets[:, 1:], the causal-LM convention of Hugging Face (labels = the input ids).

The loss must be separable over samples (no BatchNorm in training mode, no in-batch negatives,
no dropout: call ``model.eval()``), since per-sample gradients are taken with ``torch.func.vmap``.
A forward that vmap cannot batch (data-dependent control flow, such as the SDPA mask code of
transformers given an ``attention_mask``) raises; ``vectorize=False`` then loops over the samples
(or load the Hugging Face model with ``attn_implementation="eager"``, which vmap batches).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ngd_dist.kfac.outputs import IGNORE_INDEX, logits_of

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Per-sample losses from (logits, targets), shape (N,)."""

Inputs: TypeAlias = "Tensor | tuple[Tensor, ...] | list[Tensor] | Mapping[str, Any]"
"""What the model is called with: one tensor, positional tensors, or keyword arguments (tensors
batched on dim 0; a keyword's non-tensor value, such as ``use_cache=False``, is passed as it is)."""


def per_sample_cross_entropy(
    logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, shift_labels: bool = False
) -> Tensor:
    """The default loss: each sample's cross-entropy, summed over its tokens, shape (N,).

    ``logits`` (N, C) with ``targets`` (N,), or (N, T, ..., C) with (N, T, ...) (classes last).
    Targets equal to ``ignore_index`` add nothing. With ``shift_labels`` the logits of position t
    are scored against the target of position t + 1 (dim 1), the last position against nothing.
    """
    if shift_labels:
        if logits.dim() < 3:
            raise ValueError(
                f"shift_labels: needs token logits (N, T, C); got logits of shape {tuple(logits.shape)}"
            )
        logits, targets = logits[:, :-1], targets[:, 1:]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"per_sample_cross_entropy: logits {tuple(logits.shape)} do not fit targets "
            f"{tuple(targets.shape)}; "
            "expected (N, C) with (N,) or (N, T, C) with (N, T)"
            + ("" if shift_labels else " (causal-LM labels equal to the inputs need shift_labels=True)")
        )
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=ignore_index
    )
    return losses.reshape(targets.shape[0], -1).sum(dim=1)


def exact_ief_direction(jacobian: Tensor, s: Tensor, damping: float) -> Tensor:
    """Eq. 8 of the iEF paper: ``J^T (J J^T + damping I)^-1 s`` (float64 solve), shape (P,)."""
    j = jacobian.double()
    gram = j @ j.t() + damping * torch.eye(j.shape[0], dtype=j.dtype, device=j.device)
    return (j.t() @ torch.linalg.solve(gram, s.double())).to(jacobian.dtype)


def damped_ief_direction(jacobian: Tensor, s: Tensor, damping: float) -> Tensor:
    """``(J^T diag(s)^-1 J + damping I)^-1 J^T 1`` via Woodbury: ``J^T (J J^T + damping diag(s))^-1 s``."""
    j = jacobian.double()
    gram = j @ j.t() + damping * torch.diag(s.double())
    return (j.t() @ torch.linalg.solve(gram, s.double())).to(jacobian.dtype)


def _default_loss(loss_fn: LossFn | None, ignore_index: int, shift_labels: bool, where: str) -> LossFn:
    """``loss_fn``, or the cross-entropy with these options (which a given ``loss_fn`` must handle itself)."""
    if loss_fn is None:
        return functools.partial(
            per_sample_cross_entropy, ignore_index=ignore_index, shift_labels=shift_labels
        )
    if ignore_index != IGNORE_INDEX or shift_labels:
        raise ValueError(
            f"{where}: ignore_index and shift_labels configure the default loss; "
            "a loss_fn given must ignore and shift targets itself"
        )
    return loss_fn


def _split_inputs(inputs: Inputs, n: int) -> tuple[tuple[Tensor, ...], dict[str, Tensor], dict[str, Any]]:
    """Positional tensors, keyword tensors (both batched on dim 0) and keyword constants."""
    args: tuple[Tensor, ...] = ()
    kwargs: dict[str, Tensor] = {}
    constants: dict[str, Any] = {}
    if isinstance(inputs, Tensor):
        args = (inputs,)
    elif isinstance(inputs, Mapping):
        kwargs = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
        constants = {k: v for k, v in inputs.items() if not isinstance(v, Tensor)}
    elif isinstance(inputs, (tuple, list)) and all(isinstance(v, Tensor) for v in inputs):
        args = tuple(inputs)
    else:
        raise TypeError(
            f"per_sample_gradients: inputs of type {type(inputs).__name__}; expected a tensor, "
            "a tuple of tensors or a dict of keyword arguments"
        )
    batched = [*args, *kwargs.values()]
    if not batched:
        raise ValueError("per_sample_gradients: the inputs hold no tensor to split into samples")
    wrong = [tuple(t.shape) for t in batched if t.dim() == 0 or t.shape[0] != n]
    if wrong:
        raise ValueError(
            f"per_sample_gradients: every input tensor must have the {n} samples on dim 0; got {wrong}"
        )
    return args, kwargs, constants


def _logits_of(output: Any) -> Tensor:
    """The logits in a model's output (:func:`~ngd_dist.kfac.outputs.logits_of`), or TypeError."""
    logits = logits_of(output)
    if logits is None:
        raise TypeError(
            "per_sample_gradients: cannot find the logits in a model output of type "
            f"{type(output).__name__}; "
            "expected a tensor, a tuple (logits first) or an object with .logits"
        )
    return logits


def per_sample_gradients(
    model: nn.Module,
    names: list[str],
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: bool = False,
    vectorize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample gradients J, squared logit-gradient norms s, and per-sample losses.

    J is (N x P), the named parameters' gradients flattened in ``names`` order; s and the losses
    are (N,), N = ``len(targets)``. ``inputs`` and the model's output take the forms listed in the
    module's docstring. ``loss_fn`` maps (logits, targets) to per-sample losses (default:
    :func:`per_sample_cross_entropy` with ``ignore_index`` and ``shift_labels``). ``vectorize``:
    per-sample gradients with ``torch.func.vmap`` (one batched pass); False loops over the samples,
    for a forward vmap cannot batch.

    Names may be those of tied parameters (``lm_head.weight`` tied to the embeddings): the gradient
    is then the shared tensor's.
    """
    loss_fn = _default_loss(loss_fn, ignore_index, shift_labels, "per_sample_gradients")
    n = targets.shape[0]
    args, kwargs, constants = _split_inputs(inputs, n)
    every = dict(model.named_parameters(remove_duplicate=False))
    unknown = [name for name in names if name not in every]
    if unknown:
        raise ValueError(f"per_sample_gradients: {unknown} are not parameters of the model")
    chosen = {name: every[name].detach() for name in names}
    chosen_ids = {id(every[name]) for name in names}
    if len(chosen_ids) < len(names):
        raise ValueError(f"per_sample_gradients: names {names} name a (tied) parameter twice")
    frozen = {name: p.detach() for name, p in model.named_parameters() if id(p) not in chosen_ids}
    buffers = dict(model.named_buffers())

    def forward(theta: dict[str, Tensor], a: tuple[Tensor, ...], kw: dict[str, Tensor]) -> Tensor:
        return _logits_of(functional_call(model, {**frozen, **buffers, **theta}, a, {**kw, **constants}))

    def sample_loss(
        theta: dict[str, Tensor], a: tuple[Tensor, ...], kw: dict[str, Tensor], y: Tensor
    ) -> Tensor:
        one = (tuple(t.unsqueeze(0) for t in a), {k: t.unsqueeze(0) for k, t in kw.items()})
        return loss_fn(forward(theta, *one), y.unsqueeze(0)).sum()

    if vectorize:
        try:
            grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(chosen, args, kwargs, targets)
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
            raise RuntimeError(
                "per_sample_gradients: torch.func.vmap cannot batch this model's forward "
                f"({str(err)[:200]}); "
                "pass vectorize=False to loop over the samples (Hugging Face models: or load them with "
                'attn_implementation="eager")'
            ) from err
        jacobian = torch.cat([grads[name].reshape(n, -1) for name in names], dim=1)
    else:
        rows = []
        for i in range(n):
            sample = (tuple(t[i] for t in args), {k: t[i] for k, t in kwargs.items()})
            one = grad(sample_loss)(chosen, *sample, targets[i])
            rows.append(torch.cat([one[name].reshape(-1) for name in names]))
        jacobian = torch.stack(rows)
    logits = forward(chosen, args, kwargs).detach()
    logits.requires_grad_(True)
    losses = loss_fn(logits, targets)
    (logit_grads,) = torch.autograd.grad(losses.sum(), logits)
    s = logit_grads.reshape(n, -1).square().sum(dim=1)
    return jacobian, s, losses.detach()


class ExactIEF:
    """An optimizer mode for small parameter sets: writes the exact iEF direction into ``.grad``.

    Use with plain SGD (no momentum, no weight decay, as in the paper's Alg. 1)::

        ief = ExactIEF(model, ["head.weight", "head.bias"], damping=1e-7)
        opt = torch.optim.SGD(ief.parameters(), lr=...)
        loss = ief.compute(x, y); opt.step()

    For a Hugging Face causal LM (labels = the input ids, padding -100; eval mode)::

        ief = ExactIEF(model, ["lm_head.weight"], shift_labels=True)
        loss = ief.compute({"input_ids": ids, "attention_mask": mask}, labels)
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        damping: float = 1e-7,
        loss_fn: LossFn | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: bool = False,
        vectorize: bool = True,
    ) -> None:
        """Choose the parameters (by name; default all trainable ones), the damping and the loss.

        ``loss_fn``, ``ignore_index``, ``shift_labels`` and ``vectorize`` are those of
        :func:`per_sample_gradients`.
        """
        params = dict(model.named_parameters(remove_duplicate=False))
        self.names = (
            list(names) if names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
        )
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise ValueError(f"ExactIEF.names: {unknown} are not parameters of the model")
        if len({id(params[n]) for n in self.names}) < len(self.names):
            raise ValueError(f"ExactIEF.names: {self.names} name a (tied) parameter twice")
        if not (damping >= 0):
            raise ValueError(f"ExactIEF.damping: got {damping!r}; expected a number >= 0")
        self.model, self.damping, self.vectorize = model, damping, vectorize
        self.loss_fn = _default_loss(loss_fn, ignore_index, shift_labels, "ExactIEF")

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` :meth:`compute` writes."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return [params[n] for n in self.names]

    def compute(self, inputs: Inputs, targets: Tensor) -> Tensor:
        """Set each chosen parameter's ``.grad`` to its slice of the iEF direction.

        ``inputs``: a tensor, a tuple of tensors or a dict of keyword arguments (see
        :func:`per_sample_gradients`). Returns the mean over the samples of their losses (with
        token logits, each sample's loss is the sum over its tokens).
        """
        jacobian, s, losses = per_sample_gradients(
            self.model, self.names, inputs, targets, self.loss_fn, vectorize=self.vectorize
        )
        direction = exact_ief_direction(jacobian, s, self.damping)
        offset = 0
        for p in self.parameters():
            n = p.numel()
            p.grad = direction[offset : offset + n].reshape(p.shape).to(p.dtype).clone()
            offset += n
        return losses.mean()

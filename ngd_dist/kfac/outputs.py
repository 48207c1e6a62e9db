"""What a model's forward returns, as the library reads it: its logits, and the ignored label.

Shared by :mod:`~ngd_dist.kfac.exact_ief`, :mod:`~ngd_dist.kfac.quality` and the service, so a
Hugging Face ``ModelOutput``, a dict or a tuple is understood the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

IGNORE_INDEX = -100
"""Targets with this value carry no loss (``F.cross_entropy``'s default ``ignore_index``, as in
Hugging Face)."""


def logits_of(output: object) -> Tensor | None:
    """The logits in a model's output: the tensor itself, ``.logits`` (a transformers ModelOutput),
    a ``"logits"`` key, or a tuple's first element; None when there are none.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    return logits if isinstance(logits, Tensor) else None

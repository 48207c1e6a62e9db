"""Random-generator state for checkpoints.

Every generator a training step draws from (Python, torch CPU and CUDA, NumPy) is captured into a
checkpointable mapping and restored from one, so a resumed run draws exactly what an uninterrupted
one would have drawn.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

from ngd_dist.service.checkpoint.store import type_name

log = logging.getLogger(__name__)

RNG_STATE_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (Python ``random``, torch CPU, CUDA when in use, NumPy when importable).

    The result is safe for ``weights_only`` loading: NumPy's legacy global state is stored as a
    tensor of its key plus plain ints / floats. CUDA states are captured only when CUDA is
    initialised (otherwise no CUDA random numbers were drawn). Generators that the program owns
    (``torch.Generator``, ``numpy.random.default_rng``) are not global: save their state yourself.
    """
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned; ValueError naming the entry if malformed.

    CUDA states are restored per device for the devices present (a warning is logged when the
    device count differs or CUDA is gone); a NumPy state is skipped with a warning when NumPy is
    not importable.
    """
    if not isinstance(state, Mapping) or state.get("version") != RNG_STATE_VERSION:
        got = state.get("version") if isinstance(state, Mapping) else type_name(state)
        raise ValueError(
            f"RNG state: version {got!r}; expected a dict from capture_rng_state() with version "
            f"{RNG_STATE_VERSION}"
        )
    for key in ("python", "torch"):
        if key not in state:
            raise ValueError(f"RNG state: no {key!r} entry; expected the output of capture_rng_state()")
    python = state["python"]
    try:
        version, internal, gauss = python
        random.setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RNG state: 'python' entry is not a random.getstate() value: {exc}") from None
    cpu = state["torch"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise ValueError(f"RNG state: 'torch' entry is a {type_name(cpu)}; expected a uint8 tensor")
    torch.set_rng_state(cpu)
    if "cuda" in state:
        _restore_cuda(state["cuda"])
    if "numpy" in state:
        _restore_numpy(state["numpy"])


def _restore_cuda(states: Any) -> None:
    if not isinstance(states, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in states):
        raise ValueError(
            f"RNG state: 'cuda' entry is a {type_name(states)}; expected a list of uint8 tensors"
        )
    if not torch.cuda.is_available():
        log.warning(
            "RNG state: %d CUDA RNG states saved but CUDA is not available; not restored", len(states)
        )
        return
    count = torch.cuda.device_count()
    if count != len(states):
        log.warning(
            "RNG state: %d CUDA RNG states saved, %d devices visible now; restoring the first %d",
            len(states),
            count,
            min(count, len(states)),
        )
    for device, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s.cpu(), device)


def _restore_numpy(saved: Any) -> None:
    try:
        import numpy as np
    except ImportError:
        log.warning("RNG state: a NumPy RNG state was saved but NumPy is not importable; not restored")
        return
    try:
        key = saved["key"]
        if not isinstance(key, torch.Tensor):
            raise TypeError(f"key is a {type_name(key)}, not a tensor")
        np.random.set_state(
            (
                str(saved["bit_generator"]),
                key.numpy().astype(np.uint32),
                int(saved["pos"]),
                int(saved["has_gauss"]),
                float(saved["cached_gaussian"]),
            )
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"RNG state: 'numpy' entry is malformed: {exc!r}") from None

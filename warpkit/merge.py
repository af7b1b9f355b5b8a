"""Pure-torch merge math over named tensors (WARP stages 2 and 3). No transformers import.

A state is a `Mapping[str, torch.Tensor]`. Arithmetic runs in float32 or better and each result is
cast once to the output dtype; integer and bool tensors are copied from the init, never interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["liti"]

State = Mapping[str, torch.Tensor]


def _check_eta(eta: float, allow_extrapolation: bool) -> None:
    if not math.isfinite(eta):
        raise ValueError(f"liti_eta must be finite, got {eta}.")
    if eta < 0 or (eta > 1 and not allow_extrapolation):
        raise ValueError(
            f"liti_eta={eta} is outside [0, 1]. eta > 1 extrapolates past the merge (as in ExPO); "
            "pass allow_extrapolation=True (CLI: --allow-extrapolation) if that is what you want."
        )


def liti(
    init: State, merged: State, eta: float, *, allow_extrapolation: bool = False
) -> dict[str, torch.Tensor]:
    """LITI, WARP stage 3: theta_eta = (1 - eta) * init + eta * merged, tensor by tensor.

    eta (η) = 0 returns init, 1 returns merged; the paper uses 0.3 for the next iteration's init.
    Shapes: every tensor of `merged` has the shape of the same-named tensor of `init`.
    """
    _check_eta(eta, allow_extrapolation)
    if init.keys() != merged.keys():
        raise ValueError(f"init and merged have different tensors: {sorted(set(init) ^ set(merged))[:5]}")
    out = {}
    for name, a in init.items():
        b = merged[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: init has shape {tuple(a.shape)}, merged {tuple(b.shape)}.")
        if not a.is_floating_point():
            out[name] = a.clone()
            continue
        a32, b32 = a.float(), b.float()
        out[name] = torch.lerp(a32, b32, eta).to(a.dtype)
    return out

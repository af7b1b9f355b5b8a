"""Pure-torch merge math over named tensors (WARP stages 2 and 3). No transformers import.

A state is a `Mapping[str, torch.Tensor]`. Arithmetic runs in float32 or better and each result is
cast once to the output dtype; integer and bool tensors are copied from the init, never interpolated.

WARP's SLERP of task vectors (Ramé et al. 2024, eq. in section 3.2), with d_m = theta_m - init:

    slerp(init, theta_1, theta_2, λ) = init + sin((1-λ)Ω)/sin(Ω) * d_1 + sin(λΩ)/sin(Ω) * d_2
    cos(Ω) = <d_1, d_2> / (|d_1| |d_2|)

and for M > 2 the paper's recursion, every call relative to the same init:
    slerp_M = slerp(init, slerp_{M-1}, theta_M, λ_M),  λ_k = w_k / (w_1 + ... + w_k)   (1/k if uniform)

Every merged task vector is a linear combination sum_m c_m d_m, so a merge is decided by the Gram
matrix G[i, j] = <d_i, d_j> of each group of parameters: `slerp_coefficients` runs the recursion on G
alone (in float64, `warpkit.merge.coefficients`), and the tensors are combined once. This is what lets
`warpkit.merge.stream` stream checkpoints: one pass accumulates G per group, a second writes
sum_m c_m theta_m + (1 - sum_m c_m) init. The functions here are the in-memory versions, on state dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from warpkit._util.tensors import check_same_tensors
from warpkit.merge.coefficients import GroupStats, lerp_coefficients, slerp_coefficients

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "State",
    "check_eta",
    "check_states",
    "combine",
    "gram_matrix",
    "group_key",
    "lerp",
    "liti",
    "merge_lambdas",
    "slerp",
    "task_vector",
    "weighted_average",
]

State = Mapping[str, torch.Tensor]
Granularity = Literal["block", "tensor", "model"]
GRANULARITIES: tuple[str, ...] = ("block", "tensor", "model")

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"


def group_key(name: str, granularity: Granularity) -> str:
    """The group whose task vectors share one angle Ω.

    `block` (default everywhere): one group per transformer layer, i.e. the name up to its first
    numeric component ("model.layers.3"); every other tensor is grouped by its module
    ("model.embed_tokens", "model.norm", "lm_head"), so embeddings, final norm and head each get their own.
    `tensor`: one group per tensor (mergekit's nuslerp). `model`: a single group "model".
    """
    if granularity == "tensor":
        return name
    if granularity == "model":
        return "model"
    if granularity != "block":
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def merge_lambdas(weights: Sequence[float], *, allow_extrapolation: bool = False) -> list[float]:
    """λ_k = w_k / (w_1 + ... + w_k) for k = 2..M: the recursion's interpolation weights.

    Uniform weights give λ_k = 1/k (the paper's default, λ = 1/M for the last step); two models with
    weights (1 - λ, λ) give λ. A zero partial sum with zero w_k gives λ_k = 0 (nothing to add yet).
    """
    if len(weights) < 1:
        raise ValueError(
            "a merge needs at least one model (one model alone is returned as is, e.g. for LITI)."
        )
    for w in weights:
        if not math.isfinite(w):
            raise ValueError(f"merge weights must be finite, got {list(weights)}.")
    if not allow_extrapolation and any(w < 0 for w in weights):
        raise ValueError(
            f"negative merge weights {list(weights)} put λ outside [0, 1] (extrapolation); "
            "pass allow_extrapolation=True (CLI: --allow-extrapolation) if that is intended."
        )
    lambdas, total = [], float(weights[0])
    for w in weights[1:]:
        total += w
        if total == 0:
            if w != 0:
                raise ValueError(f"merge weights {list(weights)} have a zero partial sum: λ is undefined.")
            lambdas.append(0.0)
            continue
        lam = w / total
        if not allow_extrapolation and not 0.0 <= lam <= 1.0:
            raise ValueError(f"merge weights {list(weights)} give λ={lam} outside [0, 1].")
        lambdas.append(lam)
    if total == 0:
        raise ValueError(f"merge weights {list(weights)} sum to zero; give at least one positive weight.")
    return lambdas


def combine(
    init: torch.Tensor,
    models: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    init_coefficient: float | None = None,
) -> torch.Tensor:
    """(1 - sum c) * init + sum_m c_m * theta_m in the dtype of the inputs (call it with fp32/fp64 tensors);
    `init_coefficient` replaces 1 - sum c where a method weighs the init otherwise (unnormalized linear).

    Written over the weights, not the task vectors, so λ = 0 and λ = 1 reproduce the inputs bit for bit
    (0 * init + 1 * theta_m), which init + (theta_m - init) does not in floating point.
    """
    out = init * (1.0 - math.fsum(coefficients) if init_coefficient is None else init_coefficient)
    for theta, coef in zip(models, coefficients, strict=True):
        if coef != 0.0:
            out.add_(theta, alpha=coef)
    return out


def gram_matrix(d: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """G = d @ d^T in float64 for task vectors d of shape (M, n).

    One float32 dot product over millions of elements loses ~1e-5 relative accuracy (about 1e-3 degrees
    of angle); partial Gram matrices over blocks of 4096 elements, added in float64, stay within ~1e-7
    at float32 speed.
    """
    m, n = d.shape
    full = n - n % block
    blocks = d[:, :full].reshape(m, full // block, block).transpose(0, 1)  # (n / block, M, block)
    g = torch.bmm(blocks, blocks.transpose(1, 2)).to(torch.float64).sum(0)
    tail = d[:, full:].to(torch.float64)
    return (g + tail @ tail.T).cpu()


def check_states(init: State, models: Sequence[State]) -> None:
    """At least two models, each with the init's tensor names and shapes."""
    if len(models) < 2:
        raise ValueError(f"a merge needs at least 2 models, got {len(models)}.")
    for i, state in enumerate(models):
        check_same_tensors(_shapes(init), _shapes(state), f"model {i}", "the init")


def _shapes(state: State) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in state.items()}


def task_vector(init: State, policy: State, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """τ = policy - init for every floating tensor, computed in `dtype` (float32 or float64)."""
    check_states(init, [policy, policy])
    return {n: policy[n].to(dtype) - t.to(dtype) for n, t in init.items() if t.is_floating_point()}


def _merge(
    init: State,
    models: Sequence[State],
    coefficients_of,
    granularity: Granularity,
    dtype: torch.dtype | None,
    compute_dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, GroupStats]]:
    check_states(init, models)
    groups: dict[str, list[str]] = {}
    for name, t in init.items():
        if t.is_floating_point():
            groups.setdefault(group_key(name, granularity), []).append(name)
    out: dict[str, torch.Tensor] = {n: t.clone() for n, t in init.items() if not t.is_floating_point()}
    stats: dict[str, GroupStats] = {}
    for group, names in groups.items():
        gram = torch.zeros(len(models), len(models), dtype=torch.float64)
        for name in names:
            base = init[name].to(compute_dtype).flatten()
            d = torch.stack([s[name].to(compute_dtype).flatten() - base for s in models])
            if not torch.isfinite(d).all():
                raise ValueError(f"{name}: NaN or Inf in the init or a model; refusing to merge it.")
            gram += gram_matrix(d)
        numel = sum(init[n].numel() for n in names)
        stats[group] = coefficients_of(gram, numel)
        for name in names:
            merged = combine(
                init[name].to(compute_dtype),
                [s[name].to(compute_dtype) for s in models],
                stats[group].coefficients,
                stats[group].init_coefficient,
            )
            out[name] = merged.to(dtype or init[name].dtype)  # the one cast to the output dtype
    return {n: out[n] for n in init}, stats


def slerp(
    init: State,
    models: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    granularity: Granularity = "block",
    allow_extrapolation: bool = False,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, GroupStats]]:
    """WARP stage 2: SLERP of the models' task vectors relative to `init`, M >= 2 by the paper's recursion.

    weights: one per model (uniform by default, i.e. λ_k = 1/k); the two-model λ is weights (1 - λ, λ).
    granularity: one angle Ω per `block` (transformer layer, default: the paper merges "layer by layer,
    each having a different angle", and a layer's tensors move together), per `tensor`, or per `model`.
    dtype: output dtype (default: each tensor keeps the init's). Returns (merged state, stats per group).
    """
    lambdas = merge_lambdas(
        list(weights) if weights is not None else [1.0] * len(models), allow_extrapolation=allow_extrapolation
    )
    return _merge(
        init, models, lambda g, n: slerp_coefficients(g, lambdas, n), granularity, dtype, compute_dtype
    )


def lerp(
    init: State,
    models: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    granularity: Granularity = "block",
    allow_extrapolation: bool = False,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, GroupStats]]:
    """Linear interpolation of task vectors: init + sum_m (w_m / sum w) d_m (uniform weights by default).

    The baseline SLERP is compared with: at Ω = 90° it shrinks the task vector by 1/sqrt(2). Stats carry
    the same per-group geometry as `slerp` (granularity only changes how they are grouped).
    """
    w = list(weights) if weights is not None else [1.0] * len(models)
    merge_lambdas(w, allow_extrapolation=allow_extrapolation)  # same validation as SLERP
    return _merge(init, models, lambda g, n: lerp_coefficients(g, w, n), granularity, dtype, compute_dtype)


def check_eta(
    eta: float | Sequence[float],
    allow_extrapolation: bool,
    *,
    name: str = "liti_eta",
    fix: str = "pass allow_extrapolation=True (CLI: --allow-extrapolation)",
) -> None:
    """LITI's η: finite, >= 0 (always: η < 0 is refused without suggesting a flag), and <= 1 unless
    extrapolating (η > 1, as ExPO) is allowed explicitly.

    One value (`name` = `liti_eta`: "liti_eta=2.0 is outside [0, 1] ...") or a list of them (e.g. a
    frontier's `liti.etas`: "liti.etas [1.5] are outside [0, 1] ...", every bad value listed); `fix` says
    how to allow extrapolation where the value was given (a keyword, a CLI flag, a YAML field).
    """
    many = isinstance(eta, Sequence)
    values = list(eta) if many else [eta]
    if not all(math.isfinite(e) for e in values):
        raise ValueError(f"{name} must be finite, got {eta}.")
    bad = [e for e in values if not (e >= 0 and (e <= 1 or allow_extrapolation))]
    if bad:
        subject = f"{name} {bad} are" if many else f"{name}={eta} is"
        if any(e < 0 for e in bad):  # no setting allows it: suggest none
            raise ValueError(
                f"{subject} outside [0, 1]: eta < 0 moves away from the merge, past the init, which no setting "
                f"allows; use {'values' if many else 'a value'} in [0, 1] (0 keeps the init, 1 the merge)."
            )
        raise ValueError(
            f"{subject} outside [0, 1]. eta > 1 extrapolates past the merge (as in ExPO); {fix} if that is "
            "what you want."
        )


def liti(
    init: State, merged: State, eta: float, *, allow_extrapolation: bool = False
) -> dict[str, torch.Tensor]:
    """LITI, WARP stage 3: theta_eta = (1 - eta) * init + eta * merged, tensor by tensor.

    eta (η) = 0 returns init, 1 returns merged; the paper uses 0.3 for the next iteration's init.
    Shapes: every tensor of `merged` has the shape of the same-named tensor of `init`.
    """
    check_eta(eta, allow_extrapolation)
    check_same_tensors(_shapes(init), _shapes(merged), "merged", "init")
    out = {}
    for name, a in init.items():
        b = merged[name]
        if not a.is_floating_point():
            out[name] = a.clone()
            continue
        a32, b32 = a.float(), b.float()
        out[name] = torch.lerp(a32, b32, eta).to(a.dtype)
    return out


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """theta(w) = sum_m w_m theta_m, tensor by tensor: the rewarded soup (Ramé et al. 2023) of M states.

    Accumulated in float64 and cast once to each tensor's dtype (that of ``states[0]``), so w = e_m returns
    theta_m bit for bit. Integer and bool tensors are copied from ``states[0]``. Weights are used as given
    (callers check the simplex); shapes: ``len(weights) == len(states)``, every state has the same names
    and shapes.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(
            f"weighted_average needs one weight per state, got {len(weights)} for {len(states)}."
        )
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        check_same_tensors(_shapes(first), _shapes(state), f"state {i}", "state 0")
    out = {}
    for name, t in first.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        acc = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for w, state in zip(weights, states, strict=True):
            acc.add_(state[name].to(torch.float64), alpha=float(w))
        out[name] = acc.to(t.dtype)
    return out

"""Merge rules that need only the Gram matrix G[i, j] = <d_i, d_j> of a group's task vectors d_m = theta_m - init.

Each returns a `GroupStats` whose `coefficients` c_m define merged = init + sum_m c_m d_m (or, with
`init_coefficient`, merged = c_0 init + sum_m c_m theta_m), so a merge of any size streams in two passes:
one accumulates G per group, the other writes the combination (`warpkit.merge.stream`). Pure torch, float64.

- `slerp_coefficients`: WARP's SLERP (Ramé et al. 2024), the paper's recursion for M > 2;
- `lerp_coefficients`: LERP of task vectors (Wortsman et al. 2022);
- `linear_coefficients`: a (normalised) weighted average of the weights themselves (model soups);
- `task_arithmetic_coefficients`: init + scale * sum w d (Ilharco et al. 2023; negative w negate);
- `model_stock_coefficients`: Model Stock (Jang et al. 2024);
- `karcher_coefficients`: the weighted spherical (Karcher) mean of the task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "SIN_EPS",
    "GroupStats",
    "cosines",
    "group_stats",
    "karcher_coefficients",
    "lerp_coefficients",
    "linear_coefficients",
    "model_stock_coefficients",
    "slerp_coefficients",
    "stats_to_log",
    "task_arithmetic_coefficients",
]

# sin(Ω) below this means parallel or anti-parallel task vectors: SLERP is 0/0 there, LERP is its limit
# at Ω -> 0 and the only bounded choice at Ω -> π.
SIN_EPS = 1e-6


@dataclass
class GroupStats:
    """Geometry of one group's task vectors, for logging (keys `merge/<group>/...` via `stats_to_log`).

    norms[m] = |d_m|; cosines[i][j] = cos(d_i, d_j); angles_deg[k-2] = Ω between slerp_{k-1} and d_k at
    recursion step k (one entry for two models); modes[k-2] = "slerp", "lerp:parallel" or "lerp:zero";
    merged_norm = |merged task vector|; coefficients c_m with merged = init + sum_m c_m d_m.
    """

    numel: int
    norms: list[float]
    cosines: list[list[float]]
    angles_deg: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    merged_norm: float = 0.0
    coefficients: list[float] = field(default_factory=list)
    # merged = init_coefficient * init + sum_m c_m theta_m; None means 1 - sum c (a merge of task vectors)
    init_coefficient: float | None = None


def cosines(gram: torch.Tensor) -> list[list[float]]:
    """cos(d_i, d_j) from the Gram matrix G = [<d_i, d_j>] (M x M); 0 where a vector is zero."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram)).clamp(-1, 1)
    return cos.tolist()


def group_stats(
    gram: torch.Tensor, coefficients: Sequence[float], numel: int, init_coefficient: float | None = None
) -> GroupStats:
    """The stats of a merge init + sum_m c_m d_m of one group: norms and cosines from G, |merged| = sqrt(c^T G c)."""
    g = gram.to(torch.float64)
    c = torch.tensor(list(coefficients), dtype=torch.float64)
    s = GroupStats(numel=numel, norms=g.diagonal().clamp_min(0).sqrt().tolist(), cosines=cosines(g))
    s.coefficients = c.tolist()
    s.merged_norm = max(float(c @ g @ c), 0.0) ** 0.5
    s.init_coefficient = init_coefficient
    return s


def slerp_coefficients(gram: torch.Tensor, lambdas: Sequence[float], numel: int = 0) -> GroupStats:
    """Run WARP's SLERP recursion on a Gram matrix G = [<d_i, d_j>] (M x M) of one group, in float64.

    The accumulated task vector a = sum_m c_m d_m has |a|^2 = c^T G c and <a, d_k> = (G c)_k, so each
    step needs only G. Returns the group's stats, whose `coefficients` give merged = init + sum c_m d_m.
    """
    g = gram.to(torch.float64)
    m = g.shape[0]
    if g.shape != (m, m) or len(lambdas) != m - 1:
        raise ValueError(f"Gram matrix {tuple(g.shape)} does not match {len(lambdas)} lambdas.")
    c = torch.zeros(m, dtype=torch.float64)
    c[0] = 1.0
    stats = GroupStats(numel=numel, norms=g.diagonal().clamp_min(0).sqrt().tolist(), cosines=cosines(g))
    for k, lam in enumerate(lambdas, start=1):
        e_k = torch.zeros(m, dtype=torch.float64)
        e_k[k] = 1.0
        norm_a = float(c @ g @ c) ** 0.5 if float(c @ g @ c) > 0 else 0.0
        norm_b = float(g[k, k]) ** 0.5 if float(g[k, k]) > 0 else 0.0
        if norm_a == 0.0 or norm_b == 0.0:
            c, mode, omega = (1 - lam) * c + lam * e_k, "lerp:zero", float("nan")
        else:
            cos = max(-1.0, min(1.0, float(g[k] @ c) / (norm_a * norm_b)))  # clamp: roundoff can exceed 1
            omega = math.acos(cos)
            sin = math.sin(omega)
            if sin < SIN_EPS:
                c, mode = (1 - lam) * c + lam * e_k, "lerp:parallel"
            else:
                # ---- WARP's SLERP: sin((1-λ)Ω)/sin(Ω) * a + sin(λΩ)/sin(Ω) * d_k ----
                c = math.sin((1 - lam) * omega) / sin * c + math.sin(lam * omega) / sin * e_k
                mode = "slerp"
        stats.angles_deg.append(math.degrees(omega))
        stats.modes.append(mode)
    stats.coefficients = c.tolist()
    stats.merged_norm = max(float(c @ g @ c), 0.0) ** 0.5
    return stats


def lerp_coefficients(gram: torch.Tensor, weights: Sequence[float], numel: int = 0) -> GroupStats:
    """LERP of task vectors: merged = init + sum_m (w_m / sum w) d_m; stats from the same Gram matrix."""
    total = float(sum(weights))
    if total == 0:
        raise ValueError(f"merge weights {list(weights)} sum to zero; LERP needs a non-zero sum.")
    return group_stats(gram, [w / total for w in weights], numel)


def linear_coefficients(
    gram: torch.Tensor, weights: Sequence[float], numel: int = 0, *, normalize: bool = True
) -> GroupStats:
    """Weighted average of the weights: sum_m w_m theta_m / sum_m w_m (normalize) or sum_m w_m theta_m.

    Example: weights (1, 3), normalized: theta = 0.25 theta_1 + 0.75 theta_2. Unnormalized weights (1, 1)
    give theta_1 + theta_2 (init coefficient 0, not 1 - sum c). A zero weight sum cannot be normalized.
    """
    if not normalize:
        return group_stats(gram, list(weights), numel, init_coefficient=0.0)
    total = math.fsum(weights)
    if abs(total) < 1e-12:
        raise ValueError(
            f"linear weights {list(weights)} sum to zero: cannot normalize; pass normalize=False."
        )
    return group_stats(gram, [w / total for w in weights], numel)


def task_arithmetic_coefficients(
    gram: torch.Tensor, weights: Sequence[float], numel: int = 0, *, scale: float = 1.0
) -> GroupStats:
    """Task arithmetic (Ilharco et al. 2023): init + scale * sum_m w_m d_m; negative w_m negate (unlearn).

    Example: weights (1, -0.5), scale 1: init + d_1 - 0.5 d_2. Weights are not normalized.
    """
    return group_stats(gram, [scale * w for w in weights], numel)


def model_stock_coefficients(gram: torch.Tensor, numel: int = 0) -> GroupStats:
    """Model Stock (Jang et al. 2024): init + t * mean_m d_m, t = k cos / (1 + (k - 1) cos), clamped to [0, 1].

    cos is the mean pairwise cosine of the k >= 2 task vectors in the group (a pair with a zero vector
    counts as cos 0). Example: k = 2, cos = 0.5: t = 1 / 1.5 = 2/3, so c = (1/3, 1/3). At cos ~ 0 (WARP's
    independent RL runs) t ~ 0: it undoes the update, which is why WARP does not use it for LITI.
    """
    k = gram.shape[0]
    if k < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tunes, got {k}.")
    cos = torch.tensor(cosines(gram.to(torch.float64)))
    mean_cos = float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))
    denom = 1 + (k - 1) * mean_cos
    t = 0.0 if denom <= 0 else min(1.0, max(0.0, k * mean_cos / denom))
    stats = group_stats(gram, [t / k] * k, numel)
    stats.angles_deg = [math.degrees(math.acos(max(-1.0, min(1.0, mean_cos))))]
    return stats


def karcher_coefficients(
    gram: torch.Tensor, weights: Sequence[float] | None = None, numel: int = 0, *, iters: int = 100
) -> GroupStats:
    """Weighted spherical (Karcher) mean of M task vectors, by tangent-space iteration on the unit sphere.

    Direction: the point x minimizing sum_m w_m angle(x, d_m)^2; norm: sum_m w_m |d_m| / sum w. Run in
    the span of the d_m using G only. For two vectors of equal norm and equal weights it is WARP's SLERP
    at λ = 1/2. Zero task vectors carry no direction and are left out (their weight too); all zero: init.
    """
    g = gram.to(torch.float64)
    m = g.shape[0]
    w = torch.tensor(list(weights) if weights is not None else [1.0] * m, dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"karcher weights must be >= 0 with a positive sum, got {w.tolist()}.")
    norms = g.diagonal().clamp_min(0).sqrt()
    live = norms > 0
    if not live.any() or w[live].sum() <= 0:
        return group_stats(gram, [0.0] * m, numel)
    w = torch.where(live, w, torch.zeros_like(w))
    w = w / w.sum()
    safe = torch.where(live, norms, torch.ones_like(norms))
    u = g / (safe[:, None] * safe[None, :])  # Gram of the unit vectors u_m (rows of dead ones unused)
    x = w.clone()  # coefficients over u: start at the normalized weighted chord mean
    for _ in range(iters):
        nx = float(x @ u @ x) ** 0.5
        if nx == 0:  # e.g. two anti-parallel vectors: no unique mean, fall back to the chord (LERP)
            break
        x = x / nx
        cos = (u @ x).clamp(-1, 1)
        theta = torch.arccos(cos)
        factor = torch.where(
            theta > 1e-12, theta / torch.sin(theta).clamp_min(1e-300), torch.ones_like(theta)
        )
        v = torch.zeros(m, dtype=torch.float64)
        for i in range(m):
            if live[i]:
                e = torch.zeros(m, dtype=torch.float64)
                e[i] = 1.0
                v += w[i] * factor[i] * (e - cos[i] * x)  # log map of u_i at x
        nv = float(v @ u @ v) ** 0.5
        if nv < 1e-13:
            break
        x = math.cos(nv) * x + math.sin(nv) / nv * v  # exp map
    nx = float(x @ u @ x) ** 0.5
    radius = float((w * norms).sum())
    coefs = torch.where(live, x / max(nx, 1e-300) * radius / safe, torch.zeros_like(x)) if nx > 0 else w * 0
    stats = group_stats(gram, coefs.tolist(), numel)
    return stats


def stats_to_log(stats: Mapping[str, GroupStats], prefix: str = "merge") -> dict[str, float]:
    """Flatten per-group stats to scalar metrics: `merge/<group>/angle_deg`, `.../cos`, `.../norm_<m>`."""
    log: dict[str, float] = {}
    for group, s in stats.items():
        key = f"{prefix}/{group}"
        if s.angles_deg:
            log[f"{key}/angle_deg"] = s.angles_deg[-1]
        if len(s.norms) >= 2:
            log[f"{key}/cos"] = s.cosines[0][1]
        for m, norm in enumerate(s.norms):
            log[f"{key}/norm_{m}"] = norm
        log[f"{key}/merged_norm"] = s.merged_norm
    return log

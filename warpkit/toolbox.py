"""The merge toolbox beside WARP's SLERP: task arithmetic, TIES, DARE, NegMerge, Model Stock, Karcher mean.

Pure torch, no transformers import. Two kinds of method, matching the two ways `merge_io` streams:

- Coefficient methods decide, from a group's Gram matrix G[i, j] = <d_i, d_j> alone, one coefficient c_m
  per model, and the merge is init + sum_m c_m d_m: `linear`, `task_arithmetic`, `model_stock`, `karcher`
  (like `warpkit.merge.slerp_coefficients`). They return a `GroupStats`.
- Element-wise methods need the task vectors themselves, tensor by tensor: `ties`, `dare`, `negmerge`
  map d (M, n) to one merged task vector (n,).

d_m = theta_m - init throughout; weights w_m are one per model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from warpkit.merge import GroupStats, _cosines

__all__ = [
    "ELEMENTWISE",
    "TopKByMagnitude",
    "combine_chunk",
    "dare",
    "dare_generator",
    "elementwise_task_vector",
    "karcher_coefficients",
    "linear_coefficients",
    "model_stock_coefficients",
    "negmerge",
    "task_arithmetic_coefficients",
    "ties",
    "trim_count",
    "trim_top_density",
]


def _stats(
    gram: torch.Tensor, coefficients: Sequence[float], numel: int, init_coefficient=None
) -> GroupStats:
    g = gram.to(torch.float64)
    c = torch.tensor(list(coefficients), dtype=torch.float64)
    s = GroupStats(numel=numel, norms=g.diagonal().clamp_min(0).sqrt().tolist(), cosines=_cosines(g))
    s.coefficients = c.tolist()
    s.merged_norm = max(float(c @ g @ c), 0.0) ** 0.5
    s.init_coefficient = init_coefficient
    return s


def linear_coefficients(
    gram: torch.Tensor, weights: Sequence[float], numel: int = 0, *, normalize: bool = True
) -> GroupStats:
    """Weighted average of the weights: sum_m w_m theta_m / sum_m w_m (normalize) or sum_m w_m theta_m.

    Example: weights (1, 3), normalized: theta = 0.25 theta_1 + 0.75 theta_2. Unnormalized weights (1, 1)
    give theta_1 + theta_2 (init coefficient 0, not 1 - sum c). A zero weight sum cannot be normalized.
    """
    if not normalize:
        return _stats(gram, list(weights), numel, init_coefficient=0.0)
    total = math.fsum(weights)
    if abs(total) < 1e-12:
        raise ValueError(
            f"linear weights {list(weights)} sum to zero: cannot normalize; pass normalize=False."
        )
    return _stats(gram, [w / total for w in weights], numel)


def task_arithmetic_coefficients(
    gram: torch.Tensor, weights: Sequence[float], numel: int = 0, *, scale: float = 1.0
) -> GroupStats:
    """Task arithmetic (Ilharco et al. 2023): init + scale * sum_m w_m d_m; negative w_m negate (unlearn).

    Example: weights (1, -0.5), scale 1: init + d_1 - 0.5 d_2. Weights are not normalized.
    """
    return _stats(gram, [scale * w for w in weights], numel)


def model_stock_coefficients(gram: torch.Tensor, numel: int = 0) -> GroupStats:
    """Model Stock (Jang et al. 2024): init + t * mean_m d_m, t = k cos / (1 + (k - 1) cos), clamped to [0, 1].

    cos is the mean pairwise cosine of the k >= 2 task vectors in the group (a pair with a zero vector
    counts as cos 0). Example: k = 2, cos = 0.5: t = 1 / 1.5 = 2/3, so c = (1/3, 1/3). At cos ~ 0 (WARP's
    independent RL runs) t ~ 0: it undoes the update, which is why WARP does not use it for LITI.
    """
    k = gram.shape[0]
    if k < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tunes, got {k}.")
    cos = torch.tensor(_cosines(gram.to(torch.float64)))
    mean_cos = float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))
    denom = 1 + (k - 1) * mean_cos
    t = 0.0 if denom <= 0 else min(1.0, max(0.0, k * mean_cos / denom))
    stats = _stats(gram, [t / k] * k, numel)
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
        return _stats(gram, [0.0] * m, numel)
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
    stats = _stats(gram, coefs.tolist(), numel)
    return stats


# ----------------------------------------------------------------------------- element-wise


def _keep_mask(d: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per row of d (M, n), a bool mask of its k = `trim_count(n, density)` largest magnitudes, exactly k
    even when magnitudes tie at the threshold (common in bf16): the tied entries are taken in index
    order. None means keep everything."""
    n = d.shape[-1]
    k = trim_count(n, density)
    if k == n:
        return None
    if k == 0:
        return torch.zeros(d.shape, dtype=torch.bool, device=d.device)
    masks = []
    for row in d:
        magnitude = row.abs()
        # the k-th largest magnitude by selection (3x faster than topk at k ~ n/2)
        threshold = magnitude.kthvalue(n - k + 1).values
        keep = magnitude > threshold
        tied = (magnitude == threshold).nonzero().flatten()
        keep[tied[: k - int(keep.sum())]] = True
        masks.append(keep)
    return torch.stack(masks)


def trim_top_density(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) largest-magnitude entries of each row of d (M, n), zero the rest.

    density 1 keeps everything, 0 nothing. For 0 < density * n < 1 one entry is kept, so a small density
    never drops a whole task vector (mergekit's gap). Exactly k entries, ties at the threshold included.
    """
    keep = _keep_mask(d, density)
    return d.clone() if keep is None else torch.where(keep, d, 0.0)


def _ties_block(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    elected = torch.sign((w * t).sum(0))
    agree = (torch.sign(t) == elected) & (t != 0)
    mass = (w * t * agree).sum(0)
    count = (w * agree).sum(0)
    return torch.where(count != 0, mass / torch.where(count != 0, count, torch.ones_like(count)), 0.0)


def ties(
    d: torch.Tensor, weights: Sequence[float], density: float = 1.0, *, block: int = 1 << 16
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign by total mass, disjoint (weighted) mean.

    d: (M, n) task vectors of one tensor; returns (n,). An entry whose signed mass sum_m w_m t_m is exactly
    0 (a sign tie) keeps the init (0). Hand example, d_1 = [3, -1, 2], d_2 = [-2, -2, 1], density 2/3 (keep
    2 of 3), unit weights: t_1 = [3, 0, 2], t_2 = [-2, -2, 0]; mass [1, -2, 2] elects [+, -, +]; the agreeing
    entries give [3, -2, 2]. The trim needs the whole tensor; the rest runs in cache-sized blocks.
    """
    w = torch.tensor(list(weights), dtype=d.dtype, device=d.device)[:, None]
    keep = _keep_mask(d, density)
    out = torch.empty(d.shape[1], dtype=d.dtype, device=d.device)
    for start in range(0, d.shape[1], block):
        part = d[:, start : start + block]
        t = part if keep is None else torch.where(keep[:, start : start + block], part, 0.0)
        out[start : start + block] = _ties_block(t, w)
    return out


def dare_generator(seed: int, name: str, model: int) -> torch.Generator:
    """A CPU generator seeded by (seed, tensor name, model index): the same mask on any device or order."""
    digest = hashlib.sha256(f"{seed}:{name}:{model}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(d: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability 1 - p, rescale the kept ones by 1/p.

    p = density is the keep probability, so E[dare(d)] = d. p = 1 returns d, p = 0 returns zeros.
    Example: d = [2, 4], mask [1, 0], p = 0.5: [4, 0].
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density} is the keep probability and must be in [0, 1].")
    if density == 1.0:
        return d.clone()
    if density == 0.0:
        return torch.zeros_like(d)
    keep = torch.rand(d.shape, generator=generator) < density
    return d * keep.to(d.device) / density


def negmerge(d: torch.Tensor) -> torch.Tensor:
    """NegMerge's consensus (Kim et al. 2024): the mean task vector where every d_m has the same non-zero
    sign, 0 elsewhere. The caller negates and scales it: init - scale * negmerge(d).

    Example: d_1 = [1, -2, 3], d_2 = [3, -4, -1]: signs agree on entries 0 and 1: [2, -3, 0].
    """
    s = torch.sign(d)
    consensus = (s == s[0]).all(0) & (s[0] != 0)
    return torch.where(consensus, d.mean(0), 0.0)


ELEMENTWISE: tuple[str, ...] = ("ties", "dare_linear", "dare_ties", "negmerge")


def combine_chunk(
    method: str,
    d: torch.Tensor,
    weights: Sequence[float],
    *,
    keep: torch.Tensor | None = None,
    density: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """The merged task vector (n,) of a chunk of task vectors d (M, n) for an element-wise method.

    Every method is element-wise once TIES's trim mask `keep` (M, n) is known (None: keep all), so a
    tensor can be merged chunk by chunk. DARE draws its mask from `generators` (one per model), consumed
    in order: chunks of one tensor taken in row order draw exactly the numbers one whole-tensor draw
    would, so the result does not depend on the chunk size.
    ties: the disjoint mean of the trimmed vectors. dare_linear: sum_m w_m dare(d_m). dare_ties: TIES
    without trimming on the DARE'd vectors. negmerge: -negmerge(d) (negation built in; weights unused).
    """
    w = torch.tensor(list(weights), dtype=d.dtype, device=d.device)[:, None]
    if method == "ties":
        return _ties_block(d if keep is None else torch.where(keep, d, 0.0), w)
    if method in ("dare_linear", "dare_ties"):
        if generators is None or len(generators) != d.shape[0]:
            raise ValueError("dare needs one generator per model (see dare_generator).")
        dropped = torch.stack([dare(d[m], density, generators[m]) for m in range(d.shape[0])])
        return _ties_block(dropped, w) if method == "dare_ties" else (w * dropped).sum(0)
    if method == "negmerge":
        return -negmerge(d)
    raise ValueError(f"{method!r} is not an element-wise method {ELEMENTWISE}.")


def elementwise_task_vector(
    method: str, d: torch.Tensor, weights: Sequence[float], *, density: float, seed: int, name: str
) -> torch.Tensor:
    """The merged task vector (n,) of one whole tensor's task vectors d (M, n); see `combine_chunk`.

    TIES trims each row of d to its own top density (per tensor); DARE's masks come from
    `dare_generator(seed, name, m)`.
    """
    if method == "ties":
        return ties(d, weights, density)
    generators = [dare_generator(seed, name, m) for m in range(d.shape[0])]
    return combine_chunk(method, d, weights, density=density, generators=generators)


# ----------------------------------------------------------------------------- streamed top-k


def _key_dtype(dtype: torch.dtype) -> torch.dtype:
    keys = {torch.float32: torch.int32, torch.float64: torch.int64}
    if dtype not in keys:
        raise ValueError(f"top-k selection runs on float32 or float64 task vectors, got {dtype}.")
    return keys[dtype]


class TopKByMagnitude:
    """Exactly the k_m largest |d_m| entries of each model m, over data seen in chunks, in passes.

    TIES trims each task vector to its top `density` fraction by magnitude. Over the whole model (the
    paper's own trim) that needs the k-th largest of billions of entries without holding them: a radix
    select. A non-negative IEEE float orders like its bit pattern read as an integer, so each pass
    histograms the next 16 bits of the keys that share the prefix found so far: float32 takes 2 passes,
    float64 4, and memory is 65536 counts per model. The result is a threshold key T_m with
    `above_m` entries strictly above it and `ties_m` = k_m - above_m entries equal to it still to keep;
    `keep` takes those in the order the chunks are shown (tensor order, then index order), exactly as
    `trim_top_density` does within one tensor.

    Usage: for each pass in range(self.passes): call `observe(d)` on every chunk (M, n), then
    `end_pass()`. Then `keep(d)` on every chunk, in the same order, gives the (M, n) bool mask.
    Example, one model, two tensors [3, -1] and [2, -5, 3], k = 3 over the whole model: the magnitudes
    sorted are 5, 3, 3, 2, 1; the threshold is 3 with one entry above it (-5) and two tied at it, both
    kept: masks [1, 0] and [0, 1, 1]. With k = 2 only the first tied 3 (tensor one) is kept: [1, 0],
    [0, 1, 0]. A per-tensor trim at the same density 2/5 would keep one entry of each tensor instead.
    """

    DIGIT = 16

    def __init__(self, k: Sequence[int], dtype: torch.dtype = torch.float32):
        self.k = [int(x) for x in k]
        if any(x < 0 for x in self.k):
            raise ValueError(f"k={self.k} must be >= 0.")
        self.key_dtype = _key_dtype(dtype)
        bits = torch.iinfo(self.key_dtype).bits
        self.shifts = list(range(bits - self.DIGIT, -1, -self.DIGIT))
        self.passes = len(self.shifts)
        self.pass_index = 0
        self.prefix = [0] * len(self.k)  # the digits of the threshold key found so far
        self.remaining = list(self.k)  # entries still to find at or below the current prefix
        self.hist = torch.zeros(len(self.k), 1 << self.DIGIT, dtype=torch.int64)
        self.ties_left: list[int] | None = None

    def _keys(self, d: torch.Tensor) -> torch.Tensor:
        return d.abs().contiguous().view(self.key_dtype)

    def observe(self, d: torch.Tensor) -> None:
        """Count the chunk d (M, n) into this pass's histograms."""
        if self.pass_index >= self.passes:
            raise RuntimeError("all selection passes are done; call keep().")
        keys, shift = self._keys(d), self.shifts[self.pass_index]
        for m, key in enumerate(keys):
            if self.remaining[m] <= 0:
                continue
            if self.pass_index > 0:  # only keys under the prefix found by the previous passes
                key = key[(key >> (shift + self.DIGIT)) == self.prefix[m]]
            digit = ((key >> shift) & ((1 << self.DIGIT) - 1)).long()
            self.hist[m] += torch.bincount(digit.cpu(), minlength=1 << self.DIGIT)

    def end_pass(self) -> None:
        """Fix the next digit of each threshold: the bucket where the count from the top reaches k."""
        for m in range(len(self.k)):
            if self.remaining[m] <= 0:
                continue
            counts = self.hist[m].flip(0)  # from the largest digit down
            total = counts.cumsum(0)
            if int(total[-1]) < self.remaining[m]:
                raise ValueError(f"k={self.k[m]} is larger than the number of entries seen.")
            index = int(torch.searchsorted(total, self.remaining[m]))  # first bucket reaching k
            above = int(total[index] - counts[index])
            self.remaining[m] -= above
            self.prefix[m] = (self.prefix[m] << self.DIGIT) | ((1 << self.DIGIT) - 1 - index)
        self.hist.zero_()
        self.pass_index += 1
        if self.pass_index == self.passes:
            self.ties_left = list(self.remaining)

    def keep(self, d: torch.Tensor) -> torch.Tensor:
        """The (M, n) mask of the chunk's kept entries; chunks must come in the order they were observed."""
        if self.ties_left is None:
            raise RuntimeError(f"keep() before the {self.passes} selection passes are done.")
        keys = self._keys(d)
        mask = torch.zeros(keys.shape, dtype=torch.bool, device=d.device)
        for m, key in enumerate(keys):
            if self.k[m] == 0:
                continue
            threshold = torch.tensor(self.prefix[m], dtype=self.key_dtype, device=d.device)
            mask[m] = key > threshold
            if self.ties_left[m] > 0:
                tied = (key == threshold).nonzero().flatten()[: self.ties_left[m]]
                mask[m, tied] = True
                self.ties_left[m] -= int(tied.numel())
        return mask


def trim_count(numel: int, density: float) -> int:
    """k = round(density * numel) entries kept by a trim, at least 1 when density > 0 (so a small density
    never drops a whole task vector, mergekit's gap), 0 at density 0."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density} must be in [0, 1] (the fraction of entries kept).")
    if density == 0.0 or numel == 0:
        return 0
    return min(numel, max(1, round(density * numel)))

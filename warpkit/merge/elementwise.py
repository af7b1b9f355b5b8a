"""Element-wise merge rules: TIES, DARE and NegMerge map the task vectors d (M, n) of a tensor, or of a chunk
of its rows, to one merged task vector (n,). Pure torch, no transformers import.

Each method has one chunk function with the signature the streaming engine calls (`warpkit.merge.stream`),

    combine(d, w, *, keep, density, generators) -> merged (n,)      d = theta_m - init, w (M, 1) weights

where `keep` (M, n) is TIES's trim mask (None: keep all) and `generators` DARE's per-model random streams.
Every method is element-wise once TIES's mask is known, so tensors merge chunk by chunk; the mask's
threshold comes from `TopKByMagnitude`, an exact streamed top-k. The in-memory functions `ties`, `dare`
and `negmerge` are the same rules on a whole tensor, with hand examples in their docstrings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = [
    "TopKByMagnitude",
    "dare",
    "dare_generator",
    "dare_linear_chunk",
    "dare_ties_chunk",
    "keep_mask",
    "negmerge",
    "negmerge_chunk",
    "ties",
    "ties_chunk",
    "trim_count",
    "trim_top_density",
]


# ----------------------------------------------------------------------------- element-wise


def keep_mask(d: torch.Tensor, density: float) -> torch.Tensor | None:
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
    keep = keep_mask(d, density)
    return d.clone() if keep is None else torch.where(keep, d, 0.0)


def disjoint_mean(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TIES's elect-and-average of trimmed vectors t (M, n), weights w (M, 1): the sign of sum_m w_m t_m is
    elected per entry and the entries agreeing with it are averaged (weighted); a sign tie (mass exactly 0)
    keeps the init, i.e. 0."""
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
    keep = keep_mask(d, density)
    out = torch.empty(d.shape[1], dtype=d.dtype, device=d.device)
    for start in range(0, d.shape[1], block):
        part = d[:, start : start + block]
        t = part if keep is None else torch.where(keep[:, start : start + block], part, 0.0)
        out[start : start + block] = disjoint_mean(t, w)
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


# ----------------------------------------------------------------------------- chunk functions
# One per method, all with the signature the streaming engine calls; the registry (`warpkit.merge.methods`)
# names them. d (M, n) task vectors of a chunk, w (M, 1) weights in d's dtype.


def ties_chunk(d: torch.Tensor, w: torch.Tensor, *, keep: torch.Tensor | None, **_) -> torch.Tensor:
    """TIES on a chunk: the disjoint mean of the trimmed task vectors (`keep` is the trim mask)."""
    return disjoint_mean(d if keep is None else torch.where(keep, d, 0.0), w)


def _dropped(d: torch.Tensor, density: float, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None or len(generators) != d.shape[0]:
        raise ValueError("dare needs one generator per model (see dare_generator).")
    return torch.stack([dare(d[m], density, generators[m]) for m in range(d.shape[0])])


def dare_linear_chunk(d: torch.Tensor, w: torch.Tensor, *, density: float, generators, **_) -> torch.Tensor:
    """DARE then a weighted sum: sum_m w_m dare(d_m). Masks drawn from `generators` in row order, so chunks
    taken in row order draw exactly what one whole-tensor draw would (the result ignores the chunk size)."""
    return (w * _dropped(d, density, generators)).sum(0)


def dare_ties_chunk(d: torch.Tensor, w: torch.Tensor, *, density: float, generators, **_) -> torch.Tensor:
    """DARE then TIES without trimming: the disjoint mean of the DARE'd task vectors."""
    return disjoint_mean(_dropped(d, density, generators), w)


def negmerge_chunk(d: torch.Tensor, w: torch.Tensor, **_) -> torch.Tensor:
    """-negmerge(d): NegMerge's consensus, negated (the engine then scales it); weights unused."""
    return -negmerge(d)


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

"""The Fuse-to-Forget metrics as pure math over per-text numbers and named tensors (no model, no I/O).

Notation (Zaman et al. 2023, "Fuse to Forget", arXiv 2311.07682): a probe set D of N texts x; a model θ
and the reference θ_ref the ratios are taken against (usually the init the models were fine-tuned from);
for a text x = (x_1..x_T), its mean token log-likelihood, over the T - 1 predicted tokens (t >= 2; with a
target, over the target tokens only, given the prompt):

    ℓ_θ(x) = 1/(T - 1) Σ_{t=2..T} log p_θ(x_t | x_<t)

- ``ll``:  mean token log-likelihood  L_θ(D) = 1/N Σ_x ℓ_θ(x);
- ``perplexity``:  PPL_θ(D) = exp(-L_θ(D)) (standard error by the delta method, PPL · se(L));
- ``alr``: the Average Likelihood Ratio, the paper's memorization metric (a membership-inference score after
  Mireshghallah et al. 2022):

      LR_θ(x) = p_ref(x) / p_θ(x),  per token:  LR_θ(x) = exp(ℓ_ref(x) - ℓ_θ(x))
      ALR_θ(D) = 1/N Σ_x LR_θ(x)

  ALR = 1 for the reference itself; ALR << 1 means θ finds D far likelier than the reference does
  (memorized); forgetting moves ALR back up towards 1. The per-token normalisation (the likelihood of a
  text as the geometric mean of its token probabilities, i.e. exp of minus the mean token cross-entropy)
  is the authors' released code (`train_lm.py`, ``compute_mia_score``: the mean of
  ``exp(loss_θ - loss_ref)``), which averages per batch of 1024-token blocks; here each text is one sample.
- ``ll_gain``: G_θ(D) = 1/N Σ_x [ℓ_θ(x) - ℓ_ref(x)] = -mean log LR, in nats per token: the log-scale twin of
  ALR (additive, not dominated by the least memorized text), used for the kept/forgotten verdict;
- ``accuracy``: exact match of greedy decoding on (prompt, target) pairs (`exact_match`);
- ``fisher_overlap``: the paper's overlap of two diagonal empirical Fishers F_1, F_2 (after Kirkpatrick et
  al. 2017): with F̂ = F / Σ F (trace 1),

      overlap = 1 - ½ Σ_i (F̂_1,i + F̂_2,i - 2 sqrt(F̂_1,i F̂_2,i)) = Σ_i sqrt(F̂_1,i F̂_2,i)

  (1 - the Fréchet distance of the normalised diagonal Fishers; 1 when proportional, 0 when disjoint),
  accumulated tensor by tensor (`FisherOverlap`) so neither Fisher is ever held whole.

Standard errors are over texts, s / sqrt(N) (the texts are the sample; the models are fixed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "FisherOverlap",
    "exact_match",
    "fisher_overlap",
    "likelihood_ratios",
    "mean_stderr",
    "paired_difference",
    "perplexity",
]


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error s / sqrt(n)) of i.i.d. values; the error is NaN for n < 2, both NaN for n = 0."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def likelihood_ratios(ll_model: Sequence[float], ll_reference: Sequence[float]) -> list[float]:
    """LR(x) = exp(ℓ_ref(x) - ℓ_θ(x)) per text, from mean token log-likelihoods (same texts, same order)."""
    if len(ll_model) != len(ll_reference):
        raise ValueError(f"{len(ll_model)} model values for {len(ll_reference)} reference values.")
    return [math.exp(r - m) for m, r in zip(ll_model, ll_reference, strict=True)]


def perplexity(ll_mean: float, ll_stderr: float) -> tuple[float, float]:
    """(exp(-L), exp(-L) · se(L)): perplexity from the mean token log-likelihood, error by the delta method."""
    ppl = math.exp(-ll_mean)
    return ppl, ppl * ll_stderr


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error) of a(x) - b(x) over the same texts: the error of a difference of two models
    on one probe set, smaller than the two errors combined when the texts' difficulty is shared."""
    return mean_stderr([x - y for x, y in zip(a, b, strict=True)])


def exact_match(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether greedy decoding reproduces ``target`` exactly, from one teacher-forced pass.

    logits [K, V] are the model's next-token logits at the K positions that predict target [K] (the last
    prompt token up to the second-to-last target token). Greedy decoding emits the target iff every
    argmax equals the target token given the target's own prefix (by induction: the prefixes agree so
    far), so no generation loop is needed. Ties go to the lowest token id, as ``argmax`` and greedy decoding
    both do.
    """
    if logits.shape[0] != target.shape[0] or target.numel() == 0:
        raise ValueError(
            f"{logits.shape[0]} logit rows for {target.numel()} target tokens (need >= 1, equal)."
        )
    return bool((logits.argmax(-1) == target).all())


class FisherOverlap:
    """Σ_i sqrt(F̂_1,i F̂_2,i) accumulated over matching chunks of two diagonal Fishers.

    ``add(f1, f2)`` takes one tensor (or chunk) of each, in float64 sums: S_1 = Σ F_1, S_2 = Σ F_2 and
    C = Σ sqrt(F_1 F_2); then overlap = C / sqrt(S_1 S_2), the same number as 1 - ½ Σ (F̂_1 + F̂_2 -
    2 sqrt(F̂_1 F̂_2)) with F̂ = F / S, without a second pass to normalise.
    """

    def __init__(self) -> None:
        self.s1 = 0.0
        self.s2 = 0.0
        self.cross = 0.0
        self.numel = 0

    def add(self, f1: torch.Tensor, f2: torch.Tensor) -> None:
        if f1.shape != f2.shape:
            raise ValueError(f"Fisher shapes differ: {tuple(f1.shape)} vs {tuple(f2.shape)}.")
        a, b = f1.detach().double(), f2.detach().double()
        if bool((a < 0).any()) or bool((b < 0).any()):
            raise ValueError("a diagonal Fisher has negative entries; it is a mean of squared gradients.")
        self.s1 += float(a.sum())
        self.s2 += float(b.sum())
        self.cross += float((a * b).sqrt().sum())
        self.numel += a.numel()

    @property
    def value(self) -> float:
        """The overlap in [0, 1]; NaN when a Fisher is all zeros (no gradient: nothing to compare)."""
        if self.s1 <= 0 or self.s2 <= 0:
            return math.nan
        return min(1.0, self.cross / math.sqrt(self.s1 * self.s2))


def fisher_overlap(f1: dict[str, torch.Tensor], f2: dict[str, torch.Tensor]) -> float:
    """The Fisher overlap of two diagonal Fishers given whole, by name (same names and shapes)."""
    if set(f1) != set(f2):
        raise ValueError(f"the Fishers name different tensors: {sorted(set(f1) ^ set(f2))[:5]}.")
    acc = FisherOverlap()
    for name in sorted(f1):
        acc.add(f1[name], f2[name])
    return acc.value

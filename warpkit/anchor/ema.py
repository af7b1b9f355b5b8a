"""The anchor update rules, pure torch over lists of tensors: no model, trainer or distributed code here.

WARP's stage 1 (Ramé et al. 2024, eq. 2), with mu = `ema_rate`:

    anchor <- (1 - mu) * anchor + mu * policy

- `ema_update_`: over aligned tensor lists (full fine-tuning, fp32 shadows, ZeRO-3 slices, LoRA factors);
- `lora_delta_`, `lora_ema_update_`: the same rule on the adapted delta of a LoRA layer, D <- (1 - mu) D +
  mu * s * B @ A, with D (out x in, fp32) held densely: the EMA of a product is not the product of EMAs;
- `squared_distance_and_norm`, `lora_squared_distance_and_norm`: the two sums behind the logged
  `anchor/distance` = |anchor - policy| / |policy|.

The layouts in `warpkit.anchor.layouts` and `warpkit.anchor.lora` decide which tensors are averaged, the
callback decides when (every tau = `update_every` optimizer steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from warpkit.anchor import fused

__all__ = [
    "LoraFactors",
    "copy_distinct_",
    "ema_update_",
    "lora_delta_",
    "lora_ema_update_",
    "lora_squared_distance_and_norm",
    "squared_distance_and_norm",
]

LoraFactors = tuple[Tensor, Tensor, float]
"""One LoRA layer's policy delta as (B, A, s): B is out x r, A is r x in, s = lora_alpha / r; delta = s B @ A."""


def copy_distinct_(targets: list[Tensor], sources: list[Tensor]) -> None:
    """targets_i <- sources_i (cast on copy) in one foreach call, skipping pairs that are the same tensor
    (no shadow: the EMA state is the target itself)."""
    pairs = [(t, s) for t, s in zip(targets, sources, strict=True) if t is not s]
    if pairs:
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])


_CHUNK_NUMEL = 1 << 20  # 4 MB of fp32 scratch: stays in cache, large enough for multithreaded kernels
_BUCKET_NUMEL = 1 << 25  # 128 MB of fp32 scratch per bucket on accelerators


def ema_update_(
    anchor: list[Tensor], policy: list[Tensor], ema_rate: float, *, out: list[Tensor] | None = None
) -> None:
    """In place: anchor_i <- (1 - mu) * anchor_i + mu * policy_i (mu = `ema_rate`), then out_i <- anchor_i.

    `anchor` is the EMA state (fp32 when the model is bf16/fp16: the fp32 shadow), `out` the tensors the
    reference forward reads (cast on copy; skipped where `out_i is anchor_i`). anchor_i, policy_i and out_i
    have the same shape (any shape; policy_i may be non-contiguous), pairwise.

    - Same-dtype pairs: one `torch._foreach_lerp_`, which reads anchor and policy once and writes anchor once,
      the memory-bandwidth floor (TRL's `mul_` + `add_` passes over the anchor twice).
    - Mixed pairs (fp32 shadow, bf16 policy) on CPU: one fused pass (`warpkit.anchor.fused`: read policy and
      shadow, write shadow and out), bitwise equal to the eager fallback used when the kernel is unavailable
      or disabled: lerp wants equal dtypes and mixed-dtype foreach ops take a slow, unvectorised path, so the
      policy is converted into a small fp32 scratch, chunk by chunk, and each chunk is averaged and written
      back while it is still in cache. On accelerators, where launches cost more than passes, whole buckets
      of tensors go through three foreach calls instead.
    """
    if len(anchor) != len(policy) or (out is not None and len(out) != len(anchor)):
        raise ValueError(f"Got {len(anchor)} anchor, {len(policy)} policy and {len(out or [])} out tensors.")
    out = anchor if out is None else out
    same = [i for i in range(len(anchor)) if anchor[i].dtype == policy[i].dtype]
    mixed = [i for i in range(len(anchor)) if anchor[i].dtype != policy[i].dtype]
    if same:
        torch._foreach_lerp_([anchor[i] for i in same], [policy[i] for i in same], ema_rate)
        copy_distinct_([out[i] for i in same], [anchor[i] for i in same])
    if not mixed:
        return
    if anchor[mixed[0]].device.type == "cpu":
        a, p, o = ([t[i] for i in mixed] for t in (anchor, policy, out))
        left = fused.ema_(a, p, o, ema_rate)  # one pass, bitwise the chunked path; [] unless unavailable
        if left:
            _mixed_chunked_([a[i] for i in left], [p[i] for i in left], [o[i] for i in left], ema_rate)
    else:
        _mixed_bucketed_(
            [anchor[i] for i in mixed], [policy[i] for i in mixed], [out[i] for i in mixed], ema_rate
        )


def _mixed_chunked_(anchor: list[Tensor], policy: list[Tensor], out: list[Tensor], ema_rate: float) -> None:
    scratch = torch.empty(_CHUNK_NUMEL, dtype=anchor[0].dtype, device=anchor[0].device)
    for a, p, o in zip(anchor, policy, out, strict=True):
        a, p, o = a.view(-1), p.reshape(-1), o.view(-1)
        for start in range(0, a.numel(), _CHUNK_NUMEL):
            stop = min(start + _CHUNK_NUMEL, a.numel())
            chunk = scratch[: stop - start]
            chunk.copy_(p[start:stop])
            a[start:stop].lerp_(chunk, ema_rate)
            if o is not a:
                o[start:stop].copy_(a[start:stop])


def _mixed_bucketed_(anchor: list[Tensor], policy: list[Tensor], out: list[Tensor], ema_rate: float) -> None:
    size = max(_BUCKET_NUMEL, max(p.numel() for p in policy))
    scratch = torch.empty(size, dtype=anchor[0].dtype, device=anchor[0].device)
    start = 0
    while start < len(anchor):
        stop, used = start, 0
        while stop < len(anchor) and (stop == start or used + policy[stop].numel() <= size):
            used += policy[stop].numel()
            stop += 1
        views, offset = [], 0
        for p in policy[start:stop]:
            views.append(scratch[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        torch._foreach_copy_(views, policy[start:stop])
        torch._foreach_lerp_(anchor[start:stop], views, ema_rate)
        copy_distinct_(out[start:stop], anchor[start:stop])
        start = stop


def squared_distance_and_norm(anchor: list[Tensor], policy: list[Tensor]) -> tuple[float, float]:
    """(sum_i |a_i - p_i|^2, sum_i |p_i|^2) in fp32 (accumulated in fp64), through a cache-sized scratch.

    a_i and p_i have the same number of elements (any shapes, any float dtypes); no model-sized temporaries.
    """
    scratch = torch.empty(_CHUNK_NUMEL, dtype=torch.float32, device=anchor[0].device)
    num = torch.zeros((), dtype=torch.float64, device=anchor[0].device)
    den = torch.zeros((), dtype=torch.float64, device=anchor[0].device)
    for a, p in zip(anchor, policy, strict=True):
        a, p = a.reshape(-1), p.reshape(-1)
        for start in range(0, a.numel(), _CHUNK_NUMEL):
            stop = min(start + _CHUNK_NUMEL, a.numel())
            chunk = scratch[: stop - start]
            chunk.copy_(p[start:stop])
            den += torch.dot(chunk, chunk).double()
            chunk.sub_(a[start:stop])
            num += torch.dot(chunk, chunk).double()
    return float(num), float(den)


# ---- LoRA: the EMA of the adapted delta s * B @ A, held densely --------------------------------------------
def lora_delta_(deltas: list[Tensor], factors: list[LoraFactors]) -> None:
    """In place: D_i <- s_i * B_i @ A_i (D_i: out x in fp32, B_i: out x r, A_i: r x in), the anchor at the start."""
    for d, (b, a, s) in zip(deltas, factors, strict=True):
        torch.mul(b.detach().float() @ a.detach().float(), s, out=d)


@torch.no_grad()
def lora_ema_update_(deltas: list[Tensor], factors: list[LoraFactors], ema_rate: float) -> None:
    """In place: D_i <- (1 - mu) * D_i + mu * s_i * B_i @ A_i (mu = `ema_rate`; shapes as in `lora_delta_`).

    One `addmm_` per layer: no temporary of size out x in.
    """
    for d, (b, a, s) in zip(deltas, factors, strict=True):
        d.addmm_(b.float(), a.float(), beta=1.0 - ema_rate, alpha=ema_rate * s)


@torch.no_grad()
def lora_squared_distance_and_norm(deltas: list[Tensor], factors: list[LoraFactors]) -> tuple[float, float]:
    """(sum_i |D_i - s_i B_i @ A_i|^2, sum_i |s_i B_i @ A_i|^2), the distance of the anchor's deltas to the
    policy's (shapes as in `lora_delta_`); one out x in temporary per layer at a time."""
    num = den = 0.0
    for d, (b, a, s) in zip(deltas, factors, strict=True):
        delta = b.float() @ a.float() * s
        num += float(torch.linalg.vector_norm(d - delta) ** 2)
        den += float(torch.linalg.vector_norm(delta) ** 2)
    return num, den

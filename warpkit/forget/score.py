"""A causal LM scored on probe texts: per-text mean token log-likelihoods, exact match, diagonal Fisher.

Every text is one teacher-forced pass (right-padded batches): the logits at position t - 1 score token t.
A plain text scores its tokens 2..T; a (prompt, target) pair scores only the target tokens given the
prompt, and its exact match is read from the same logits (`warpkit.forget.metrics.exact_match`).
Log-softmax runs in float32 whatever the model's dtype.

The diagonal empirical Fisher of a model on a probe set is F_i = 1/N Σ_x (∂/∂θ_i [-ℓ_θ(x)])², one
backward pass per text (the squared gradient of each text's own mean token loss, as the paper's code does
with batch size 1), accumulated in float32 beside the model and written to a safetensors file, so two
Fishers are compared tensor by tensor from disk (`stream_fisher_overlap`) and never held together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from warpkit.forget.metrics import FisherOverlap, exact_match

__all__ = ["Encoded", "diagonal_fisher", "score_texts", "stream_fisher_overlap"]


@dataclass(frozen=True)
class Encoded:
    """One probe text as token ids; tokens ``ids[start:]`` are scored (start = 1 for a plain text, the
    prompt's length for a pair). ``target`` marks a pair (exact match is scored)."""

    ids: tuple[int, ...]
    start: int
    target: bool = False

    def __post_init__(self) -> None:
        assert 1 <= self.start < len(self.ids), "checked by the inputs: at least one scored token"


def _batch(rows: Sequence[Encoded], pad_token_id: int, device: torch.device):
    """(input_ids [B, T], attention_mask [B, T]) right-padded."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, : len(r.ids)] = 1
    return ids.to(device), mask.to(device)


def _token_log_probs(logits: torch.Tensor, row: Encoded) -> torch.Tensor:
    """log p(x_t | x_<t) for t in [start, T) from one row's logits [T', V] (T' >= T, padding after T)."""
    scoring = logits[row.start - 1 : len(row.ids) - 1].float()
    target = torch.tensor(row.ids[row.start :], device=logits.device)
    return F.log_softmax(scoring, dim=-1).gather(-1, target[:, None])[:, 0]


@torch.no_grad()
def score_texts(
    model: torch.nn.Module,
    texts: Sequence[Encoded],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], list[bool] | None]:
    """(ℓ_θ(x) per text, exact match per text or None when no text is a pair), in the order of ``texts``.

    ℓ_θ(x) is the mean log-likelihood of the scored tokens; exact match is True when greedy decoding
    from the prompt reproduces the whole target.
    """
    device = next(model.parameters()).device
    lls: list[float] = []
    matches: list[bool] = []
    for b in range(0, len(texts), batch_size):
        rows = texts[b : b + batch_size]
        ids, mask = _batch(rows, pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            lls.append(float(_token_log_probs(logits[i], row).mean()))
            if row.target:
                target = torch.tensor(row.ids[row.start :], device=device)
                matches.append(exact_match(logits[i, row.start - 1 : len(row.ids) - 1], target))
        if progress is not None:
            progress(len(rows))
    return lls, (matches if any(r.target for r in texts) else None)


def diagonal_fisher(
    model: torch.nn.Module,
    texts: Sequence[Encoded],
    out_file: str | Path,
    *,
    pad_token_id: int,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """F_i = 1/N Σ_x (∂ℓ_θ(x)/∂θ_i)² over ``texts``, one backward per text, saved to ``out_file``.

    Memory: the model, its gradients and one float32 accumulator per parameter (tied tensors once).
    Parameters that do not require a gradient are left out. Gradients are cleared afterwards.
    """
    from safetensors.torch import save_file

    device = next(model.parameters()).device
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params}
    with torch.enable_grad():
        for row in texts:
            model.zero_grad(set_to_none=True)
            ids, mask = _batch([row], pad_token_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits[0]
            loss = -_token_log_probs(logits, row).mean()
            loss.backward()
            for n, p in params:
                if p.grad is not None:
                    fisher[n].add_(p.grad.detach().float().square())
            if progress is not None:
                progress(1)
    model.zero_grad(set_to_none=True)
    out = Path(out_file)
    save_file({n: (f / len(texts)).cpu().contiguous() for n, f in fisher.items()}, str(out))
    return out


def stream_fisher_overlap(file_a: str | Path, file_b: str | Path) -> tuple[float, int]:
    """(Fisher overlap, number of parameters) of two `diagonal_fisher` files, read one tensor at a time."""
    from safetensors import safe_open

    acc = FisherOverlap()
    with safe_open(str(file_a), "pt") as fa, safe_open(str(file_b), "pt") as fb:
        names_a, names_b = set(fa.keys()), set(fb.keys())
        if names_a != names_b:
            raise ValueError(
                f"the two Fishers name different parameters ({sorted(names_a ^ names_b)[:5]}); compare "
                "models of one architecture."
            )
        for name in sorted(names_a):
            acc.add(fa.get_tensor(name), fb.get_tensor(name))
    return acc.value, acc.numel

"""KV-cache decoding and scoring for the fast path of `estimate.evaluate_policy`.

Per batch of rows (prompt i, sample j) the fast path processes each token the least number of times:

- the policy prefills each DISTINCT prompt of the batch once and its KV cache is expanded to the rows
  (`decode_with_logprobs`); the decoding loop (`decode_loop`, shared with `estimate.sample_completions`, same
  Gumbel-max draws) keeps the policy's log-softmax(logits / T) at every step, so the policy is never
  re-scored teacher-forced;
- the reference's prompt KV cache and last-position logits are computed once per prompt set
  (`ReferencePrompts`, reused by every policy of a frontier); each batch then runs only its completion
  tokens through the reference, teacher-forced on a left-padded copy of the cached prompts;
- `kl_sums` turns the two [B, L, V] log-probability tensors into both KL estimators.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ReferencePrompts",
    "decode_loop",
    "decode_with_logprobs",
    "expandable",
    "kl_sums",
    "left_pad",
    "trim_at_eos",
]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device):
    """(input_ids [B, P], attention_mask [B, P], position_ids [B, P]) for left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {r} of the batch is empty; every prompt needs at least one token.")
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    # Positions count real tokens only, as generate() does, so left padding does not shift them.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def trim_at_eos(rows: list[list[int]], eos_token_id: int | None) -> list[list[int]]:
    """Each row cut after its first EOS (kept); rows without EOS unchanged."""
    if eos_token_id is None:
        return rows
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]


def expandable(cache) -> bool:
    """Whether ``cache`` is a plain `DynamicCache` of full-attention layers (rows can be copied freely)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return (
        type(cache) is DynamicCache
        and len(cache.layers) > 0
        and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)
    )


def _forward_last(model: torch.nn.Module, **inputs):
    """``model(**inputs, use_cache=True)`` computing logits for the last position only when supported."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return model(**inputs, use_cache=True)


# ----------------------------------------------------------------------------- the policy


@torch.no_grad()
def decode_loop(
    policy: torch.nn.Module,
    past,
    logits: torch.Tensor,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator,
    keep_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample from softmax(logits / T) step by step after a prefill; stop at EOS in every row or the cap.

    Inputs: the prefill's cache ``past`` (B rows), its last-position ``logits`` [B, V], ``mask`` [B, P] and
    the next position of each row ``next_pos`` [B]. Gumbel-max: token = argmax(logits / T + G) with
    G = -log(-log U), U ~ Uniform[0, 1) drawn from ``generator`` with shape [B, V] per step, an exact sample.
    Rows past their EOS get ``pad_token_id``. Returns tokens [B, L] (L <= max_new_tokens: the loop ends
    when every row is done) and, with ``keep_logprobs``, log-softmax(logits / T) [B, L, V] in float32.
    """
    batch, device = logits.shape[0], logits.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u))
        scaled = logits.float() / temperature
        if keep_logprobs:
            logprobs.append(F.log_softmax(scaled, -1))
        tok = (scaled + gumbel).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        tokens.append(tok)
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        out = policy(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1) if keep_logprobs else None


@torch.no_grad()
def decode_with_logprobs(
    policy: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator,
    keep_logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`decode_loop` for rows continuing ``prompts[rows[r]]``, each distinct prompt prefilled once.

    The distinct prompts are left-padded to the batch's widest (the width `sample_completions` pads the
    rows to) and their cache is copied to the rows; a cache that cannot be copied row-wise (not a plain
    `DynamicCache`) is rebuilt by prefilling every row. Returns tokens [B, L] and logprobs [B, L, V] (float32,
    None without ``keep_logprobs``), B = len(rows).
    """
    device = next(policy.parameters()).device
    distinct = list(dict.fromkeys(rows))
    ids, mask, pos = left_pad([prompts[i] for i in distinct], pad_token_id, device)
    out = _forward_last(policy, input_ids=ids, attention_mask=mask, position_ids=pos)
    past, logits = out.past_key_values, out.logits[:, -1]
    if len(distinct) < len(rows) and expandable(past):
        where = {i: u for u, i in enumerate(distinct)}
        index = torch.tensor([where[i] for i in rows], device=device)
        past.batch_select_indices(index)
        logits, mask, pos = logits[index], mask[index], pos[index]
    elif len(distinct) < len(rows):
        ids, mask, pos = left_pad([prompts[i] for i in rows], pad_token_id, device)
        out = _forward_last(policy, input_ids=ids, attention_mask=mask, position_ids=pos)
        past, logits = out.past_key_values, out.logits[:, -1]
    return decode_loop(
        policy,
        past,
        logits,
        mask,
        pos[:, -1] + 1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
        keep_logprobs=keep_logprobs,
    )


# ----------------------------------------------------------------------------- the reference


class ReferencePrompts:
    """The reference's KV cache and last-position logits of every prompt, computed once per prompt set.

    The reference does not change between the policies of a frontier, so its prompt tokens are processed
    once (`run_frontier` builds one and passes it to every `evaluate_policy`); a batch then runs only its
    completion tokens through the reference (`logprobs`), on a left-padded copy of the cached prompts.
    Prompts are prefilled ``batch_size`` at a time, left-padded; each prompt's keys and values are kept
    without padding. Memory: sum_i len(prompt_i) x layers x 2 x kv_heads x head_dim values of the
    reference's dtype (35 chat prompts of ~55 tokens on SmolLM2-135M in float32: ~90 MB), plus [N, V]
    float32 logits. ``cached`` is False when the reference's cache is not a plain `DynamicCache` of
    full-attention layers (sliding windows, linear attention...); `evaluate_policy` then takes its slow path.
    """

    def __init__(
        self,
        reference: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        *,
        pad_token_id: int,
        batch_size: int = 16,
    ) -> None:
        self.model = reference
        self.prompts = [list(p) for p in prompts]
        self.pad_token_id = pad_token_id
        self.device = next(reference.parameters()).device
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # [prompt][layer]: ([H, P_i, D], same)
        last: list[torch.Tensor] = []
        self.cached = True
        for start in range(0, len(self.prompts), batch_size):
            last.append(self._prefill(self.prompts[start : start + batch_size]))
            if not self.cached:
                self.kv, last = [], []
                break
        self.last_logits = torch.cat(last) if last else None  # [N, V] float32

    @torch.no_grad()
    def _prefill(self, chunk: list[list[int]]) -> torch.Tensor:
        """Cache one chunk of prompts (appends to ``kv``); returns its last-position logits [n, V] float32."""
        ids, mask, pos = left_pad(chunk, self.pad_token_id, self.device)
        out = _forward_last(self.model, input_ids=ids, attention_mask=mask, position_ids=pos)
        cache = out.past_key_values
        if not expandable(cache):
            self.cached = False
            return out.logits[:, -1].float()
        width = ids.shape[1]
        for r, p in enumerate(chunk):
            start = width - len(p)
            self.kv.append(
                [
                    (layer.keys[r, :, start:].clone(), layer.values[r, :, start:].clone())
                    for layer in cache.layers
                ]
            )
        return out.logits[:, -1].float()

    def batch_cache(self, rows: Sequence[int]):
        """(DynamicCache [B, H, W, D] per layer, attention mask [B, W], prompt lengths [B]) for prompts
        ``rows``, left-padded to the widest of them (zeros under the mask, never attended to)."""
        from transformers import DynamicCache

        distinct = list(dict.fromkeys(rows))
        where = {i: u for u, i in enumerate(distinct)}
        index = torch.tensor([where[i] for i in rows], device=self.device)
        lengths = torch.tensor([len(self.prompts[i]) for i in rows], device=self.device)
        width = int(lengths.max())
        pairs = []
        for layer in range(len(self.kv[distinct[0]])):
            k0, v0 = self.kv[distinct[0]][layer]
            keys = k0.new_zeros((len(distinct), k0.shape[0], width, k0.shape[-1]))
            values = v0.new_zeros((len(distinct), v0.shape[0], width, v0.shape[-1]))
            for u, i in enumerate(distinct):
                k, v = self.kv[i][layer]
                keys[u, :, width - k.shape[1] :] = k
                values[u, :, width - v.shape[1] :] = v
            pairs.append((keys[index], values[index]))
        mask = (torch.arange(width, device=self.device)[None] >= width - lengths[:, None]).long()
        return DynamicCache(pairs), mask, lengths

    @torch.no_grad()
    def logprobs(self, rows: Sequence[int], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        """log-softmax(reference logits / T) [B, L, V] float32 predicting ``tokens`` [B, L], row r continuing
        prompt ``rows[r]``: position 0 from the cached last prompt logits, positions 1..L-1 from one
        teacher-forced pass over tokens[:, :-1] on the cached prompt keys and values."""
        if self.last_logits is None:
            raise ValueError("this reference's cache cannot be copied row-wise (cached is False).")
        index = torch.tensor(list(rows), device=self.device)
        first = self.last_logits[index][:, None]  # [B, 1, V]
        if tokens.shape[1] == 1:
            return F.log_softmax(first / temperature, -1)
        past, mask, lengths = self.batch_cache(rows)
        steps = tokens.shape[1] - 1
        # Tokens after a row's EOS are attended to only by later (masked-out) positions: no mask needed.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, steps)], dim=1)
        pos = lengths[:, None] + torch.arange(steps, device=self.device)[None]
        out = self.model(
            input_ids=tokens[:, :-1],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=past,
            use_cache=True,
        )
        return F.log_softmax(torch.cat([first, out.logits.float()], dim=1) / temperature, -1)


# ----------------------------------------------------------------------------- both KL estimators


def kl_sums(
    logp: torch.Tensor, logq: torch.Tensor, tokens: torch.Tensor, lengths: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Per-sequence (MC log-ratio sum, exact per-position KL sum) over the first ``lengths[r]`` positions.

    logp, logq: policy and reference log-probabilities [B, L, V]; tokens: the sampled tokens [B, L].
    """
    steps = torch.arange(tokens.shape[1], device=tokens.device)
    m = steps[None] < torch.tensor(list(lengths), device=tokens.device)[:, None]  # [B, L]
    token_ratio = (logp - logq).gather(-1, tokens[..., None]).squeeze(-1)  # [B, L]
    p = logp.exp()
    # KL of the next-token distributions, [B, L]; 0 * log 0 = 0 for tokens a model masks with -inf logits.
    exact = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    zero = torch.zeros_like(exact)
    return torch.where(m, token_ratio, zero).sum(-1).tolist(), torch.where(m, exact, zero).sum(-1).tolist()

"""Scoring on a model small enough to enumerate: a unigram LM whose logits are one parameter vector b,
the same at every position, so p(token) = softmax(b) and each gradient is p - (token counts) / n."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from warpkit.forget.score import Encoded, diagonal_fisher, score_texts, stream_fisher_overlap


class Unigram(torch.nn.Module):
    """logits[b, t] = b (V parameters): a causal LM that ignores its context."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.b.expand(*input_ids.shape, -1))


def test_log_likelihood_and_exact_match_by_hand():
    """b = (0, ln 2, 0): p = (1/4, 1/2, 1/4). Text (0, 1, 1, 2) predicts 1, 1, 2:
    ℓ = (ln ½ + ln ½ + ln ¼) / 3 = -4 ln 2 / 3. Text (2, 0) predicts 0: ℓ = -2 ln 2.
    Pair prompt (0,) target (1,): ℓ = ln ½ and greedy (argmax 1) matches; target (2,) does not.
    Batches of two rows of different lengths: padding changes nothing."""
    model = Unigram([0.0, math.log(2), 0.0])
    texts = [
        Encoded((0, 1, 1, 2), 1),
        Encoded((2, 0), 1),
        Encoded((0, 1), 1, target=True),
        Encoded((0, 2), 1, target=True),
    ]
    ll, match = score_texts(model, texts, pad_token_id=0, batch_size=3)
    ln2 = math.log(2)
    assert ll == pytest.approx([-4 * ln2 / 3, -2 * ln2, -ln2, -2 * ln2], abs=1e-6)
    assert match == [True, False]
    assert score_texts(model, texts[:2], pad_token_id=0, batch_size=1)[1] is None


def test_diagonal_fisher_and_overlap_by_hand(tmp_path):
    """b = 0 over V = 3: p = 1/3. The gradient of -ℓ for a text is p - c/n (c its predicted-token counts):
    predicting (0): (-2/3, 1/3, 1/3), squared (4, 1, 1)/9; predicting (1, 1): squared (1, 4, 1)/9.
    Fisher of both texts: their mean (5, 5, 2)/18. Overlap of the two one-text Fishers: 5/6
    (`test_metrics.test_fisher_overlap_by_hand`)."""
    model = Unigram([0.0, 0.0, 0.0])
    one, two = Encoded((2, 0), 1), Encoded((0, 1, 1), 1)
    both = diagonal_fisher(model, [one, two], tmp_path / "both.safetensors", pad_token_id=0)
    assert load_file(both)["b"].tolist() == pytest.approx([5 / 18, 5 / 18, 2 / 18])
    assert model.b.grad is None  # cleared
    fa = diagonal_fisher(model, [one], tmp_path / "a.safetensors", pad_token_id=0)
    fb = diagonal_fisher(model, [two], tmp_path / "b.safetensors", pad_token_id=0)
    assert load_file(fa)["b"].tolist() == pytest.approx([4 / 9, 1 / 9, 1 / 9])
    overlap, numel = stream_fisher_overlap(fa, fb)
    assert overlap == pytest.approx(5 / 6) and numel == 3


def test_padding_changes_nothing_on_a_real_model(tiny_model_factory):
    """A tiny llama scores each text the same alone or right-padded in a batch of texts of other lengths."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", True)).eval()
    texts = [
        Encoded((5, 9, 200, 7), 1),
        Encoded((11, 3), 1),
        Encoded((40, 41, 42, 43, 44, 45), 2, target=True),
    ]
    alone = [score_texts(model, [t], pad_token_id=0)[0][0] for t in texts]
    batched, match = score_texts(model, texts, pad_token_id=0, batch_size=3)
    assert batched == pytest.approx(alone, abs=1e-5) and len(match) == 1

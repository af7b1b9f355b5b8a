"""The test kit itself: tiny models load, generate, and tie or untie embeddings as asked."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tokenizer_has_gpt2_ids_and_chat_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == 50257
    assert tok("Hello world").input_ids == [15496, 995]  # GPT-2's published ids
    assert tok.pad_token_id == tok.eos_token_id == 50256
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "user: hi\nassistant:"


def test_tiny_model_roundtrip_and_generate(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tied = model.config.tie_word_embeddings
    same = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert same == tied
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000
    batch = tok(["the movie was"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, batch.input_ids.shape[1] + 5)
    assert torch.isfinite(model(**batch).logits).all()


def test_tiny_models_differ_by_seed(tiny_model_factory):
    a = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", True, seed=0))
    b = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", True, seed=1))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)

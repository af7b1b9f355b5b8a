"""warpkit.anchor.lora on a tiny PeftModel (no trainer): the "ref" adapter, both LoRA layouts, refusals.

Exact mode: D_0 = s B_0 @ A_0; after an update with mu, D_1 = (1 - mu) D_0 + mu s B_1 @ A_1, and the forward
under the "ref" adapter is the plain model with W0 + D in each adapted layer.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.utils import use_adapter

from warpkit.anchor.lora import (
    LoraExactLayout,
    LoraFactorsLayout,
    ensure_ref_adapter,
    lora_layers,
    lora_layout,
)

SCALING = 8 / 4  # lora_alpha / r
INPUT_IDS = torch.arange(5, 21).reshape(2, 8)


def _peft(model_dir, **config):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    kw.update(config)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**kw))
    ensure_ref_adapter(model)
    return model


def _move_default(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _deltas(model) -> dict[str, torch.Tensor]:
    """s B @ A of the "default" adapter in float64, by Linear layer name (embeddings: `_embedding_delta`)."""
    return {
        name: SCALING
        * m.lora_B["default"].weight.detach().double()
        @ m.lora_A["default"].weight.detach().double()
        for name, m in lora_layers(model)
        if "default" in m.lora_B
    }


def test_ensure_ref_adapter_adds_a_frozen_copy(tiny_llama_dir):
    model = _peft(tiny_llama_dir)
    assert "ref" in model.peft_config
    ref = {n: p for n, p in model.named_parameters() if ".ref." in n}
    assert len(ref) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    for name, param in ref.items():
        assert not param.requires_grad, name
        assert torch.equal(param, model.get_parameter(name.replace(".ref.", ".default."))), name
    assert model.active_adapters == ["default"]


def test_exact_layout_reset_update_distance_and_reference_forward(tiny_llama_dir):
    model = _peft(tiny_llama_dir)
    layout = lora_layout(model, "exact")
    assert type(layout) is LoraExactLayout
    assert all(float(m.lora_B["ref"].weight.abs().max()) == 0.0 for _, m in lora_layers(model))
    layout.reset_to_policy()
    start = _deltas(model)
    _move_default(model, 1)
    moved = _deltas(model)
    layout.update(0.3)
    want = {n: 0.7 * start[n] + 0.3 * moved[n] for n in start}
    state = layout.state_dict()
    assert sorted(state) == sorted(want)
    for name, d in want.items():
        assert float((state[name].double() - d).abs().max()) < 1e-6, name

    num = sum(float((want[n] - moved[n]).square().sum()) for n in want)
    den = sum(float(moved[n].square().sum()) for n in moved)
    got_num, got_den = layout.squared_distance_parts()
    assert (got_num, got_den) == (pytest.approx(num, rel=1e-5), pytest.approx(den, rel=1e-5))

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    with torch.no_grad():
        for name, d in want.items():
            plain.get_submodule(name.removeprefix("base_model.model.")).weight.add_(d)
        with use_adapter(model, "ref"):
            ref_logits = model(input_ids=INPUT_IDS).logits.double()
        expected = plain(input_ids=INPUT_IDS).logits
    assert float((ref_logits - expected).abs().max()) < 1e-4

    layout.release()  # the hooks are gone: the "ref" adapter (B zeroed) is the base model again
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    with torch.no_grad():
        with use_adapter(model, "ref"):
            released = model(input_ids=INPUT_IDS).logits.double()
        base_logits = base(input_ids=INPUT_IDS).logits
    assert float((released - base_logits).abs().max()) < 1e-4


def test_factors_layout_averages_a_and_b(tiny_llama_dir):
    model = _peft(tiny_llama_dir)
    layout = lora_layout(model, "factors")
    assert type(layout) is LoraFactorsLayout
    names = [f"{n}.{part}" for n, _ in lora_layers(model) for part in ("lora_A", "lora_B")]
    assert layout.names == names
    layout.reset_to_policy()
    start = {n: p.detach().double().clone() for n, p in model.named_parameters() if ".default." in n}
    _move_default(model, 1)
    layout.update(0.3)
    for name, param in model.named_parameters():
        if ".ref." in name:
            policy = model.get_parameter(name.replace(".ref.", ".default.")).detach().double()
            want = 0.7 * start[name.replace(".ref.", ".default.")] + 0.3 * policy
            assert float((param.detach().double() - want).abs().max()) < 1e-6, name


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "supports plain LoRA on Linear layers"),
        ({"modules_to_save": ["model.norm"]}, "modules_to_save"),
    ],
    ids=["dora", "modules-to-save"],
)
def test_unsupported_adapters_are_refused(config, message, tiny_llama_dir):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, target_modules=["q_proj"], **config),
    )
    with pytest.raises(ValueError, match=message):
        lora_layers(model)


def test_bad_lora_mode(tiny_llama_dir):
    with pytest.raises(ValueError, match="lora_mode must be 'exact' or 'factors'"):
        lora_layout(_peft(tiny_llama_dir), "average")


# ---- LoRA on the embedding: peft keeps its factors in lora_embedding_A (r x vocab) / lora_embedding_B ------
EMBED = "base_model.model.model.embed_tokens"


def _embedding_delta(model, adapter: str = "default") -> torch.Tensor:
    """(s B @ A)^T in float64: the embedding's delta, vocab x hidden like the embedding weight."""
    m = model.get_submodule(EMBED)
    b, a = m.lora_embedding_B[adapter].detach().double(), m.lora_embedding_A[adapter].detach().double()
    return (SCALING * b @ a).T


@pytest.fixture
def untied_llama(tiny_model_factory):
    return tiny_model_factory("llama", False)


def test_embedding_lora_is_in_the_exact_anchor_and_in_the_reference_forward(untied_llama):
    """Exact support: D_embed = EMA of (s B @ A)^T, and the "ref" forward is the plain model W0 + D (the
    embedding used to be left out of the EMA without a word)."""
    model = _peft(untied_llama, target_modules=["q_proj", "embed_tokens"])
    assert next(n for n, _ in lora_layers(model)) == EMBED
    ref = {n: p for n, p in model.named_parameters() if n.startswith(f"{EMBED}.lora_embedding_")}
    assert sorted(ref) == [f"{EMBED}.lora_embedding_{x}.{a}" for x in "AB" for a in ("default", "ref")]
    assert not ref[f"{EMBED}.lora_embedding_A.ref"].requires_grad
    assert torch.equal(ref[f"{EMBED}.lora_embedding_A.ref"], ref[f"{EMBED}.lora_embedding_A.default"])

    layout = lora_layout(model, "exact")
    layout.reset_to_policy()
    start = {EMBED: _embedding_delta(model), **_deltas(model)}
    _move_default(model, 1)
    moved = {EMBED: _embedding_delta(model), **_deltas(model)}
    layout.update(0.3)
    state = layout.state_dict()
    assert sorted(state) == sorted(moved) and state[EMBED].shape == (50257, 32)
    want = {n: 0.7 * start[n] + 0.3 * moved[n] for n in start}
    for name, d in want.items():  # fp32 state: relative to the size of D (the embedding's entries reach ~10)
        assert float((state[name].double() - d).abs().max()) < 1e-6 * max(1.0, float(d.abs().max())), name

    plain = AutoModelForCausalLM.from_pretrained(untied_llama, dtype=torch.float64)
    with torch.no_grad():
        for name, d in want.items():
            plain.get_submodule(name.removeprefix("base_model.model.")).weight.add_(d)
        with use_adapter(model, "ref"):
            ref_logits = model(input_ids=INPUT_IDS).logits.double()
        expected = plain(input_ids=INPUT_IDS).logits
    assert float((ref_logits - expected).abs().max()) < 1e-4


def test_embedding_lora_factors_are_averaged_in_factors_mode(untied_llama):
    model = _peft(untied_llama, target_modules=["q_proj", "embed_tokens"])
    layout = lora_layout(model, "factors")
    assert f"{EMBED}.lora_A" in layout.names and f"{EMBED}.lora_B" in layout.names
    layout.reset_to_policy()
    m = model.get_submodule(EMBED)
    start = {x: getattr(m, f"lora_embedding_{x}")["default"].detach().double().clone() for x in "AB"}
    _move_default(model, 1)
    layout.update(0.3)
    for x in "AB":
        factors = getattr(m, f"lora_embedding_{x}")
        want = 0.7 * start[x] + 0.3 * factors["default"].detach().double()
        assert float((factors["ref"].detach().double() - want).abs().max()) < 1e-6, x


def test_embedding_lora_with_max_norm_is_refused(untied_llama):
    model = _peft(untied_llama, target_modules=["embed_tokens"])
    model.get_submodule(EMBED).get_base_layer().max_norm = 1.0
    with pytest.raises(ValueError, match=r"embed_tokens: an Embedding with max_norm .* Leave this layer out"):
        lora_layers(model)

"""EMAAnchorCallback on real TRL trainers (single process): the reference equals the EMA of the policy.

Every test records the policy after each optimizer step and recomputes the anchor independently in float64:
a_0 = policy_0 (the policy when training starts, not what TRL loaded as reference),
a_t = (1 - mu) a_{t-1} + mu policy_t every `update_every` steps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from common import PolicySnapshots, ema_reference, make_trainer

from warpkit.anchor import EMAAnchorCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _load_perturbed(model_dir: Path, dtype=torch.float32):
    """The tiny model with its weights shifted in memory, so TRL's reference (re-read from disk) differs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in b)


@pytest.mark.parametrize("path", ["cpu-chunked", "accelerator-bucketed"])
def test_ema_update_matches_float64(path, monkeypatch):
    """Fused update vs the formula in float64, over shapes that cross the 2^20 chunk and bucket edges.

    Mixed pairs are fp32 state + bf16 policy, written to bf16 `out`: out must be the state rounded once.
    """
    import warpkit.anchor.ema as anchor_mod

    if path == "accelerator-bucketed":  # the accelerator code path, exercised on CPU with small buckets
        monkeypatch.setattr(anchor_mod, "_mixed_chunked_", anchor_mod._mixed_bucketed_)
        monkeypatch.setattr(anchor_mod, "_BUCKET_NUMEL", 5000)
    gen = torch.Generator().manual_seed(0)
    shapes = [(1100, 1000), (7,), (64, 33), (3000,), (1, 2049)]
    state = [torch.randn(s, generator=gen) for s in shapes]
    policy = [
        torch.randn(s, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
        for i, s in enumerate(shapes)
    ]
    out = [torch.empty(s, dtype=torch.bfloat16) if i % 2 else state[i] for i, s in enumerate(shapes)]
    want = [(1 - 0.3) * a.double() + 0.3 * p.double() for a, p in zip(state, policy, strict=True)]
    anchor_mod.ema_update_(state, policy, 0.3, out=out)
    for i, (a, w, o) in enumerate(zip(state, want, out, strict=True)):
        assert float((a.double() - w).abs().max()) < 1e-6, i
        assert torch.equal(o, a.to(o.dtype)), i
    with pytest.raises(ValueError, match="policy"):
        anchor_mod.ema_update_(state, policy[:2], 0.3)


@pytest.mark.parametrize(
    ("kind", "overrides", "update_every"),
    [("rloo", {"gradient_accumulation_steps": 2}, 1), ("grpo", {"max_steps": 5}, 2)],
    ids=["rloo-grad-accum-2", "grpo-update-every-2"],
)
def test_reference_is_float64_ema_of_policy(kind, overrides, update_every, tiny_llama_dir, tmp_path):
    ema_rate = 0.3
    model = _load_perturbed(tiny_llama_dir)
    trainer = make_trainer(kind, model, tiny_llama_dir, tmp_path, **overrides)
    disk = {n: p.detach().double().clone() for n, p in trainer.ref_model.named_parameters()}
    callback = EMAAnchorCallback(trainer, ema_rate=ema_rate, update_every=update_every)
    snaps = PolicySnapshots(trainer)
    trainer.add_callback(callback)
    trainer.add_callback(snaps)
    trainer.train()

    steps = trainer.state.global_step
    assert len(snaps.snapshots) == steps + 1  # one snapshot per optimizer step, not per micro-batch
    expected = ema_reference(snaps.snapshots, ema_rate, update_every)
    anchor = dict(trainer.ref_model.named_parameters())
    assert _max_diff(anchor, expected) < 2e-6
    # the check has teeth: the policy moved, and the anchor is neither the final policy nor TRL's disk reference
    assert _max_diff(snaps.snapshots[-1], snaps.snapshots[0]) > 1e-3
    assert _max_diff(anchor, snaps.snapshots[-1]) > 1e-4
    assert _max_diff(anchor, disk) > 5e-3
    assert callback.num_updates == steps // update_every

    # logging: the distance logged at the last step is |a_T - p_T| / |p_T| over all parameters
    logged = [h for h in trainer.state.log_history if "anchor/distance" in h]
    assert len(logged) == steps // update_every and logged[-1]["anchor/ema_rate"] == ema_rate
    num = sum(float((expected[n] - snaps.snapshots[-1][n]).square().sum()) for n in expected)
    den = sum(float(snaps.snapshots[-1][n].square().sum()) for n in expected)
    if steps % update_every == 0:
        assert logged[-1]["anchor/distance"] == pytest.approx(math.sqrt(num / den), rel=1e-4)
    assert all(h["anchor/update_seconds"] > 0 for h in logged)


def test_bf16_model_keeps_fp32_shadow(tiny_llama_dir, tmp_path):
    """bf16 weights: the fp32 shadow follows the float64 EMA; TRL's in-place bf16 rule drifts away from it.

    With mu = 0.01 an update mu * (p - a) is ~1e-4 of the weight, below bf16's relative resolution 2^-8.
    """
    ema_rate = 0.01
    model = _load_perturbed(tiny_llama_dir, dtype=torch.bfloat16)
    trainer = make_trainer("rloo", model, tiny_llama_dir, tmp_path, learning_rate=2e-2)
    assert trainer.ref_model.dtype == torch.bfloat16
    callback = EMAAnchorCallback(trainer, ema_rate=ema_rate)
    snaps = PolicySnapshots(trainer)
    trainer.add_callback(callback)
    trainer.add_callback(snaps)
    trainer.train()

    expected = ema_reference(snaps.snapshots, ema_rate)
    shadow = callback.anchor_state()
    assert all(t.dtype == torch.float32 for t in shadow.values())
    assert _max_diff(shadow, expected) < 1e-6
    for name, param in trainer.ref_model.named_parameters():  # the reference is the shadow rounded once
        assert torch.equal(param.data, shadow[name].to(torch.bfloat16)), name

    # the peer: TRL's SyncRefModelCallback rule (mul_, add_ in bf16) on the same policy trajectory
    in_place = {n: t.to(torch.bfloat16) for n, t in snaps.snapshots[0].items()}
    for snap in snaps.snapshots[1:]:
        for n, a in in_place.items():
            a.mul_(1 - ema_rate).add_(snap[n].to(torch.bfloat16), alpha=ema_rate)
    assert _max_diff(in_place, expected) > 10 * _max_diff(shadow, expected)


@pytest.mark.parametrize("how", ["wrapped", "peft_config"])
def test_lora_exact_anchor_is_ema_of_adapted_weights(how, tiny_llama_dir, tmp_path):
    """Anchor = W0 + D, D = float64 EMA of s * B_t @ A_t; checked on D and on the reference's forward."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import use_adapter

    ema_rate = 0.3
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    if how == "wrapped":  # TRL copies "default" into a "ref" adapter
        trainer = make_trainer(
            "rloo", get_peft_model(base, config), tiny_llama_dir, tmp_path, learning_rate=2e-2
        )
    else:  # TRL makes no "ref" adapter (its reference is the bare base model): the callback adds one
        trainer = make_trainer("rloo", base, tiny_llama_dir, tmp_path, peft_config=config, learning_rate=2e-2)
        assert "ref" not in trainer.model.peft_config
    model = trainer.model
    callback = EMAAnchorCallback(trainer, ema_rate=ema_rate)
    assert "ref" in model.peft_config
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    snaps = PolicySnapshots(trainer, names=lora_names)
    trainer.add_callback(callback)
    trainer.add_callback(snaps)
    trainer.train()

    scaling = 8 / 4
    layers = sorted({n.rsplit(".lora_A", 1)[0] for n in lora_names if ".lora_A." in n})
    exact, factors = {}, ema_reference(snaps.snapshots, ema_rate)
    for layer in layers:
        a_key, b_key = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        deltas = [{"d": scaling * s[b_key] @ s[a_key]} for s in snaps.snapshots]
        exact[layer.removeprefix("base_model.model.")] = ema_reference(deltas, ema_rate)["d"]
    state = callback.anchor_state()
    assert len(state) == len(layers) == 4
    for name, d in exact.items():
        key = next(k for k in state if k.endswith(name))
        assert float((state[key].double() - d).abs().max()) < 1e-6, name
    assert _max_diff(snaps.snapshots[-1], snaps.snapshots[0]) > 1e-3

    # the reference forward TRL runs (the "ref" adapter active) is the dense model W0 + D
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    with torch.no_grad():
        for name, d in exact.items():
            plain.get_submodule(name).weight.add_(d)
        input_ids = torch.arange(5, 21).reshape(2, 8)
        with use_adapter(model, "ref"):
            ref_logits = model(input_ids=input_ids).logits.double()
        policy_logits = model(input_ids=input_ids).logits.double()
        want = plain(input_ids=input_ids).logits
    assert float((ref_logits - want).abs().max()) < 1e-4
    assert float((policy_logits - want).abs().max()) > 1e-3  # the policy (default adapter) is something else

    # EMA of the factors is a different anchor: B_ema @ A_ema != EMA(B @ A)
    rel = []
    for layer in layers:
        a_key, b_key = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        d = exact[layer.removeprefix("base_model.model.")]
        rel.append(float((scaling * factors[b_key] @ factors[a_key] - d).norm() / d.norm()))
    assert max(rel) > 1e-3


def test_lora_factors_mode_averages_a_and_b(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    ema_rate = 0.3
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    trainer = make_trainer("rloo", model, tiny_llama_dir, tmp_path, learning_rate=2e-2)
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    callback = EMAAnchorCallback(trainer, ema_rate=ema_rate, lora_mode="factors")
    snaps = PolicySnapshots(trainer, names=lora_names)
    trainer.add_callback(callback)
    trainer.add_callback(snaps)
    trainer.train()

    expected = ema_reference(snaps.snapshots, ema_rate)
    ref = {n.replace(".ref.", ".default."): p for n, p in model.named_parameters() if ".ref." in n}
    assert set(ref) == set(expected)
    assert _max_diff(ref, expected) < 1e-6
    assert _max_diff(snaps.snapshots[-1], snaps.snapshots[0]) > 1e-3


def test_resume_restores_anchor(tiny_llama_dir, tmp_path):
    """Stop at step 2 (checkpoint), resume from it in a fresh trainer: same anchor as an uninterrupted run."""
    ema_rate = 0.3
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)

    def run(out, resume=None):
        trainer = make_trainer(
            "rloo", AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_llama_dir, out, **kw
        )
        trainer.add_callback(EMAAnchorCallback(trainer, ema_rate=ema_rate))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-2"
    # written before trainer_state.json, the Trainer's last file, which resume tools take as "complete"
    assert (ckpt / "warpkit_anchor.safetensors").stat().st_mtime_ns <= (
        ckpt / "trainer_state.json"
    ).stat().st_mtime_ns
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    policy_full = {n: p.detach() for n, p in full.model.named_parameters()}
    policy_resumed = {n: p.detach() for n, p in resumed.model.named_parameters()}
    assert _max_diff(policy_resumed, policy_full) < 1e-6  # same trajectory: the comparison below is fair
    anchor_full = dict(full.ref_model.named_parameters())
    anchor_resumed = dict(resumed.ref_model.named_parameters())
    assert _max_diff(anchor_resumed, anchor_full) < 1e-6
    # and the anchor was really restored, not re-seeded from the policy at step 2
    assert _max_diff(anchor_resumed, policy_resumed) > 1e-4

    (tmp_path / "full" / "checkpoint-2" / "warpkit_anchor.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="warpkit_anchor"):
        run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))


def test_kl_term_uses_the_anchor(tiny_llama_dir, tmp_path):
    """GRPO logs the k3 KL to its reference (>= 0). mu = 1: the anchor is the policy that generated, KL == 0
    exactly at every step; mu = 0.5 sits between that and the SFT-anchored run once the policy has moved."""

    def kls(out, ema_rate):
        trainer = make_trainer(
            "grpo", AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_llama_dir, out, max_steps=5
        )
        if ema_rate is not None:
            trainer.add_callback(EMAAnchorCallback(trainer, ema_rate=ema_rate))
        trainer.train()
        return [h["kl"] for h in trainer.state.log_history if "kl" in h]

    sft, half, one = kls(tmp_path / "sft", None), kls(tmp_path / "half", 0.5), kls(tmp_path / "one", 1.0)
    assert len(sft) == len(half) == len(one) == 5
    assert one == [0.0] * 5
    assert sft[0] == half[0] == 0.0  # step 1: every anchor still equals the init
    assert all(k > 0 for k in sft[1:])
    assert 0 < half[-1] < sft[-1]


# ---- guards --------------------------------------------------------------------------------------------
@pytest.fixture
def rloo(tiny_llama_dir, tmp_path):
    return make_trainer("rloo", str(tiny_llama_dir), tiny_llama_dir, tmp_path)


@pytest.mark.parametrize("ema_rate", [0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_ema_rate(rloo, ema_rate):
    with pytest.raises(ValueError, match="ema_rate must be a number in \\(0, 1\\]"):
        EMAAnchorCallback(rloo, ema_rate=ema_rate)


@pytest.mark.parametrize("update_every", [0, 1.5, -2])
def test_bad_update_every(rloo, update_every):
    with pytest.raises(ValueError, match="update_every"):
        EMAAnchorCallback(rloo, update_every=update_every)


def test_bad_lora_mode_and_trainer(rloo):
    with pytest.raises(ValueError, match="lora_mode"):
        EMAAnchorCallback(rloo, lora_mode="average")
    with pytest.raises(TypeError, match="GRPOTrainer or RLOOTrainer"):
        EMAAnchorCallback(object())


def test_beta_zero_has_no_reference(tiny_llama_dir, tmp_path):
    trainer = make_trainer("grpo", str(tiny_llama_dir), tiny_llama_dir, tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="beta == 0"):
        EMAAnchorCallback(trainer)


def test_sync_ref_model_conflict(tiny_llama_dir, tmp_path):
    trainer = make_trainer("rloo", str(tiny_llama_dir), tiny_llama_dir, tmp_path, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model=True"):
        EMAAnchorCallback(trainer)


@pytest.mark.filterwarnings("default::UserWarning")
@pytest.mark.parametrize("overrides", [{"steps_per_generation": 2}, {"num_iterations": 2}])
def test_stale_anchor_warning(overrides, tiny_llama_dir, tmp_path):
    trainer = make_trainer("rloo", str(tiny_llama_dir), tiny_llama_dir, tmp_path, **overrides)
    with pytest.warns(UserWarning, match="1 updates stale"):
        EMAAnchorCallback(trainer)


def test_lora_with_trained_non_adapter_weights_is_refused(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    trainer = make_trainer("rloo", model, tiny_llama_dir, tmp_path)
    with pytest.raises(ValueError, match="modules_to_save"):
        EMAAnchorCallback(trainer)

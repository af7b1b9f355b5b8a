"""EMAAnchorCallback on real TRL trainers (single process): the reference equals the EMA of the policy.

Every test records the policy after each optimizer step and recomputes the anchor independently in float64:
a_0 = policy_0 (the policy when training starts, not what TRL loaded as reference),
a_t = (1 - mu) a_{t-1} + mu policy_t every `update_every` steps.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from trl.trainer.utils import use_adapter

import warpkit.anchor.callback as callback_module
from tests.anchor.scripts.common import PolicySnapshots, ema_reference, make_trainer
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


ANCHOR_KEYS = {"anchor/ema_rate", "anchor/distance", "anchor/update_seconds"}


class FakeClock:
    """`perf_counter` for the callback module: the i-th update (0-based) takes exactly (i + 1) / 8 seconds.

    Calls come in (start, stop) pairs around each update: 10 i, then 10 i + (i + 1) / 8 (exact in binary).
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        i, stop = divmod(self.calls, 2)
        self.calls += 1
        return 10.0 * i + (i + 1) / 8 * stop


@pytest.mark.parametrize(
    ("kind", "overrides", "update_every"),
    [("rloo", {"gradient_accumulation_steps": 2}, 1), ("grpo", {"max_steps": 5}, 2)],
    ids=["rloo-grad-accum-2", "grpo-update-every-2"],
)
def test_reference_is_float64_ema_of_policy(
    kind, overrides, update_every, tiny_llama_dir, tmp_path, monkeypatch
):
    ema_rate = 0.3
    monkeypatch.setattr(callback_module, "perf_counter", FakeClock())
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
    # the logged update time is the callback's own clock reading, exactly; and only these keys are logged
    assert [h["anchor/update_seconds"] for h in logged] == [(i + 1) / 8 for i in range(len(logged))]
    assert all({k for k in h if k.startswith("anchor/")} == ANCHOR_KEYS for h in logged)
    assert [h for h in trainer.state.log_history if "anchor/distance" not in h and ANCHOR_KEYS & set(h)] == []


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
    not_rounded = [  # the reference is the shadow rounded once
        name
        for name, param in trainer.ref_model.named_parameters()
        if not torch.equal(param.data, shadow[name].to(torch.bfloat16))
    ]
    assert not_rounded == []

    # the peer: TRL's SyncRefModelCallback rule (mul_, add_ in bf16) on the same policy trajectory
    in_place = {n: t.to(torch.bfloat16) for n, t in snaps.snapshots[0].items()}
    for snap in snaps.snapshots[1:]:
        for n, a in in_place.items():
            a.mul_(1 - ema_rate).add_(snap[n].to(torch.bfloat16), alpha=ema_rate)
    assert _max_diff(in_place, expected) > 10 * _max_diff(shadow, expected)


@pytest.mark.parametrize("how", ["wrapped", "peft_config"])
def test_lora_exact_anchor_is_ema_of_adapted_weights(how, tiny_llama_dir, tmp_path):
    """Anchor = W0 + D, D = float64 EMA of s * B_t @ A_t; checked on D and on the reference's forward."""
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
    errors = {name: float((state[next(k for k in state if k.endswith(name))].double() - d).abs().max())
              for name, d in exact.items()}  # fmt: skip
    assert {name: e for name, e in errors.items() if not e < 1e-6} == {}  # every layer reported at once
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
        callback = EMAAnchorCallback(trainer, ema_rate=ema_rate)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        assert callback.resume_dir == resume  # told by the trainer adapter's resume hook
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


def test_bad_lora_mode(rloo):
    with pytest.raises(ValueError, match="lora_mode"):
        EMAAnchorCallback(rloo, lora_mode="average")


def test_not_a_trainer():
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
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.norm"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    trainer = make_trainer("rloo", model, tiny_llama_dir, tmp_path)
    with pytest.raises(ValueError, match="modules_to_save"):
        EMAAnchorCallback(trainer)


# ---- the state file, on a stand-in trainer (two small modules, no TRL run) ------------------------------
def _stand_in_callback(ema_rate=0.3, update_every=1) -> EMAAnchorCallback:
    torch.manual_seed(0)
    args = SimpleNamespace(gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1)
    trainer = SimpleNamespace(
        args=args,
        beta=0.1,
        model=nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)),
        ref_model=nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _load_optimizer_and_scheduler=lambda checkpoint: None,
    )
    return EMAAnchorCallback(trainer, ema_rate=ema_rate, update_every=update_every)


def test_state_file_format(tmp_path):
    """The file name, metadata and tensors of a full-layout state, and no temporary left beside it."""
    callback = _stand_in_callback(update_every=2)
    callback.reset_to_policy()
    callback.update()
    callback.save_state(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir()) == ["warpkit_anchor.safetensors"]
    with safe_open(str(tmp_path / "checkpoint-2" / "warpkit_anchor.safetensors"), "pt") as f:
        assert f.metadata() == {
            "format": "warpkit-anchor-v1",
            "layout": "full",
            "ema_rate": "0.3",
            "update_every": "2",
            "num_updates": "1",
            "world_size": "1",
        }
        assert sorted(f.keys()) == ["0.bias", "0.weight", "1.bias", "1.weight"]


def test_load_state_round_trip(tmp_path):
    saver = _stand_in_callback()
    saver.reset_to_policy()
    with torch.no_grad():
        for p in saver.trainer.model.parameters():
            p.add_(1.0)
    saver.update()
    saver.save_state(tmp_path)
    loader = _stand_in_callback()
    loader.load_state(tmp_path)
    assert loader.num_updates == 1
    want = dict(saver.trainer.ref_model.named_parameters())
    assert _max_diff(dict(loader.trainer.ref_model.named_parameters()), want) == 0.0


def test_load_state_refuses_another_layout(tmp_path):
    """A state file whose `layout` metadata is not this run's (here: a LoRA-exact file for full fine-tuning)."""
    callback = _stand_in_callback()
    callback.reset_to_policy()
    callback.save_state(tmp_path)
    path = tmp_path / "warpkit_anchor.safetensors"
    save_file(
        load_file(str(path)), str(path), metadata={"format": "warpkit-anchor-v1", "layout": "lora_exact"}
    )
    want = (
        f"{path} holds layout 'lora_exact' (format 'warpkit-anchor-v1') but this run needs 'full' "
        "(warpkit-anchor-v1); was it written by another setup?"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        callback.load_state(tmp_path)


def test_load_state_refuses_another_model(tmp_path):
    callback = _stand_in_callback()
    callback.reset_to_policy()
    callback.save_state(tmp_path)
    other = _stand_in_callback()
    other.trainer.model[0] = nn.Linear(3, 4)
    other.trainer.ref_model[0] = nn.Linear(3, 4)
    want = (
        f"{tmp_path / 'warpkit_anchor.safetensors'} and this run's 'full' anchor differ in shape (name, shape, "
        "reference shape): ['0.weight (2, 3) vs (4, 3)', '0.bias (2,) vs (4,)']. Was it written for another "
        "model, adapter or number of processes?"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        other.load_state(tmp_path)


def test_lora_on_the_embedding_is_averaged_exactly_in_a_real_run(tiny_model_factory, tmp_path):
    """target_modules with embed_tokens: the anchor holds D_embed = float64 EMA of (s B_t @ A_t)^T."""
    ema_rate, model_dir = 0.3, tiny_model_factory("llama", False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    trainer = make_trainer(
        "rloo", AutoModelForCausalLM.from_pretrained(model_dir), model_dir, tmp_path, peft_config=config,
        learning_rate=2e-2, max_steps=2,
    )  # fmt: skip
    callback = EMAAnchorCallback(trainer, ema_rate=ema_rate)
    embed = "base_model.model.model.embed_tokens"
    names = [f"{embed}.lora_embedding_A.default", f"{embed}.lora_embedding_B.default"]
    snaps = PolicySnapshots(trainer, names=names)
    trainer.add_callback(callback)
    trainer.add_callback(snaps)
    trainer.train()

    deltas = [{"d": (2.0 * s[names[1]] @ s[names[0]]).T} for s in snaps.snapshots]
    want = ema_reference(deltas, ema_rate)["d"]
    got = callback.anchor_state()[next(k for k in callback.anchor_state() if k.endswith("embed_tokens"))]
    assert got.shape == want.shape == (50257, 32)
    assert float((got.double() - want).abs().max()) < 1e-6 * max(1.0, float(want.abs().max()))
    assert _max_diff(snaps.snapshots[-1], snaps.snapshots[0]) > 1e-4  # the embedding factors did move

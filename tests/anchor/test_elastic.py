"""ElasticResetCallback on a real RLOO run: the policy, the EMA and the KL reference against the rule in float64.

Two snapshot callbacks surround the one under test, so each step is seen before the reset (pre_t: the policy
the optimizer produced) and after it (post_t: what the next step starts from). Recomputed in float64 by
`elastic_reference` (tests/anchor/scripts/common.py), with init = pre_0 (the policy when training starts):

    EMA = init;  for t = 1..T: EMA = (1 - mu) EMA + mu pre_t;  if t % n == 0: post_t = EMA, EMA = init
                                                                  else:          post_t = pre_t

and the reference must be init all along (not what TRL re-loaded from disk). The optimizer is checked too: the
step after a reset starts from post_t and keeps Adam's moments and step count (recomputed from its state).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.anchor.scripts.common import PolicySnapshots, elastic_reference, load_perturbed, make_trainer
from warpkit.anchor import ElasticResetCallback

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class AdamSteps(PolicySnapshots):
    """Before the callback: the policy after each optimizer step, and Adam's state for it (float64, by name)."""

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.adam: list[dict] = [{}]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        super().on_step_end(args, state, control)
        group = optimizer.param_groups[0]
        hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.adam.append(
            {
                n: {
                    **hyper,
                    **{k: torch.as_tensor(v).double().clone() for k, v in optimizer.state[p].items()},
                }
                for n, p in model.named_parameters()
            }
        )


def _adamw_step(start, s) -> torch.Tensor:
    """AdamW (torch's rule) from `start` with the moments and step count `s` after the step, in float64."""
    (b1, b2), step = s["betas"], float(s["step"])
    start = start * (1 - s["lr"] * s["weight_decay"])
    denom = s["exp_avg_sq"].sqrt() / (1 - b2**step) ** 0.5 + s["eps"]
    return start - s["lr"] / (1 - b1**step) * s["exp_avg"] / denom


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in b)


def test_policy_ema_and_reference_follow_float64_elastic_reset(tiny_llama_dir, tmp_path):
    ema_rate, reset_every, steps = 0.3, 2, 5  # resets after steps 2 and 4; step 5 starts from a reset policy
    trainer = make_trainer(
        "rloo",
        load_perturbed(tiny_llama_dir),
        tiny_llama_dir,
        tmp_path,
        max_steps=steps,
        lr_scheduler_type="constant",
    )
    disk = {n: p.detach().double().clone() for n, p in trainer.ref_model.named_parameters()}
    pre = AdamSteps(trainer)
    callback = ElasticResetCallback(trainer, reset_every=reset_every, ema_rate=ema_rate)
    post = PolicySnapshots(trainer)
    for cb in (pre, callback, post):
        trainer.add_callback(cb)
    trainer.train()

    want_post, want_ema = elastic_reference(pre.snapshots, ema_rate, reset_every)
    assert len(post.snapshots) == steps + 1
    for t in range(steps + 1):
        assert _max_diff(post.snapshots[t], want_post[t]) < 1e-6, t
    assert _max_diff(callback.ema_state(), want_ema) < 1e-6
    assert callback.num_resets == 2 and callback.num_updates == steps
    # the resets did something: the reset policy is far from the policy the optimizer produced
    for t in (2, 4):
        assert _max_diff(post.snapshots[t], pre.snapshots[t]) > 1e-3
    # the KL reference is the init the run started from, exactly, and not TRL's copy from disk
    ref = {n: p.detach().double() for n, p in trainer.ref_model.named_parameters()}
    assert all(torch.equal(ref[n], pre.snapshots[0][n]) for n in ref)
    assert _max_diff(ref, disk) > 5e-3
    # the optimizer kept its state: step t + 1 is AdamW from the reset policy with step count t + 1
    for t in (2, 4):
        adam = pre.adam[t + 1]
        assert all(int(s["step"]) == t + 1 for s in adam.values())
        expected = {n: _adamw_step(post.snapshots[t][n], adam[n]) for n in adam}
        assert _max_diff(pre.snapshots[t + 1], expected) < 1e-6, t
    logged = [h for h in trainer.state.log_history if "anchor/resets" in h]
    assert [h["anchor/resets"] for h in logged] == [0, 1, 1, 2, 2]


def test_resume_between_two_resets_is_bitwise(tiny_llama_dir, tmp_path):
    """Resets after steps 2 and 4; resumed from checkpoint-3, the run ends bitwise as the uninterrupted one:
    policy, EMA, reference (the init) and the counters."""

    def run(out, resume=None):
        trainer = make_trainer(
            "rloo", load_perturbed(tiny_llama_dir), tiny_llama_dir, out,
            max_steps=5, save_strategy="steps", save_steps=3,
        )  # fmt: skip
        callback = ElasticResetCallback(trainer, reset_every=2, ema_rate=0.3)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    full, full_cb = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-3"
    with safe_open(str(ckpt / "warpkit_anchor.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["layout"] == "elastic_reset_full"
    assert (meta["num_resets"], meta["num_updates"], meta["reset_every"]) == ("1", "3", "2")
    names = [n for n, _ in full.model.named_parameters()]
    assert keys == {f"{part}.{n}" for part in ("ema", "init") for n in names}
    resumed, resumed_cb = run(tmp_path / "resumed", resume=str(ckpt))
    assert (
        (resumed_cb.num_resets, resumed_cb.num_updates) == (full_cb.num_resets, full_cb.num_updates) == (2, 5)
    )
    for a, b in [(full.model, resumed.model), (full.ref_model, resumed.ref_model)]:
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    want, got = full_cb.ema_state(), resumed_cb.ema_state()
    assert all(torch.equal(want[n], got[n]) for n in want)
    # the init came from the state file (TRL re-loaded the unperturbed weights from disk as its reference)
    start = {n: p.detach().double() for n, p in load_perturbed(tiny_llama_dir).named_parameters()}
    assert all(torch.equal(p.detach().double(), start[n]) for n, p in resumed.ref_model.named_parameters())


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reset_every": 0}, r"reset_every must be an integer >= 1 \(optimizer steps\), got 0"),
        ({"reset_every": 2.5}, r"reset_every must be an integer >= 1"),
        ({"reset_every": True}, r"reset_every must be an integer >= 1"),
        (
            {"reset_every": 2, "ema_rate": 0.0},
            r"ema_rate must be a number in \(0, 1\], got 0.0; Elastic Reset",
        ),
        ({"reset_every": 2, "ema_rate": 1.5}, r"ema_rate must be a number in \(0, 1\]"),
        ({"reset_every": 2, "update_every": 0}, r"update_every must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message, tiny_llama_dir, tmp_path):
    trainer = make_trainer("rloo", str(tiny_llama_dir), tiny_llama_dir, tmp_path)
    with pytest.raises(ValueError, match=message):
        ElasticResetCallback(trainer, **kwargs)


@pytest.mark.parametrize("case", ["beta0", "sync_ref_model", "lora", "deepspeed"])
def test_setups_it_cannot_reset_are_refused(case, tiny_llama_dir, tmp_path):
    kw = {"beta0": {"beta": 0.0}, "sync_ref_model": {"sync_ref_model": True}}.get(case, {})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    if case == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = make_trainer("rloo", model, tiny_llama_dir, tmp_path, **kw)
    if case == "deepspeed":
        trainer.is_deepspeed_enabled = True  # what Trainer sets when accelerate runs DeepSpeed
    message = {
        "beta0": r"beta == 0, so TRL keeps no reference model, and ElasticResetCallback needs one \(the init",
        "sync_ref_model": "sync_ref_model=True installs TRL's own SyncRefModelCallback",
        "lora": "ElasticResetCallback supports full fine-tuning only.*use EMAAnchorCallback",
        "deepspeed": "under deepspeed the optimizer keeps its own copy of them .* Run Elastic Reset in one process",
    }[case]
    with pytest.raises(ValueError, match=message):
        ElasticResetCallback(trainer, reset_every=2)

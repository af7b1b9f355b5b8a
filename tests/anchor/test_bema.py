"""BEMAAnchorCallback: the KL reference is TRL's BEMA iterate of the policy.

Each check has two references that share no code with warpkit, on the same sequence of policy weights:

- TRL's own `trl.trainer.callbacks.BEMACallback` (its `running_model`), fed the very same weights: TRL's
  schedule and arithmetic (fp32, `mul_`/`add_`), not warpkit's;
- `bema_reference` (tests/anchor/scripts/common.py), the rule recomputed in float64 from TRL's docstring:
  t < tau: nothing; t == tau: theta_0 = EMA = theta_t; (t - tau) % phi == 0:
  beta = max((rho + gamma t)^-kappa, floor), alpha = (rho + gamma t)^-eta,
  EMA = (1 - beta) EMA + beta theta_t, anchor = EMA + alpha (theta_t - theta_0); anchor = theta_0 = EMA = the
  policy at t = 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
from trl.trainer.callbacks import BEMACallback

from tests.anchor.scripts.common import PolicySnapshots, bema_reference, load_perturbed, make_trainer
from warpkit.anchor import BEMAAnchorCallback, BemaSchedule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in b)


def _params(model) -> dict:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _stand_in(model, ref) -> SimpleNamespace:
    """What the callback reads from a TRL trainer, around two real tiny models (no training)."""
    args = SimpleNamespace(
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        logging_steps=1,
        output_dir="x",
    )
    return SimpleNamespace(
        args=args, beta=0.1, model=model, ref_model=ref,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _load_optimizer_and_scheduler=lambda checkpoint: None,
    )  # fmt: skip


SETTINGS = dict(update_freq=2, ema_power=0.5, bias_power=0.2, lag=3, update_after=3, multiplier=1.5)


def test_step_by_step_equals_trls_bema_callback_and_float64(tiny_model_factory):
    """12 steps of a random walk of the weights through the burn-in (t < tau = 3), the snapshot (t = 3), holds
    and updates (phi = 2): after every step the reference equals TRL's running model and the float64 rule."""
    model_dir = tiny_model_factory("llama", True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # the reference TRL loaded differs from the policy: the anchor starts at the policy
        for p in ref.parameters():
            p.add_(0.5)
    trainer = _stand_in(model, ref)
    ours = BEMAAnchorCallback(trainer, **SETTINGS)
    theirs = BEMACallback(**SETTINGS)
    state, control = TrainerState(), TrainerControl()
    ours.on_train_begin(trainer.args, state, control)
    theirs.on_train_begin(trainer.args, state, control, model=model)
    snapshots, gen = [_params(model)], torch.Generator().manual_seed(0)
    actions = []
    for t in range(1, 13):
        with torch.no_grad():  # an "optimizer step"
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        state.global_step = t
        ours.on_step_end(trainer.args, state, control)
        theirs.on_step_end(trainer.args, state, control, model=model)
        snapshots.append(_params(model))
        actions.append(ours.schedule.action(t))
        anchor = _params(ref)
        assert _max_diff(anchor, _params(theirs.running_model)) < 1e-6, t
        assert _max_diff(anchor, bema_reference(snapshots, **SETTINGS)[0]) < 1e-6, t
    assert actions == ["wait", "wait", "snapshot", "hold", "update", "hold", "update"] + [
        "hold",
        "update",
    ] * 2 + ["hold"]
    assert ours.num_updates == 4
    anchor, ema, theta0 = bema_reference(snapshots, **SETTINGS)
    state_dict = ours.anchor_state()
    assert max(float((state_dict[f"ema.{n}"].double() - ema[n]).abs().max()) for n in ema) < 1e-6
    assert all(torch.equal(state_dict[f"theta0.{n}"].double(), theta0[n]) for n in theta0)  # an exact copy
    assert _max_diff(anchor, snapshots[-1]) > 1e-3  # the anchor is neither the policy...
    assert _max_diff(anchor, snapshots[3]) > 1e-3  # ...nor theta_0
    # the logged coefficients are TRL's, at the update steps only
    logged = trainer._metrics["train"]
    assert logged["anchor/bema_beta"] == [theirs._ema_beta(t) for t in (5, 7, 9, 11)]
    assert logged["anchor/bema_alpha"] == [theirs._bema_alpha(t) for t in (5, 7, 9, 11)]


@pytest.mark.parametrize(
    "settings",
    [SETTINGS, dict(lag=0, multiplier=1, ema_power=2.0, bias_power=0.0, min_ema_multiplier=0.3)],
    ids=["defaults-like", "floor-and-alpha-1"],
)
def test_schedule_coefficients_are_trls(settings):
    schedule, theirs = BemaSchedule(**settings), BEMACallback(**settings)
    for t in range(1, 50):
        assert schedule.ema_beta(t) == theirs._ema_beta(t)
        assert schedule.bema_alpha(t) == theirs._bema_alpha(t)


def test_reference_is_bema_of_policy_in_a_real_rloo_run(tiny_llama_dir, tmp_path):
    """6 RLOO steps, tau = 2, phi = 2 (steps: wait, snapshot, hold, update, hold, update), TRL's BEMACallback
    attached to the same run: the reference equals its running model and the float64 rule."""
    settings = dict(update_freq=2, update_after=2, lag=10, ema_power=0.5, bias_power=0.2)
    trainer = make_trainer("rloo", load_perturbed(tiny_llama_dir), tiny_llama_dir, tmp_path, max_steps=6)
    disk = _params(trainer.ref_model)
    callback, theirs = BEMAAnchorCallback(trainer, **settings), BEMACallback(**settings)
    snaps = PolicySnapshots(trainer)
    for cb in (callback, theirs, snaps):
        trainer.add_callback(cb)
    trainer.train()

    assert len(snaps.snapshots) == 7 and callback.num_updates == 2
    anchor = _params(trainer.ref_model)
    assert _max_diff(anchor, _params(theirs.running_model)) < 1e-6
    assert _max_diff(anchor, bema_reference(snaps.snapshots, **settings)[0]) < 2e-6
    assert _max_diff(snaps.snapshots[-1], snaps.snapshots[0]) > 1e-3  # the policy moved
    assert _max_diff(anchor, snaps.snapshots[-1]) > 1e-4  # the anchor is not the policy
    assert _max_diff(anchor, disk) > 5e-3  # nor what TRL loaded from disk
    logged = [h for h in trainer.state.log_history if "anchor/bema_beta" in h]
    assert [h["step"] for h in logged] == [4, 6]
    assert [h["anchor/bema_beta"] for h in logged] == [14**-0.5, 16**-0.5]


def test_resume_between_two_updates_is_bitwise(tiny_llama_dir, tmp_path):
    """tau = 1, phi = 2: updates at steps 3 and 5. Resumed from checkpoint-4 (the anchor of step 3 is not
    recomputable from the policy of step 4: it is read from the state file), the run ends bitwise as the
    uninterrupted one: policy, anchor, EMA and theta_0."""
    settings = dict(update_freq=2, update_after=1, lag=1)

    def run(out, resume=None):
        trainer = make_trainer(
            "rloo", AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_llama_dir, out,
            max_steps=5, save_strategy="steps", save_steps=2,
        )  # fmt: skip
        callback = BEMAAnchorCallback(trainer, **settings)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    full, full_cb = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-4"
    with safe_open(str(ckpt / "warpkit_anchor.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["layout"] == "bema_full" and meta["num_updates"] == "1" and meta["update_after"] == "1"
    names = [n for n, _ in full.model.named_parameters()]
    assert keys == {f"{part}.{n}" for part in ("ema", "theta0", "anchor") for n in names}
    resumed, resumed_cb = run(tmp_path / "resumed", resume=str(ckpt))
    assert resumed_cb.num_updates == full_cb.num_updates == 2
    for a, b in [(full.model, resumed.model), (full.ref_model, resumed.ref_model)]:
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    want, got = full_cb.anchor_state(), resumed_cb.anchor_state()
    assert set(want) == set(got) and all(torch.equal(want[n], got[n]) for n in want)

    (ckpt / "warpkit_anchor.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"the BEMA anchor cannot be restored.*BEMAAnchorCallback"):
        run(tmp_path / "again", resume=str(ckpt))


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_freq": 0}, "update_freq must be an integer >= 1"),
        ({"update_freq": 1.5}, "update_freq must be an integer >= 1"),
        ({"update_after": -1}, "update_after must be an integer >= 0"),
        ({"ema_power": -0.5}, "ema_power must be a finite number >= 0"),
        ({"bias_power": float("nan")}, "bias_power must be a finite number >= 0"),
        ({"lag": 0, "multiplier": 0.5}, re.escape("lag + multiplier must be >= 1, got 0 + 0.5")),
        ({"min_ema_multiplier": 1.5}, re.escape("min_ema_multiplier must be a number in [0, 1]")),
    ],
)
def test_bad_settings_are_refused(kwargs, message, tiny_llama_dir, tmp_path):
    trainer = make_trainer("rloo", str(tiny_llama_dir), tiny_llama_dir, tmp_path)
    with pytest.raises(ValueError, match=message):
        BEMAAnchorCallback(trainer, **kwargs)


@pytest.mark.parametrize("case", ["beta0", "sync_ref_model", "lora"])
def test_setups_without_a_full_reference_are_refused(case, tiny_llama_dir, tmp_path):
    kw = {"beta0": {"beta": 0.0}, "sync_ref_model": {"sync_ref_model": True}, "lora": {}}[case]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    if case == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = make_trainer("rloo", model, tiny_llama_dir, tmp_path, **kw)
    message = {
        "beta0": "beta == 0, so TRL keeps no reference model, and BEMAAnchorCallback needs one",
        "sync_ref_model": "sync_ref_model=True installs TRL's own SyncRefModelCallback",
        "lora": "BEMAAnchorCallback supports full fine-tuning only.*use EMAAnchorCallback",
    }[case]
    with pytest.raises(ValueError, match=message):
        BEMAAnchorCallback(trainer)


def test_not_a_trainer_names_the_callback():
    with pytest.raises(TypeError, match=r"^BEMAAnchorCallback needs a TRL GRPOTrainer or RLOOTrainer"):
        BEMAAnchorCallback(object())

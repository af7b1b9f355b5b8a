"""warpkit.anchor.trl_adapter: TRL's private internals, checked loudly, and used as TRL 1.16 expects.

A trainer lacking an internal fails when the callback is built, with one message naming the TRL version
warpkit was written against, the installed one, and the one file to update; real GRPO/RLOO trainers pass.
"""

from __future__ import annotations

import re
from collections import defaultdict
from importlib import metadata
from types import SimpleNamespace

import pytest
from torch import nn

from tests.anchor.scripts.common import make_trainer
from warpkit.anchor import EMAAnchorCallback, TrlInternalsError
from warpkit.anchor.trl_adapter import ADAPTER_FILE, TRL_VERSION, TrainerAdapter

GOOD_METRICS = {"train": defaultdict(list), "eval": defaultdict(list)}


def _stand_in(**internals):
    """The public attributes the callback reads from a TRL trainer, plus the given private ones."""
    args = SimpleNamespace(gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1)
    return SimpleNamespace(args=args, beta=0.1, model=nn.Linear(2, 2), ref_model=nn.Linear(2, 2), **internals)


def _expected_message(what: str) -> str:
    return (
        f"EMAAnchorCallback cannot attach to this SimpleNamespace: {what}. warpkit's anchor was written against "
        f"TRL 1.16.0 (transformers 5.24.0); installed: TRL {metadata.version('trl')}, transformers "
        f"{metadata.version('transformers')}. Every TRL internal the anchor uses is in "
        "warpkit/anchor/trl_adapter.py: update that one file for this TRL, or install trl==1.16.0."
    )


BROKEN = {
    "no-metrics": (
        {"_load_optimizer_and_scheduler": lambda checkpoint: None},
        "`trainer._metrics` should be a dict with a 'train' dict of metric lists, got nothing",
    ),
    "metrics-not-a-dict": (
        {"_metrics": [], "_load_optimizer_and_scheduler": lambda checkpoint: None},
        "`trainer._metrics` should be a dict with a 'train' dict of metric lists, got a list",
    ),
    "metrics-without-train": (
        {"_metrics": {"eval": {}}, "_load_optimizer_and_scheduler": lambda checkpoint: None},
        "`trainer._metrics` should be a dict with a 'train' dict of metric lists, got a dict with keys ['eval']",
    ),
    "train-not-a-dict": (
        {"_metrics": {"train": []}, "_load_optimizer_and_scheduler": lambda checkpoint: None},
        "`trainer._metrics` should be a dict with a 'train' dict of metric lists, got a dict whose 'train' "
        "entry is a list",
    ),
    "no-resume-hook": (
        {"_metrics": GOOD_METRICS},
        "`trainer._load_optimizer_and_scheduler(checkpoint)` does not exist",
    ),
}


@pytest.mark.parametrize(("internals", "what"), list(BROKEN.values()), ids=list(BROKEN))
@pytest.mark.parametrize("build", [TrainerAdapter, EMAAnchorCallback], ids=["adapter", "callback"])
def test_missing_internals_fail_loudly_at_construction(build, internals, what):
    trainer = _stand_in(**internals)
    with pytest.raises(TrlInternalsError, match=re.escape(_expected_message(what)) + "$"):
        build(trainer)
    assert TRL_VERSION == "1.16.0" and ADAPTER_FILE == "warpkit/anchor/trl_adapter.py"


def test_stand_in_with_the_internals_is_accepted():
    """The bench's stand-in trainer: the internals present, nothing else of TRL."""
    trainer = _stand_in(_metrics=GOOD_METRICS, _load_optimizer_and_scheduler=lambda checkpoint: None)
    callback = EMAAnchorCallback(trainer, ema_rate=0.5)
    callback.reset_to_policy()
    callback.update()
    assert callback.num_updates == 1


@pytest.fixture(params=["grpo", "rloo"])
def real_trainer(request, tiny_llama_dir, tmp_path):
    return make_trainer(request.param, str(tiny_llama_dir), tiny_llama_dir, tmp_path)


def test_metrics_reach_trl_log_lines(real_trainer):
    """Values appended between two log lines are averaged by TRL's `log()` into the next one, then cleared."""
    adapter = TrainerAdapter(real_trainer)
    real_trainer.model.train()
    adapter.log_train_metrics({"anchor/x": 0.5, "anchor/y": 2.0})
    adapter.log_train_metrics({"anchor/x": 1.5, "anchor/y": 4.0})
    real_trainer.log({})
    line = real_trainer.state.log_history[-1]
    assert (line["anchor/x"], line["anchor/y"]) == (1.0, 3.0)
    assert "anchor/x" not in real_trainer._metrics["train"]


def test_resume_hook_records_then_loads(real_trainer, tmp_path, monkeypatch):
    """The wrapper records the checkpoint first, then calls the Trainer's own method with the same arguments."""
    calls = []
    original = real_trainer._load_optimizer_and_scheduler
    monkeypatch.setattr(
        real_trainer,
        "_load_optimizer_and_scheduler",
        lambda checkpoint: (calls.append(("load", checkpoint)), original(checkpoint))[1],
    )
    TrainerAdapter(real_trainer).on_resume(lambda checkpoint: calls.append(("record", checkpoint)))
    checkpoint = str(tmp_path / "checkpoint-2")  # no optimizer file in it: the Trainer's method loads nothing
    assert real_trainer._load_optimizer_and_scheduler(checkpoint) is None
    assert calls == [("record", checkpoint), ("load", checkpoint)]


# ---- which trainers: TRL's GRPOTrainer and RLOOTrainer (and subclasses); every other Trainer by name --------
SUPPORTED = "EMAAnchorCallback supports TRL's GRPOTrainer and RLOOTrainer (and their subclasses), not "


def _trl_class(name: str):
    import trl
    from trl.experimental.online_dpo import OnlineDPOTrainer

    return OnlineDPOTrainer if name == "OnlineDPOTrainer" else getattr(trl, name)


@pytest.fixture(scope="module")
def preference_parts(tmp_path_factory):
    """A tiny llama folder, its tokenizer, and one-row datasets for the preference trainers."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from warpkit.testing import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("pref") / "llama", "llama", num_layers=1)
    pairs = Dataset.from_dict({"prompt": ["The movie was"], "chosen": [" great"], "rejected": [" bad"]})
    prompts = Dataset.from_dict({"prompt": ["The movie was", "I think that"]})
    return folder, AutoTokenizer.from_pretrained(folder), pairs, prompts


def test_real_dpo_trainer_is_refused_by_name(preference_parts, tmp_path):
    """DPOTrainer has `args`, `beta` and `_metrics`: the old `hasattr(trainer, "beta")` check let it in."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    folder, tokenizer, pairs, _ = preference_parts
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    with pytest.raises(TypeError, match=re.escape(SUPPORTED + "DPOTrainer: it is offline preference")):
        EMAAnchorCallback(trainer)


def test_real_online_dpo_trainer_with_lora_is_refused_by_name(preference_parts, tmp_path):
    """With a peft_config, OnlineDPOTrainer reads its reference with the adapters disabled: the anchor would be
    ignored without a word."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    folder, tokenizer, _, prompts = preference_parts
    args = OnlineDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1)
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        reward_funcs=lambda completions, **_: [1.0] * len(completions),
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    assert trainer.ref_model is None and trainer.beta > 0
    with pytest.raises(TypeError, match=re.escape(SUPPORTED + "OnlineDPOTrainer: with LoRA (a peft_config)")):
        EMAAnchorCallback(trainer)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("DPOTrainer", "it is offline preference optimisation"),
        (
            "OnlineDPOTrainer",
            "with LoRA (a peft_config) it computes its reference with the adapters disabled",
        ),
        (
            "KTOTrainer",
            "warpkit knows how the KL reference of those two trainers is computed, and of no other",
        ),
        ("SFTTrainer", "warpkit knows how the KL reference of those two trainers is computed"),
        ("RewardTrainer", "warpkit knows how the KL reference of those two trainers is computed"),
    ],
)
@pytest.mark.parametrize("build", [TrainerAdapter, EMAAnchorCallback], ids=["adapter", "callback"])
def test_other_trl_trainers_are_refused_by_name(build, name, why):
    """Instances of TRL's real classes (built without their `__init__`) and of subclasses, named in the error
    with the reason and the fix."""
    cls = _trl_class(name)
    subclass = type(f"My{name}", (cls,), {})
    for trainer_cls in (cls, subclass):
        trainer = trainer_cls.__new__(trainer_cls)  # `beta` is a class property of some: nothing is set
        with pytest.raises(TypeError) as info:
            build(trainer)
        message = str(info.value)
        assert message.startswith(f"{SUPPORTED}{trainer_cls.__name__}: {why}"), message
        assert message.endswith("Train with RLOOTrainer or GRPOTrainer (as `warpkit train` and `warpkit.loop.rl` "
                                "do), or leave the callback out.")  # fmt: skip


def test_subclasses_of_the_supported_trainers_are_accepted(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import RLOOTrainer

    from tests.anchor.scripts.common import length_reward, make_config, prompt_dataset

    class MyRLOO(RLOOTrainer):
        pass

    trainer = MyRLOO(
        model=str(tiny_llama_dir),
        reward_funcs=length_reward,
        args=make_config("rloo", tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    assert EMAAnchorCallback(trainer).trainer is trainer

"""Shared set-up for the anchor tests and their multi-process scripts: a tiny RLOO/GRPO run on CPU.

Kept importable without pytest, because `accelerate launch` runs the scripts beside it in fresh processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

PROMPTS = [
    "The movie was",
    "I think that",
    "Once upon a time",
    "The food here",
    "My day was",
    "This book is",
] * 4


def length_reward(completions, **kwargs) -> list[float]:
    """Deterministic reward: longer completions score higher (enough signal to move a tiny policy)."""
    return [float(len(c)) / 10.0 for c in completions]


def prompt_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS})


def make_config(kind: str, output_dir: str | Path, **overrides):
    """A GRPOConfig/RLOOConfig for a few fast CPU steps; `overrides` win."""
    from trl import GRPOConfig, RLOOConfig

    cls = {"rloo": RLOOConfig, "grpo": GRPOConfig}[kind]
    kw = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=4,
        learning_rate=5e-3,
        beta=0.1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        temperature=1.0,
        disable_dropout=True,
    )
    kw.update(overrides)
    return cls(**kw)


def make_trainer(kind: str, model, tokenizer_dir, output_dir, *, peft_config=None, **overrides):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer, RLOOTrainer

    cls = {"rloo": RLOOTrainer, "grpo": GRPOTrainer}[kind]
    return cls(
        model=model,
        reward_funcs=length_reward,
        args=make_config(kind, output_dir, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
        peft_config=peft_config,
    )


class PolicySnapshots(TrainerCallback):
    """Records the policy's parameters (fp64, by name) at train begin and after every optimizer step."""

    def __init__(self, trainer, names: list[str] | None = None) -> None:
        self.trainer = trainer
        self.names = names
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def _take(self) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.snapshots.append(
            {
                n: p.detach().to(torch.float64).clone()
                for n, p in model.named_parameters()
                if self.names is None or n in self.names
            }
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self._take()

    def on_step_end(self, args, state, control, **kwargs):
        self._take()


def ema_reference(snapshots: list[dict[str, torch.Tensor]], ema_rate: float, update_every: int = 1) -> dict:
    """The anchor recomputed in float64: a_0 = policy_0, a_t = (1 - mu) a_{t-1} + mu policy_t every tau steps."""
    anchor = {n: t.clone() for n, t in snapshots[0].items()}
    for step, snap in enumerate(snapshots[1:], start=1):
        if step % update_every == 0:
            for n in anchor:
                anchor[n] = (1 - ema_rate) * anchor[n] + ema_rate * snap[n]
    return anchor


def load_perturbed(model_dir, dtype=torch.float32, scale: float = 0.01):
    """The tiny model with its weights shifted in memory, so TRL's reference (re-read from disk) differs from
    the policy the run starts from."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def bema_reference(snapshots: list[dict], *, update_freq, ema_power, bias_power, lag, update_after,
                   multiplier=1.0, min_ema_multiplier=0.0) -> tuple[dict, dict, dict]:  # fmt: skip
    """BEMA recomputed in float64 from TRL's docstring formulas: (anchor, EMA, theta_0) after the last snapshot;
    snapshots[t] = the policy after step t (snapshots[0]: at the start). t < tau: nothing; t == tau:
    theta_0 = EMA = theta_t; (t - tau) % phi == 0: beta = max((rho + gamma t)^-kappa, floor), alpha =
    (rho + gamma t)^-eta, EMA = (1 - beta) EMA + beta theta_t, anchor = EMA + alpha (theta_t - theta_0)."""
    anchor = {n: t.clone() for n, t in snapshots[0].items()}
    ema, theta0 = dict(anchor), dict(anchor)
    for t, policy in enumerate(snapshots[1:], start=1):
        if t < update_after:
            continue
        if t == update_after:
            theta0, ema = dict(policy), dict(policy)
            continue
        if (t - update_after) % update_freq:
            continue
        base = lag + multiplier * t
        beta, alpha = max(base**-ema_power, min_ema_multiplier), base**-bias_power
        ema = {n: (1 - beta) * ema[n] + beta * policy[n] for n in ema}
        anchor = {n: ema[n] + alpha * (policy[n] - theta0[n]) for n in ema}
    return anchor, ema, theta0


def elastic_reference(pre: list[dict], ema_rate: float, reset_every: int) -> tuple[list[dict], dict]:
    """Elastic Reset in float64: (post_t for t = 0..T, the final EMA) from the policies pre_0..pre_T the optimizer
    produced (before any reset of their step). init = pre_0; EMA = init; for t = 1..T: EMA = (1 - mu) EMA +
    mu pre_t; if t % n == 0: post_t = EMA, EMA = init; else post_t = pre_t."""
    init = pre[0]
    ema, post = dict(init), [dict(init)]
    for t, policy in enumerate(pre[1:], start=1):
        ema = {n: (1 - ema_rate) * ema[n] + ema_rate * policy[n] for n in ema}
        if t % reset_every == 0:
            post.append(ema)
            ema = dict(init)
        else:
            post.append(policy)
    return post, ema

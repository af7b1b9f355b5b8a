"""The policy a run publishes (`rl.final_policy`): its last weights, or a uniform mean of its checkpoints.

| `rl.final_policy` | `policy/` holds                                                   | setting    | paper              |
|-------------------|-------------------------------------------------------------------|------------|--------------------|
| `last` (default)  | the weights at `max_steps`                                        | -          | -                  |
| `swa`             | mean of the checkpoints at steps >= `swa_start` (the last included) | swa_start | Izmailov et al. 2018 |
| `lawa`            | mean of the last k checkpoints (the one at `max_steps` included)   | lawa_k     | Kaddour 2022       |

The checkpoints a run saves are known before it starts (every `save_steps`, and the last step), so the window
is checked when the settings are parsed: larger than the run, or than what `save_total_limit` keeps, is
refused. The mean is computed after training by the streaming merge engine (`warpkit.merge.soups.uniform_soup`:
one chunk per checkpoint in memory, float64 arithmetic, the checkpoints' dtype out) into a temp folder that
replaces `policy/` atomically; a rerun after a kill during the averaging recomputes it from the same
checkpoints, bit for bit.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

__all__ = ["FINAL_POLICIES", "average_checkpoints", "check_final_policy_args", "check_final_policy_fields"]

FINAL_POLICIES = ("last", "swa", "lawa")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_NOT_POLICY = ("trainer_state.json", "warpkit_checkpoint.json")  # a checkpoint's files the soup would carry


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_final_policy_fields(rl_args: Any) -> None:
    """`final_policy` is a known rule; `swa_start` (>= 1) with `swa` only, `lawa_k` (>= 1) with `lawa` only."""
    rule = rl_args.final_policy
    if rule not in FINAL_POLICIES:
        raise ValueError(
            f"final_policy={rule!r}: choose 'last' (the weights at max_steps), 'swa' (mean of the checkpoints "
            "from swa_start on) or 'lawa' (mean of the last lawa_k checkpoints)."
        )
    for name, owner, what in (
        ("swa_start", "swa", "the first step whose checkpoint enters the mean"),
        ("lawa_k", "lawa", "the number of last checkpoints averaged"),
    ):
        value = getattr(rl_args, name)
        if rule == owner and not _is_count(value):
            raise ValueError(f"{name}={value!r}: final_policy='{owner}' needs {name} >= 1, {what}.")
        if rule != owner and value is not None:
            raise ValueError(
                f"{name}={value!r} is set but final_policy={rule!r}: only final_policy='{owner}' uses it. "
                f"Remove {name} or set final_policy: {owner}."
            )


def saved_steps(training_args: Any) -> list[int]:
    """The steps at which the run saves a checkpoint: every `save_steps` (a fraction < 1 of `max_steps` is
    rounded up, as transformers does) and `max_steps` itself (transformers saves at the end)."""
    max_steps, every = training_args.max_steps, training_args.save_steps
    every = math.ceil(max_steps * every) if every < 1 else int(every)
    steps = list(range(every, max_steps + 1, every))
    return steps if steps and steps[-1] == max_steps else [*steps, max_steps]


def window(rl_args: Any, training_args: Any) -> list[int]:
    """The steps of the checkpoints averaged (empty for `last`)."""
    steps = saved_steps(training_args)
    if rl_args.final_policy == "swa":
        return [s for s in steps if s >= rl_args.swa_start]
    if rl_args.final_policy == "lawa":
        return steps[-rl_args.lawa_k :]
    return []


def check_final_policy_args(rl_args: Any, training_args: Any, model_args: Any) -> None:
    """What `swa` / `lawa` need from the run: full weights (no LoRA), a known number of steps, checkpoints
    every `save_steps`, a window inside the run, and `save_total_limit` keeping the whole window."""
    rule = rl_args.final_policy
    if rule == "last":
        return
    if getattr(model_args, "use_peft", False):
        raise ValueError(
            f"final_policy={rule!r} averages full weights, and use_peft is true: the mean of LoRA factors is "
            "not the mean of the policies. Set use_peft: false, or final_policy: last and average the "
            "adapters exactly (densified) with `warpkit merge --method linear --init <init> checkpoint-*`."
        )
    if training_args.max_steps is None or training_args.max_steps < 1:
        raise ValueError(
            f"max_steps={training_args.max_steps} with final_policy={rule!r}: the averaging window is counted "
            "in steps; set max_steps to the run's number of optimizer steps."
        )
    if str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "steps":
        raise ValueError(
            f"save_strategy={training_args.save_strategy!r} with final_policy={rule!r}: the average is taken "
            "over the run's checkpoints; set save_strategy: steps (and save_steps)."
        )
    steps = saved_steps(training_args)
    if rule == "swa" and rl_args.swa_start > training_args.max_steps:
        raise ValueError(
            f"swa_start={rl_args.swa_start} is after the run's last step (max_steps={training_args.max_steps}): "
            f"the SWA window would be empty. Set swa_start <= {training_args.max_steps}."
        )
    if rule == "lawa" and rl_args.lawa_k > len(steps):
        raise ValueError(
            f"lawa_k={rl_args.lawa_k} is more checkpoints than the run saves ({len(steps)}: steps {steps}, "
            f"save_steps={training_args.save_steps}, max_steps={training_args.max_steps}). Set lawa_k <= "
            f"{len(steps)} or save more often (a smaller save_steps)."
        )
    need, limit = len(window(rl_args, training_args)), training_args.save_total_limit
    if limit is not None and limit < need:
        raise ValueError(
            f"save_total_limit={limit} would delete checkpoints that final_policy={rule!r} averages (it needs "
            f"the last {need}). Set save_total_limit >= {need}, or remove it."
        )


def average_checkpoints(rl_args: Any, training_args: Any, policy: Path) -> dict[str, Any]:
    """Publish the uniform mean of the window's checkpoints as `policy` (main process only). Returns the
    record for run_info.json: the rule, its setting, and the checkpoints averaged (steps and paths)."""
    from warpkit._util.files import publish_dir
    from warpkit.loop.checkpoints import publish_finished, verify_checkpoint
    from warpkit.merge.soups import uniform_soup

    output_dir = Path(training_args.output_dir)
    steps = window(rl_args, training_args)
    folders = [output_dir / f"checkpoint-{s}" for s in steps]
    for folder in folders:
        why = "missing" if not folder.is_dir() else verify_checkpoint(folder, with_anchor=False)
        if why is None and not any((folder / name).is_file() for name in _WEIGHTS):
            why = "without full model weights (under ZeRO-3 set stage3_gather_16bit_weights_on_model_save)"
        if why is not None:
            raise ValueError(
                f"final_policy={rl_args.final_policy!r} averages {folder}, which is {why}. Rerun the run "
                "from scratch (a new output_dir), or set final_policy: last."
            )
    if len(folders) == 1:  # a one-checkpoint mean is that checkpoint: its model files, as `last` publishes
        publish_finished(folders[0], policy)
    else:
        tmp = policy.parent / f".{policy.name}.tmp-average"  # one fixed name: a killed average is redone
        shutil.rmtree(tmp, ignore_errors=True)
        uniform_soup(folders, tmp, compute_dtype="float64", progress=False)
        for name in _NOT_POLICY:
            (tmp / name).unlink(missing_ok=True)
        publish_dir(tmp, policy, overwrite=True)
    setting = {"swa": "swa_start", "lawa": "lawa_k"}[rl_args.final_policy]
    return {
        "method": rl_args.final_policy,
        setting: getattr(rl_args, setting),
        "checkpoints": [{"step": s, "path": str(f)} for s, f in zip(steps, folders, strict=True)],
    }

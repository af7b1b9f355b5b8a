"""One RL run of WARP (Algorithm 1, inner loop): TRL's RLOO or GRPO with the EMA anchor as KL reference (or one
of its relatives, `rl.anchor`: BEMA, Elastic Reset, or TRL's fixed SFT reference for baselines).

Launched per run by the driver as `accelerate launch -m warpkit.loop.rl --config run.yaml` (or by hand through
`trainers/rl.py`). Every field of TRL's `RLOOConfig`/`GRPOConfig`, TRL's `ModelConfig` (LoRA) and
`RLArguments` below is settable from YAML and the command line, TrlParser style.

How it departs from the paper: the RL algorithm is TRL's RLOO (REINFORCE with a leave-one-out baseline, KL
summed per sequence and subtracted from the reward, as WARP) rather than plain REINFORCE; GRPO is selectable.
The M runs of an iteration differ by `data_seed`, which permutes the prompts before TRL's own sampler.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from warpkit._util.config import load_yaml_mapping
from warpkit._util.files import publish_dir, write_atomic
from warpkit.loop.anchors import (
    ANCHORS,
    anchor_callback,
    anchor_settings,
    check_anchor_args,
    check_anchor_fields,
)
from warpkit.loop.final_policy import check_final_policy_args, check_final_policy_fields
from warpkit.loop.rewards import FiniteReward, check_reward_models, finite_reward
from warpkit.workloads import load_prompt_dataset, resolve_model_path, reward_spec

__all__ = [
    "POLICY_DIRNAME",
    "RLArguments",
    "build_trainer",
    "check_args",
    "check_settings",
    "main",
    "parse_args",
    "reward_funcs",
    "save_policy",
]

POLICY_DIRNAME = "policy"  # the run's final policy, a save_pretrained folder (or LoRA adapter) in output_dir
log = logging.getLogger(__name__)
ALGORITHMS = ("rloo", "grpo")


@dataclass
class RLArguments:
    """warpkit's own settings of an RL run; TRL's config and `ModelConfig` carry the rest.

    Args:
        algorithm: `"rloo"` (the paper's REINFORCE with leave-one-out baseline, default) or `"grpo"`.
        reward_funcs: rewards, each `"package.module:function"` (TRL's `reward_funcs` signature) or the path of
            a sequence-classification reward model folder.
        dataset: prompts: `"package.module:function"` returning a `datasets.Dataset` (called with
            `dataset_split`), a `.json`/`.jsonl`/`.parquet`/`.csv` file, a `save_to_disk` folder, or a
            downloaded dataset repository folder (read locally).
            It needs a `prompt` column (plain text or chat messages).
        dataset_split: split passed to a dataset function.
        anchor: the KL reference (README, "The anchor (WARP stage 1) and its relatives"):
            `"ema"` (WARP stage 1: an EMA of the policy, `warpkit.anchor.EMAAnchorCallback`),
            `"bema"` (the bias-corrected EMA of the policy, `BEMAAnchorCallback`, TRL's BEMA rule),
            `"elastic_reset"` (the reference stays the init; every n steps policy <- EMA of the policy, EMA <-
            init, `ElasticResetCallback`), or `"sft"` (TRL's fixed reference, the classic-RLHF baseline).
        ema_rate: μ, the EMA rate: ema <- (1 - μ) ema + μ policy, for `ema` (the anchor; WARP: 0.01) and
            `elastic_reset` (its EMA; the paper's decay 0.995 is μ = 0.005).
        ema_update_every: update that EMA every this many optimizer steps (`ema`, `elastic_reset`).
        reset_every: n >= 1, optimizer steps between two resets of `elastic_reset` (required by it, refused
            with other anchors).
        bema_update_freq: φ >= 1, optimizer steps between BEMA updates (TRL's `update_freq`; its default 400
            keeps an evaluation model, an anchor moves every step).
        bema_ema_power: κ >= 0, EMA rate β_t = (ρ + γ t)^-κ (TRL's `ema_power`).
        bema_bias_power: η >= 0, correction α_t = (ρ + γ t)^-η (TRL's `bias_power`).
        bema_lag: ρ >= 0 (TRL's `lag`); ρ + γ >= 1.
        bema_update_after: τ >= 0, burn-in steps before θ_0 is taken (TRL's `update_after`).
        bema_multiplier: γ >= 0 (TRL's `multiplier`).
        bema_min_ema_multiplier: a floor in [0, 1] for β_t (TRL's `min_ema_multiplier`).
        final_policy: what `policy/` holds (README, "Checkpoint averaging"): `"last"` (the weights at
            `max_steps`, default), `"swa"` (SWA, Izmailov et al. 2018: the uniform mean of the checkpoints at
            steps >= `swa_start`) or `"lawa"` (LAWA, Kaddour 2022: the uniform mean of the last `lawa_k`
            checkpoints); both include the checkpoint at `max_steps`.
        swa_start: `swa`: the first step whose checkpoint enters the mean (1 <= swa_start <= max_steps).
        lawa_k: `lawa`: k >= 1, the number of last checkpoints averaged.
    """

    algorithm: str = field(default="rloo", metadata={"help": "rloo (default, the paper's) or grpo."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["warpkit.workloads.default:vader_reward"],
        metadata={"help": "'module:function' reward functions or reward-model folders."},
    )
    dataset: str = field(
        default="warpkit.workloads.default:review_prompts",
        metadata={"help": "'module:function' returning a Dataset, a data file, or a save_to_disk folder."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split passed to a dataset function."})
    anchor: str = field(
        default="ema",
        metadata={"help": "ema (WARP), bema, elastic_reset, or sft (fixed reference baseline)."},
    )
    ema_rate: float = field(default=0.01, metadata={"help": "mu: ema <- (1 - mu) ema + mu policy."})
    ema_update_every: int = field(default=1, metadata={"help": "EMA update period in optimizer steps."})
    reset_every: int | None = field(
        default=None, metadata={"help": "elastic_reset: n, steps between resets."}
    )
    bema_update_freq: int = field(default=1, metadata={"help": "bema: phi, steps between updates."})
    bema_ema_power: float = field(
        default=0.5, metadata={"help": "bema: kappa, beta_t = (rho + gamma t)^-kappa."}
    )
    bema_bias_power: float = field(
        default=0.2, metadata={"help": "bema: eta, alpha_t = (rho + gamma t)^-eta."}
    )
    bema_lag: float = field(default=10.0, metadata={"help": "bema: rho, the lag."})
    bema_update_after: int = field(default=0, metadata={"help": "bema: tau, burn-in steps."})
    bema_multiplier: float = field(default=1.0, metadata={"help": "bema: gamma."})
    bema_min_ema_multiplier: float = field(default=0.0, metadata={"help": "bema: floor of beta_t."})
    final_policy: str = field(default="last", metadata={"help": "last, swa or lawa (checkpoint averaging)."})
    swa_start: int | None = field(default=None, metadata={"help": "swa: first step averaged."})
    lawa_k: int | None = field(default=None, metadata={"help": "lawa: k, last checkpoints averaged."})

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: choose one of {ALGORITHMS}.")
        if self.anchor not in ANCHORS:
            raise ValueError(
                f"anchor={self.anchor!r}: choose 'ema' (WARP), 'bema', 'elastic_reset' or 'sft' (fixed SFT "
                "reference)."
            )
        if not 0 < self.ema_rate <= 1:
            raise ValueError(f"ema_rate={self.ema_rate} must be in (0, 1]; the paper uses 0.01.")
        if self.ema_update_every < 1:
            raise ValueError(f"ema_update_every={self.ema_update_every} must be a positive number of steps.")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        check_anchor_fields(self)
        check_final_policy_fields(self)

    def bema_settings(self) -> dict:
        """The `bema_*` fields under TRL's `BEMACallback` names (`BEMAAnchorCallback`'s arguments)."""
        names = ("update_freq", "ema_power", "bias_power", "lag", "update_after", "multiplier")
        return {n: getattr(self, f"bema_{n}") for n in (*names, "min_ema_multiplier")}


def reward_funcs(specs: Sequence[str]) -> list[str | FiniteReward]:
    """TRL's `reward_funcs`: callables for `'module:function'`, each wrapped in `FiniteReward` (a NaN, inf or
    None reward raises, naming the spec and the completion), and folder paths (TRL loads reward models;
    `build_trainer` checks their scores with `check_reward_models`)."""
    return [
        finite_reward(f, spec) if callable(f) else str(f)
        for f, spec in ((reward_spec(spec), spec) for spec in specs)
    ]


def _config_class(algorithm: str):
    from trl import GRPOConfig, RLOOConfig

    return {"rloo": RLOOConfig, "grpo": GRPOConfig}[algorithm]


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` as argparse reads it, ``--flag VALUE`` or ``--flag=VALUE`` (the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value


def _split_config_flag(argv: Sequence[str]) -> list[str]:
    """``--config=x.yaml`` as ``--config x.yaml``: TrlParser finds its config file by the bare flag only."""
    out: list[str] = []
    for arg in argv:
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


def _peek_algorithm(argv: Sequence[str]) -> str:
    """The config class depends on the algorithm, so read it before the full parse: ``--algorithm X`` or
    ``--algorithm=X`` on the command line, else the ``--config`` file's ``algorithm``, else rloo."""
    algorithm = _flag_value(argv, "--algorithm")
    if algorithm is not None:
        return algorithm
    config = _flag_value(argv, "--config")
    if config is not None:
        return str(load_yaml_mapping(config, "run config").get("algorithm", "rloo"))
    return "rloo"


def parse_args(argv: Sequence[str] | None = None):
    """(RLArguments, RLOOConfig | GRPOConfig, ModelConfig) from `--config run.yaml` plus CLI overrides.

    Unknown fields are refused (TrlParser's `fail_with_unknown_args`). `--flag value` and `--flag=value` both
    work, for `--config` and `--algorithm` too.
    """
    from trl import ModelConfig, TrlParser

    argv = _split_config_flag(sys.argv[1:] if argv is None else argv)
    algorithm = _peek_algorithm(argv)
    for _ in range(2):  # parsed again only when argparse read another algorithm (an abbreviated flag)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r}: choose one of {ALGORITHMS}.")
        parser = TrlParser((RLArguments, _config_class(algorithm), ModelConfig))
        parsed = parser.parse_args_and_config(argv)
        if parsed[0].algorithm == algorithm:
            return parsed
        algorithm = parsed[0].algorithm
    raise AssertionError(f"the algorithm of {argv} changed between two parses")


def check_settings(run: dict) -> RLArguments:
    """Parse a run's settings (the dict a `warp_run.yaml` holds) as the run will, and `check_args` them:
    a bad field fails in the driver, before any run starts. Unknown fields are refused. Returns warpkit's
    own settings (rewards, dataset, anchor)."""
    from trl import ModelConfig, TrlParser

    algorithm = run.get("algorithm", "rloo")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: choose one of {ALGORITHMS}.")
    parser = TrlParser((RLArguments, _config_class(algorithm), ModelConfig))
    rl_args, training_args, model_args = parser.parse_dict(run)
    check_args(rl_args, training_args, model_args)
    return rl_args


def check_args(rl_args: RLArguments, training_args, model_args) -> None:
    """Refuse settings that cannot do what the run promises, before any model is loaded."""
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: the init (SFT) model folder.")
    if training_args.max_steps == 0:
        raise ValueError(
            "max_steps=0 trains nothing: give a positive number of optimizer steps (or -1 to train "
            "num_train_epochs epochs)."
        )
    check_anchor_args(rl_args, training_args, model_args)
    check_final_policy_args(rl_args, training_args, model_args)


def build_trainer(rl_args: RLArguments, training_args, model_args):
    """The TRL trainer for one run, with the anchor's callback attached (none for `anchor == "sft"`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer, RLOOTrainer, get_peft_config

    check_args(rl_args, training_args, model_args)
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype),
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        from peft import get_peft_model

        # Wrapped here, not by TRL: with an already-wrapped PeftModel TRL keeps a "ref" adapter as the
        # reference, which the EMA anchor can move; with peft_config it would use the frozen base instead.
        model = get_peft_model(model, peft_config)
    dataset = load_prompt_dataset(rl_args.dataset, split=rl_args.dataset_split)
    if training_args.data_seed is not None:
        # TRL's sampler permutes with `seed`; a data_seed-dependent pre-permutation makes runs differ in
        # prompt order only, as in the paper.
        dataset = dataset.shuffle(seed=training_args.data_seed)
    trainer_cls = {"rloo": RLOOTrainer, "grpo": GRPOTrainer}[rl_args.algorithm]
    rewards = reward_funcs(rl_args.reward_funcs)
    names = [r if isinstance(r, str) else r.name for r in rewards]  # TRL replaces folders by models in place
    trainer = trainer_cls(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    check_reward_models(trainer, names)
    if rl_args.anchor != "sft":
        trainer.add_callback(anchor_callback(trainer, rl_args))
    return trainer


def _policy_tmp(output_dir: Path) -> Path:
    """Where `save_policy` writes before the rename: one fixed name, since every rank writes into it."""
    return output_dir / f".{POLICY_DIRNAME}.tmp-save"


def save_policy(trainer, output_dir: str | Path) -> Path:
    """Save the final policy to `output_dir/policy` atomically: all ranks write a temp folder, rank 0 renames.

    The temp folder has a fixed name (every rank must write into the same one), removed first if a crash left it.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / POLICY_DIRNAME, _policy_tmp(output_dir)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # collective under DeepSpeed: every rank takes part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_dir(tmp, final, overwrite=True)
    accelerator.wait_for_everyone()
    return final


def main(argv: Sequence[str] | None = None) -> Path:
    """Train one run to the end (resuming from its newest checkpoint that verifies) and save its policy (the
    last weights, or the mean of its checkpoints for `final_policy` swa / lawa)."""
    from warpkit._util.log import setup_logging
    from warpkit.loop.checkpoints import CheckpointRecord, finished_step, publish_finished, resume_point

    setup_logging()
    rl_args, training_args, model_args = parse_args(argv)
    trainer = build_trainer(rl_args, training_args, model_args)
    trainer.add_callback(CheckpointRecord())
    output_dir, accelerator = Path(training_args.output_dir), trainer.accelerator
    if accelerator.is_main_process:  # a save killed mid-way; a resumed run may never reach save_policy
        shutil.rmtree(_policy_tmp(output_dir), ignore_errors=True)
    resume = resume_point(output_dir, with_anchor=rl_args.anchor != "sft")
    if resume is not None and finished_step(resume):  # killed after its last checkpoint: nothing to train
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        if rl_args.final_policy != "last":  # killed after training, maybe while averaging: average again
            return _finish_averaged(rl_args, training_args, trainer, step, resume)
        done = publish_finished(resume, output_dir / POLICY_DIRNAME) if accelerator.is_main_process else True
        accelerator.wait_for_everyone()
        if done:
            return _write_run_info(rl_args, training_args, trainer, output_dir / POLICY_DIRNAME, step, resume)
        log.warning("%s holds no full weights to publish: training its last step again.", resume)
    if training_args.save_only_model:  # no optimizer state to resume from: such a run restarts from scratch
        resume = None
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if rl_args.final_policy != "last":  # the checkpoint at max_steps holds the last weights
        return _finish_averaged(rl_args, training_args, trainer, trainer.state.global_step, resume)
    policy = save_policy(trainer, output_dir)
    return _write_run_info(rl_args, training_args, trainer, policy, trainer.state.global_step, resume)


def _finish_averaged(rl_args, training_args, trainer, step: int, resume: Path | None) -> Path:
    """`final_policy` swa / lawa: the main process averages the checkpoints into policy/, then run_info."""
    from warpkit.loop.final_policy import average_checkpoints

    policy, record = Path(training_args.output_dir) / POLICY_DIRNAME, None
    if trainer.accelerator.is_main_process:
        record = average_checkpoints(rl_args, training_args, policy)
    trainer.accelerator.wait_for_everyone()
    return _write_run_info(rl_args, training_args, trainer, policy, step, resume, record)


def _write_run_info(
    rl_args, training_args, trainer, policy: Path, global_step: int, resume: Path | None,
    final_policy: dict | None = None,
) -> Path:  # fmt: skip
    import torch

    from warpkit import __version__

    if trainer.accelerator.is_main_process:
        info = {
            "warpkit_version": __version__,
            "algorithm": rl_args.algorithm,
            "anchor": rl_args.anchor,
            "ema_rate": rl_args.ema_rate,
            "anchor_settings": anchor_settings(rl_args),
            "beta": training_args.beta,
            "data_seed": training_args.data_seed,
            "num_processes": trainer.accelerator.num_processes,
            "cpu_threads_per_process": torch.get_num_threads(),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "global_step": global_step,
            "resumed_from": str(resume) if resume else None,
            "policy": str(policy),
        }
        if final_policy is not None:  # absent for `last`: its run_info is as before final_policy existed
            info["final_policy"] = final_policy
        write_atomic(Path(training_args.output_dir) / "run_info.json", json.dumps(info, indent=1))
    return policy


if __name__ == "__main__":
    main()

"""One RL run of WARP (Algorithm 1, inner loop): TRL's RLOO or GRPO with the EMA anchor as KL reference.

Launched per run by the driver as `accelerate launch -m warpkit.rl --config run.yaml` (or by hand through
`trainers/rl.py`). Every field of TRL's `RLOOConfig`/`GRPOConfig`, TRL's `ModelConfig` (LoRA) and
`RLArguments` below is settable from YAML and the command line, TrlParser style.

How it departs from the paper: the RL algorithm is TRL's RLOO (REINFORCE with a leave-one-out baseline, KL
summed per sequence and subtracted from the reward, as WARP) rather than plain REINFORCE; GRPO is selectable.
The M runs of an iteration differ by `data_seed`, which permutes the prompts before TRL's own sampler.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "POLICY_DIRNAME",
    "RLArguments",
    "build_trainer",
    "last_complete_checkpoint",
    "load_prompts",
    "load_reward_funcs",
    "main",
    "parse_args",
    "resolve_model_path",
]

POLICY_DIRNAME = "policy"  # the run's final policy, a save_pretrained folder (or LoRA adapter) in output_dir
ALGORITHMS = ("rloo", "grpo")
ANCHORS = ("ema", "sft")


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
        anchor: `"ema"` (WARP stage 1: the reference is an EMA of the policy) or `"sft"` (TRL's fixed
            reference, the classic-RLHF baseline).
        ema_rate: μ, the EMA rate: anchor <- (1 - μ) anchor + μ policy. Paper: 0.01.
        ema_update_every: update the anchor every this many optimizer steps.
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
    anchor: str = field(default="ema", metadata={"help": "ema (WARP) or sft (fixed reference baseline)."})
    ema_rate: float = field(default=0.01, metadata={"help": "mu: anchor <- (1 - mu) anchor + mu policy."})
    ema_update_every: int = field(default=1, metadata={"help": "Anchor update period in optimizer steps."})

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: choose one of {ALGORITHMS}.")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor={self.anchor!r}: choose 'ema' (WARP) or 'sft' (fixed SFT reference).")
        if not 0 < self.ema_rate <= 1:
            raise ValueError(f"ema_rate={self.ema_rate} must be in (0, 1]; the paper uses 0.01.")
        if self.ema_update_every < 1:
            raise ValueError(f"ema_update_every={self.ema_update_every} must be a positive number of steps.")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]


def resolve_model_path(name: str) -> str:
    """`warpkit:default` is the embedded SmolLM2-135M-Instruct, `warpkit:tiny` a tiny local llama; else a folder.

    Hub names are refused on purpose: nothing downloads at run time, and TRL reloads the reference from the
    model's path, so the init must be a folder on disk.
    """
    if name == "warpkit:default":
        from warpkit.workloads.default import prepare_default_model

        return str(prepare_default_model())
    if name == "warpkit:tiny":
        from warpkit.testing import save_tiny_model
        from warpkit.workloads.default import cache_dir

        path = cache_dir() / "tiny-llama-h32-l2-s0"
        if not (path / "config.json").is_file():
            save_tiny_model(path, "llama", seed=0)
        return str(path)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is not a model folder (no config.json): pass a save_pretrained folder, "
            "'warpkit:default' (embedded SmolLM2-135M-Instruct) or 'warpkit:tiny'."
        )
    return str(path.resolve())


def load_reward_funcs(specs: Sequence[str]) -> list[str | Callable]:
    """Callables for `'module:function'`, folder paths (TRL loads them as reward models) otherwise."""
    from warpkit.frontier_inputs import import_object

    funcs: list[str | Callable] = []
    for spec in specs:
        if Path(spec).expanduser().is_dir():
            if not (Path(spec).expanduser() / "config.json").is_file():
                raise FileNotFoundError(f"reward model folder {spec!r} has no config.json.")
            funcs.append(str(Path(spec).expanduser().resolve()))
        elif ":" in spec:
            func = import_object(spec, "reward")
            if not callable(func):
                raise TypeError(f"reward {spec!r} is not callable.")
            funcs.append(func)
        else:
            raise ValueError(
                f"reward {spec!r} is neither 'module:function' nor an existing reward-model folder."
            )
    return funcs


def load_prompts(spec: str, split: str = "train"):
    """A `datasets.Dataset` with a `prompt` column from a function, a data file or a `save_to_disk` folder."""
    import datasets

    from warpkit.frontier_inputs import import_object

    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")):
        dataset = datasets.load_from_disk(str(path))
    elif path.is_dir():  # a downloaded dataset repository (parquet/json files): read locally, no hub access
        dataset = datasets.load_dataset(str(path), split=split)
    elif path.is_file():
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise ValueError(f"dataset file {spec!r}: use .json, .jsonl, .parquet or .csv.")
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    elif ":" in spec:
        dataset = import_object(spec, "dataset")(split)
    else:
        raise FileNotFoundError(
            f"dataset {spec!r} is neither 'module:function' nor an existing file or folder."
        )
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset {spec!r} has no 'prompt' column (columns: {dataset.column_names}).")
    return dataset


def _config_class(algorithm: str):
    from trl import GRPOConfig, RLOOConfig

    return {"rloo": RLOOConfig, "grpo": GRPOConfig}[algorithm]


def _peek_algorithm(argv: Sequence[str]) -> str:
    """The config class depends on the algorithm, so read it before the full parse."""
    import yaml

    argv = list(argv)
    if "--algorithm" in argv:
        return argv[argv.index("--algorithm") + 1]
    if "--config" in argv:
        with open(argv[argv.index("--config") + 1]) as f:
            return (yaml.safe_load(f) or {}).get("algorithm", "rloo")
    return "rloo"


def parse_args(argv: Sequence[str] | None = None):
    """(RLArguments, RLOOConfig | GRPOConfig, ModelConfig) from `--config run.yaml` plus CLI overrides.

    Unknown fields are refused (TrlParser's `fail_with_unknown_args`).
    """
    from trl import ModelConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    algorithm = _peek_algorithm(argv)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: choose one of {ALGORITHMS}.")
    parser = TrlParser((RLArguments, _config_class(algorithm), ModelConfig))
    return parser.parse_args_and_config(argv)


def check_args(rl_args: RLArguments, training_args, model_args) -> None:
    """Refuse settings that cannot do what the run promises, before any model is loaded."""
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: the init (SFT) model folder.")
    if rl_args.anchor == "ema" and training_args.beta == 0:
        raise ValueError(
            "beta=0 with anchor='ema': TRL loads no reference model when beta is 0, so there is no KL anchor "
            "to move. Set beta > 0 (the paper uses 0.1)."
        )
    if rl_args.anchor == "ema" and getattr(training_args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True and anchor='ema' both rewrite the reference: keep one. WARP's EMA anchor is "
            "TRL's sync with alpha = ema_rate and tau = 1, done exactly; set sync_ref_model=False."
        )


def build_trainer(rl_args: RLArguments, training_args, model_args):
    """The TRL trainer for one run, with the EMA anchor callback attached when `anchor == "ema"`."""
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
    dataset = load_prompts(rl_args.dataset, rl_args.dataset_split)
    if training_args.data_seed is not None:
        # TRL's sampler permutes with `seed`; a data_seed-dependent pre-permutation makes runs differ in
        # prompt order only, as in the paper.
        dataset = dataset.shuffle(seed=training_args.data_seed)
    trainer_cls = {"rloo": RLOOTrainer, "grpo": GRPOTrainer}[rl_args.algorithm]
    trainer = trainer_cls(
        model=model,
        reward_funcs=load_reward_funcs(rl_args.reward_funcs),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    if rl_args.anchor == "ema":
        from warpkit.anchor import EMAAnchorCallback

        trainer.add_callback(
            EMAAnchorCallback(trainer, ema_rate=rl_args.ema_rate, update_every=rl_args.ema_update_every)
        )
    return trainer


def last_complete_checkpoint(output_dir: str | Path, *, with_anchor: bool = False) -> str | None:
    """The newest `checkpoint-N` that was fully written, or None.

    `trainer_state.json` is the Trainer's last file of a checkpoint, so one cut short by a crash lacks it and is
    skipped. With `with_anchor`, the EMA anchor's file must be there too (step saves write it before
    `trainer_state.json`; epoch saves after), so a resumed run never restarts from the SFT reference.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for p in output_dir.glob("checkpoint-*"):
        suffix = p.name.removeprefix("checkpoint-")
        if not (p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file()):
            continue
        if with_anchor and not any(p.glob("warpkit_anchor*.safetensors")):
            continue
        steps.append((int(suffix), p))
    return str(max(steps)[1]) if steps else None


def save_policy(trainer, output_dir: str | Path) -> Path:
    """Save the final policy to `output_dir/policy` atomically: all ranks write a temp folder, rank 0 renames."""
    output_dir = Path(output_dir)
    final, tmp = output_dir / POLICY_DIRNAME, output_dir / f".{POLICY_DIRNAME}.tmp"
    accelerator = trainer.accelerator
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # collective under DeepSpeed: every rank takes part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def main(argv: Sequence[str] | None = None) -> Path:
    """Train one run to the end (resuming from its last complete checkpoint) and save its policy."""
    import json

    from warpkit import __version__

    rl_args, training_args, model_args = parse_args(argv)
    trainer = build_trainer(rl_args, training_args, model_args)
    # A save_only_model checkpoint has no optimizer state to resume from: such a run restarts from scratch.
    resume = None
    if not training_args.save_only_model:
        resume = last_complete_checkpoint(training_args.output_dir, with_anchor=rl_args.anchor == "ema")
    trainer.train(resume_from_checkpoint=resume)
    policy = save_policy(trainer, training_args.output_dir)
    if trainer.accelerator.is_main_process:
        info = {
            "warpkit_version": __version__,
            "algorithm": rl_args.algorithm,
            "anchor": rl_args.anchor,
            "ema_rate": rl_args.ema_rate,
            "beta": training_args.beta,
            "data_seed": training_args.data_seed,
            "num_processes": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "global_step": trainer.state.global_step,
            "resumed_from": resume,
            "policy": str(policy),
        }
        (Path(training_args.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1))
    return policy


if __name__ == "__main__":
    main()

"""The `warpkit` console script: thin subcommands over the library modules.

Each subcommand is a pair: `_<name>_parser(subparsers)` declares it, `_<name>(args)` runs it, and
heavy imports happen inside the runner so `warpkit --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


# ----------------------------------------------------------------------------- default-model


def _default_model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "default-model",
        help="prepare the embedded default policy (SmolLM2-135M-Instruct) and print its path",
        description="Convert the packaged SmolLM2-135M-Instruct GGUF to a safetensors folder once "
        "(under $WARPKIT_CACHE, default ~/.cache/warpkit), verify it, and print its path.",
    )
    p.add_argument("--cache", default=None, help="cache folder (default: $WARPKIT_CACHE or ~/.cache/warpkit)")
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="also sample completions for N held-out review prompts and print their VADER reward",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(run=_default_model)


def _default_model(args: argparse.Namespace) -> int:
    from warpkit import default

    path = default.prepare_default_model(args.cache)
    print(path)
    if args.sample > 0:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(args.seed)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = default.review_prompts("eval").select(range(args.sample))
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts["prompt"]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=40, do_sample=True, temperature=0.9, top_k=0, top_p=1.0
            )
        completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        rewards = default.vader_reward(completions)
        for prompt, completion, reward in zip(prompts["prompt"], completions, rewards, strict=True):
            print(f"\n[reward {reward:+.3f}] {prompt[-1]['content']}\n  -> {completion.strip()}")
        print(f"\nmean VADER reward over {len(rewards)} samples: {sum(rewards) / len(rewards):+.3f}")
    return 0


# ----------------------------------------------------------------------------- tiny-model


def _tiny_model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny-model",
        help="write a tiny random causal LM with GPT-2's tokenizer (for tests and tiny configs)",
        description="Build a tiny randomly initialised causal LM offline and save_pretrained it with its tokenizer.",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--untied", action="store_true", help="untie input embeddings and LM head")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from warpkit.testing import save_tiny_model

    path = save_tiny_model(
        args.out,
        args.arch,
        tie_word_embeddings=not args.untied,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    )
    print(path)
    return 0


# ----------------------------------------------------------------------------- train


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run the iterated WARP loop (M RL runs, SLERP, LITI, I iterations); resumable",
        description="Run Algorithm 1 of WARP from a YAML config. Each RL run is an `accelerate launch` "
        "subprocess; re-running the same command resumes after a crash and skips finished work. "
        "Any config field can be overridden: --iterations 3, --rl.beta 0.05, --output_dir DIR.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/warp_tiny.yaml")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from warpkit import driver

    driver.main([args.config, *args.overrides])
    return 0


# ----------------------------------------------------------------------------- main

_PARSERS = [_default_model_parser, _tiny_model_parser, _train_parser]


def build_parser() -> argparse.ArgumentParser:
    from warpkit import __version__

    parser = argparse.ArgumentParser(
        prog="warpkit",
        description="WARP (Weight Averaged Rewarded Policies) for Hugging Face TRL.",
    )
    parser.add_argument("--version", action="version", version=f"warpkit {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.run is not _train:  # only `train` takes free-form --field VALUE overrides
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"warpkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

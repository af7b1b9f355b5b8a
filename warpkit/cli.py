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


# ----------------------------------------------------------------------------- frontier


def _frontier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "frontier",
        help="estimate reward and KL(policy || SFT) of policies, their Pareto fronts, and plot them",
        description="Sample held-out completions from each policy of CONFIG at the training temperature, "
        "compute reward and the sequence KL to the reference (two estimators), and write frontier.json, "
        "frontier.csv, samples.jsonl and frontier.png.",
    )
    p.add_argument("config", help="YAML file of FrontierConfig fields (see configs/frontier_tiny.yaml)")
    p.add_argument("--output_dir", "--output-dir", default=None, help="overrides output_dir of the config")
    p.add_argument("--device", default=None, help="overrides device (auto, cpu, cuda, cuda:1, ...)")
    p.add_argument("--no-plot", action="store_true", help="skip frontier.png")
    p.set_defaults(run=_frontier)


def _frontier(args: argparse.Namespace) -> int:
    from warpkit.frontier_config import load_frontier_config
    from warpkit.frontier_run import run_frontier, write_frontier

    config = load_frontier_config(args.config, output_dir=args.output_dir, device=args.device)
    result = run_frontier(config)
    out = write_frontier(result, config.output_dir, plot=not args.no_plot)
    key = f"{config.front_kl}_mean"
    print(f"{'point':<28} {'method':<14} {'reward':>16} {'KL (MC)':>16} {'KL (exact/pos)':>16} {'len':>6}")
    for r in result.points:
        print(
            f"{r['name']:<28} {r['method']:<14} {r['reward_mean']:>8.3f} ± {r['reward_stderr']:<5.3f} "
            f"{r['kl_mean']:>8.3f} ± {r['kl_stderr']:<5.3f} {r['kl_exact_mean']:>8.3f} ± {r['kl_exact_stderr']:<5.3f} "
            f"{r['length_mean']:>6.1f}"
        )
    for method, names in result.fronts.items():
        hv = result.hypervolume["by_method"][method]
        print(f"front {method}: {' -> '.join(names)}  (hypervolume {hv:.4g}, KL axis: {key})")
    for m in result.matched_kl:
        if m["kl"]:
            print(
                f"reward at matched KL, {m['method_a']} - {m['method_b']}: mean gap {m['mean_gap']:+.4f} "
                f"over KL [{m['kl'][0]:.3g}, {m['kl'][-1]:.3g}]"
            )
        else:
            print(
                f"reward at matched KL, {m['method_a']} - {m['method_b']}: their fronts do not overlap in KL"
            )
    print(
        f"wrote {out}/frontier.json, frontier.csv, samples.jsonl" + ("" if args.no_plot else ", frontier.png")
    )
    return 0


# ----------------------------------------------------------------------------- main

_PARSERS = [_default_model_parser, _tiny_model_parser, _frontier_parser]


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
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

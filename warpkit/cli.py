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


# ----------------------------------------------------------------------------- merge

_MERGE_KEYS = (
    "method",
    "init",
    "models",
    "out",
    "weights",
    "granularity",
    "liti_eta",
    "allow_extrapolation",
    "dtype",
    "device",
    "compute_dtype",
    "max_shard_size",
    "overwrite",
    "scale",
    "density",
    "trim_scope",
    "seed",
    "normalize",
    "scorer",
    "score_config",
    "kl_coef",
    "scores",
)
# Soups average the models themselves (no init): the first model supplies config and tokenizer.
_SOUP_METHODS = ("soup", "greedy_soup", "warm")
_METHODS = (
    "slerp", "lerp", "linear", "task_arithmetic", "model_stock", "karcher",
    "ties", "dare_linear", "dare_ties", "negmerge", *_SOUP_METHODS,
)  # fmt: skip
_GREEDY_KEYS = ("scorer", "score_config", "kl_coef", "scores")  # greedy_soup's own settings


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tunes of one init: WARP's SLERP, LITI, the merge toolbox, soups and WARM",
        description="Merge save_pretrained folders or peft LoRA adapters of one init, streaming tensor by "
        "tensor, into a new save_pretrained folder (config, tokenizer and a recipe with input hashes "
        "carried). Soups (soup, greedy_soup) and WARM (warm: reward models) need no --init: the first "
        "model supplies config and tokenizer. Settings come from --config YAML (same keys, with "
        "underscores) and/or the flags; flags win.",
    )
    p.add_argument(
        "--config", default=None, help="YAML recipe with the keys below (e.g. configs/merge_slerp.yaml)"
    )
    p.add_argument(
        "--method",
        choices=_METHODS,
        default=None,
        help="default slerp (WARP); soup: (weighted) average, greedy_soup: scored, warm: reward models",
    )
    p.add_argument(
        "--init", default=None, help="the models' common init (save_pretrained folder); not for soups"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="fine-tuned folders or LoRA adapter folders (soups: full folders; warm: reward models)",
    )
    p.add_argument("--out", default=None, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one per model; default uniform")
    p.add_argument(
        "--granularity",
        choices=["block", "tensor", "model"],
        default=None,
        help="one angle per ...; default block",
    )
    p.add_argument(
        "--liti-eta", type=float, default=None, help="write (1-eta)*init + eta*merge (WARP stage 3)"
    )
    p.add_argument(
        "--allow-extrapolation", action="store_true", default=None, help="allow eta > 1 and negative weights"
    )
    p.add_argument("--dtype", default=None, help="output dtype (default: the init's)")
    p.add_argument("--device", default=None, help="where the arithmetic runs (cpu, cuda); default cpu")
    p.add_argument("--compute-dtype", default=None, help="float32 (default) or float64")
    p.add_argument("--max-shard-size", default=None, help="shard the output by bytes (default 5GB)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out")
    p.add_argument(
        "--scale", type=float, default=None, help="task_arithmetic, ties, dare_*, negmerge (default 1)"
    )
    p.add_argument(
        "--density", type=float, default=None, help="ties: fraction kept; dare_*: keep probability"
    )
    p.add_argument(
        "--trim-scope",
        choices=["tensor", "model"],
        default=None,
        help="ties: trim per tensor (default) or over the whole model (the TIES paper)",
    )
    p.add_argument("--seed", type=int, default=None, help="dare_* mask seed (per tensor name and model)")
    p.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        default=None,
        help="linear: sum w*theta as is",
    )
    p.add_argument(
        "--scorer",
        default=None,
        metavar="MODULE:FUNCTION",
        help="greedy_soup: a callable folder -> float, higher is better (e.g. validation accuracy)",
    )
    p.add_argument(
        "--score-config",
        default=None,
        metavar="FRONTIER_YAML",
        help="greedy_soup: score = mean reward of a frontier evaluation (its reference, reward, prompts, "
        "sampling; its policies are ignored) minus --kl-coef x KL",
    )
    p.add_argument(
        "--kl-coef", type=float, default=None, help="with --score-config: the KL penalty beta (default 0)"
    )
    p.add_argument(
        "--scores",
        type=float,
        nargs="+",
        default=None,
        help="greedy_soup: precomputed candidate scores, one per model (skips scoring them)",
    )
    p.add_argument("--no-hash", action="store_true", help="do not record the inputs' sha256 in the recipe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_merge)


def _merge_settings(args: argparse.Namespace) -> dict:
    """--config YAML overlaid with the flags that were given (flags win); unknown YAML keys refused."""
    import yaml

    settings: dict = {}
    if args.config:
        with open(args.config) as f:
            settings = yaml.safe_load(f) or {}
        unknown = sorted(set(settings) - set(_MERGE_KEYS))
        if unknown:
            raise SystemExit(
                f"warpkit merge: unknown keys {unknown} in {args.config}; known: {list(_MERGE_KEYS)}"
            )
    for key in _MERGE_KEYS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def _check_merge_combination(method: str, settings: dict) -> None:
    """Refuse flags that the method would ignore or misread, before anything is loaded."""
    soup = method in _SOUP_METHODS
    required = ("models", "out") if soup else ("init", "models", "out")
    missing = [k for k in required if not settings.get(k)]
    if missing:
        raise SystemExit(
            f"warpkit merge: missing {', '.join('--' + k for k in missing)} (flags or --config)."
        )
    if method not in _METHODS:
        raise SystemExit(f"warpkit merge: method {method!r} is not one of {list(_METHODS)}.")
    given = [k for k in _GREEDY_KEYS if settings.get(k) is not None]
    if method != "greedy_soup" and given:
        raise SystemExit(
            f"warpkit merge: {', '.join('--' + k.replace('_', '-') for k in given)} only apply to "
            f"--method greedy_soup, not {method}; drop them or use greedy_soup."
        )
    if soup and settings.get("init"):
        raise SystemExit(
            f"warpkit merge: --method {method} takes no --init ({settings['init']}): a soup averages the "
            "models themselves and the first one supplies config and tokenizer. Drop --init, or list the "
            "model whose config and tokenizer you want first."
        )
    if soup:
        extra = [k for k in ("liti_eta", "allow_extrapolation", "granularity") if settings.get(k) is not None]
        if extra:
            raise SystemExit(
                f"warpkit merge: {', '.join('--' + k.replace('_', '-') for k in extra)} do not apply to "
                f"--method {method} (a plain average, with no init to interpolate towards); drop them."
            )
    if method == "greedy_soup":
        if bool(settings.get("scorer")) == bool(settings.get("score_config")):
            both = "both" if settings.get("scorer") else "neither"
            raise SystemExit(
                f"warpkit merge: greedy_soup needs exactly one of --scorer MODULE:FUNCTION (a callable "
                f"folder -> float) or --score-config FRONTIER_YAML (mean reward of a frontier evaluation); "
                f"got {both}."
            )
        if settings.get("kl_coef") is not None and not settings.get("score_config"):
            raise SystemExit(
                "warpkit merge: --kl-coef is the KL penalty of a --score-config frontier evaluation; a "
                "--scorer function computes its own score. Drop --kl-coef or use --score-config."
            )
        if settings.get("weights") is not None:
            raise SystemExit(
                "warpkit merge: greedy_soup averages its ingredients uniformly and takes no --weights; "
                "use --method soup --weights for a weighted soup."
            )
        scores, models = settings.get("scores"), settings["models"]
        if scores is not None and len(scores) != len(models):
            raise SystemExit(
                f"warpkit merge: --scores has {len(scores)} values for {len(models)} --models; give one "
                "precomputed score per model, in the same order, or drop --scores."
            )


def _greedy_scorer(settings: dict):
    """The scorer of a greedy soup: an imported callable, or a frontier evaluation."""
    if settings.get("scorer"):
        from warpkit.frontier_inputs import import_object

        scorer = import_object(settings["scorer"], "--scorer")
        if not callable(scorer):
            raise ValueError(
                f"--scorer {settings['scorer']!r} is not callable; it must be a folder -> float."
            )
        return scorer
    from warpkit.soups import frontier_scorer

    try:  # loaded now, so a bad frontier YAML fails before any candidate is merged
        return frontier_scorer(settings["score_config"], kl_coef=settings.get("kl_coef") or 0.0)
    except TypeError as e:  # a field of the wrong type in the YAML
        raise ValueError(f"--score-config {settings['score_config']}: {e}") from e


def _merge_soup(method: str, settings: dict, common: dict) -> str:
    """soup, warm or greedy_soup; returns the one-line summary."""
    import time

    from warpkit.soups import greedy_soup, uniform_soup, warm

    t0 = time.perf_counter()
    models, out = settings.pop("models"), settings.pop("out")
    greedy = {k: settings.pop(k, None) for k in _GREEDY_KEYS}
    if method == "greedy_soup":
        result = greedy_soup(
            models, _greedy_scorer(greedy), out, scores=greedy["scores"], **common, **settings
        )
        for candidate, value, kept in result.history:
            print(f"  {'kept   ' if kept else 'dropped'} {candidate}: soup score {value:.6g}")
        return (
            f"{result.out} (greedy_soup of {len(result.ingredients)}/{len(models)} models, score "
            f"{result.score:.6g}, {time.perf_counter() - t0:.1f} s)"
        )
    merge = warm if method == "warm" else uniform_soup
    path = merge(models, out, settings.pop("weights", None), **common, **settings)
    what = "reward models" if method == "warm" else "models"
    return f"{path} ({method} of {len(models)} {what}, {time.perf_counter() - t0:.1f} s)"


def _merge(args: argparse.Namespace) -> int:
    import math

    from warpkit.merge_io import merge_folders

    settings = _merge_settings(args)
    method = settings.pop("method", None) or "slerp"
    _check_merge_combination(method, settings)
    common = {"progress": not args.no_progress, "hash_inputs": not args.no_hash}
    try:
        if method in _SOUP_METHODS:
            settings.pop("init", None)
            print(_merge_soup(method, settings, common))
            return 0
        report = merge_folders(
            method,
            settings.pop("init"),
            settings.pop("models"),
            settings.pop("out"),
            settings.pop("weights", None),
            **common,
            **settings,
        )
    except ValueError as e:
        raise SystemExit(f"warpkit merge: {e}") from e
    angles = [
        s.angles_deg[-1] for s in report.stats.values() if s.angles_deg and math.isfinite(s.angles_deg[-1])
    ]
    summary = f", mean angle {sum(angles) / len(angles):.1f} deg over {len(angles)} groups" if angles else ""
    print(f"{report.out} ({method}, {report.seconds:.1f} s{summary})")
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
    if result.reward_fronts:
        x, y = result.reward_front_axes
        for method, names in result.reward_fronts.items():
            print(f"reward front {method} ({x} vs {y}, both maximised): {' -> '.join(names)}")
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
    pngs = ", frontier.png" + (", rewards.png" if result.reward_front_axes else "")
    print(f"wrote {out}/frontier.json, frontier.csv, samples.jsonl" + ("" if args.no_plot else pngs))
    return 0


# ----------------------------------------------------------------------------- main

_PARSERS = [_default_model_parser, _tiny_model_parser, _train_parser, _merge_parser, _frontier_parser]


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

"""The `warpkit` console script: thin subcommands over the library.

Each subcommand is a pair: `_<name>_parser(subparsers)` declares it, `_<name>(args)` runs it, and heavy
imports happen inside the runner so `warpkit --help` is instant. The merge subcommand's flags, YAML keys
and option rules come from the method registry (`warpkit.merge.methods`): nothing here names a method.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warpkit.forget.cli import forget_parser
from warpkit.loop.launch import RunFailedError
from warpkit.merge.methods import ENGINE_OPTIONS, INIT_OPTIONS, METHODS, Param, all_params, spell

__all__ = ["MERGE_KEYS", "CommandError", "build_parser", "main", "merge_plan"]


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (what is wrong and where to look), not the whole usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """argparse's check of a choice, plus the closest choice when the value looks like a typo of one."""
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{e.message}; did you mean {close[0]!r}?") from None


class CommandError(SystemExit):
    """A user error found by a subcommand: `main` prints its one line on stderr and the exit code is 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


# The keys of a `warpkit merge --config` YAML recipe (same names as the flags, with underscores).
MERGE_KEYS = ("method", "init", "models", "out", *(p.name for p in (*ENGINE_OPTIONS, *all_params())))


# ----------------------------------------------------------------------------- default-model, tiny-model


def _default_model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "default-model",
        help="prepare the embedded default policy (SmolLM2-135M-Instruct) and print its path",
        description="Convert the packaged SmolLM2-135M-Instruct GGUF to a safetensors folder once "
        "(under $WARPKIT_CACHE, default ~/.cache/warpkit), verify it, and print its path.",
    )
    p.add_argument("--cache", default=None, help="cache folder (default: $WARPKIT_CACHE or ~/.cache/warpkit)")
    p.add_argument(
        "--sample", type=int, default=0, metavar="N",
        help="also sample completions for N held-out review prompts and print their VADER reward",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(run=_default_model)


def _default_model(args: argparse.Namespace) -> int:
    from warpkit.workloads import default

    print(default.prepare_default_model(args.cache))
    if args.sample > 0:
        samples = default.sample_default_model(args.sample, seed=args.seed)
        for prompt, completion, reward in samples:
            print(f"\n[reward {reward:+.3f}] {prompt}\n  -> {completion}")
        print(
            f"\nmean VADER reward over {len(samples)} samples: {sum(s[2] for s in samples) / len(samples):+.3f}"
        )
    return 0


def _tiny_model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny-model",
        help="write a tiny random causal LM with GPT-2's tokenizer (for tests and tiny configs)",
        description="Build a tiny randomly initialised causal LM offline and save_pretrained it with its "
        "tokenizer. --frontier-set writes instead the hand-made policies of configs/frontier_tiny.yaml.",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--untied", action="store_true", help="untie input embeddings and LM head")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--frontier-set", action="store_true",
        help="write sft, bias-2/4/6 and noisy/checkpoint-* (the policies of configs/frontier_tiny.yaml)",
    )  # fmt: skip
    p.set_defaults(run=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from warpkit.testing import build_tiny_frontier_models, save_tiny_model

    if args.frontier_set:
        print(build_tiny_frontier_models(args.out))
        return 0
    path = save_tiny_model(
        args.out, args.arch, tie_word_embeddings=not args.untied, hidden_size=args.hidden_size,
        num_layers=args.num_layers, seed=args.seed,
    )  # fmt: skip
    print(path)
    return 0


# ----------------------------------------------------------------------------- train


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="run the iterated WARP loop (M RL runs, SLERP, LITI, I iterations); resumable",
        description="Run Algorithm 1 of WARP from a YAML config. Each RL run is an `accelerate launch` "
        "subprocess, or a SLURM job with --launcher slurm (--detach: Ctrl-C leaves the jobs running); re-running "
        "the same command resumes. Override any field: --iterations 3, --rl.beta 0.05, --output_dir DIR.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/warp_tiny.yaml")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from warpkit.loop import driver

    driver.main([args.config, *args.overrides])
    return 0


# ----------------------------------------------------------------------------- merge


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tunes of one init: WARP's SLERP, LITI, the merge toolbox, soups and WARM",
        description="Merge save_pretrained folders or peft LoRA adapters of one init, streaming tensor by "
        "tensor, into a new save_pretrained folder (config, tokenizer and a recipe with input hashes "
        "carried). Methods without an init ("
        + ", ".join(m.name for m in METHODS.values() if m.init == "none")
        + ") take no --init: the first model supplies config and tokenizer. Settings come from --config YAML "
        "(same keys, with underscores) and/or the flags; flags win.",
    )
    p.add_argument(
        "--config", default=None, help="YAML recipe with the keys below (e.g. configs/merge_slerp.yaml)"
    )
    p.add_argument(
        "--method", choices=list(METHODS), default=None, help="default slerp (WARP); see the README's table"
    )
    p.add_argument("--init", default=None, help="the models' common init (save_pretrained folder)")
    p.add_argument("--models", nargs="+", default=None, help="fine-tuned folders or LoRA adapter folders")
    p.add_argument("--out", default=None, help="output folder (must not exist unless --overwrite)")
    for param in (*ENGINE_OPTIONS, *all_params()):
        _add_flag(p, param)
    p.add_argument("--no-hash", action="store_true", help="do not record the inputs' sha256 in the recipe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_merge)


def _add_flag(p: argparse.ArgumentParser, param: Param) -> None:
    """One flag per setting, default None so only the flags given override the YAML recipe."""
    owners = [m.name for m in METHODS.values() if param in m.params]
    text = param.help + (f" [{', '.join(owners)}]" if owners else "")
    flag = spell(param.name, cli=True)
    if param.type is bool and param.default is True:
        p.add_argument(f"--no-{flag[2:]}", dest=param.name, action="store_false", default=None, help=text)
    elif param.type is bool:
        p.add_argument(flag, action="store_true", default=None, help=text)
    elif param.type is list:
        p.add_argument(flag, type=float, nargs="+", default=None, help=text)
    else:
        p.add_argument(
            flag, type=param.type, choices=param.choices, default=None, metavar=param.metavar, help=text
        )


def _merge_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--config YAML overlaid with the flags that were given (flags win); unknown YAML keys refused."""
    from warpkit._util.config import load_yaml_mapping

    settings = load_yaml_mapping(args.config, "merge recipe") if args.config else {}
    unknown = sorted(set(settings) - set(MERGE_KEYS))
    if unknown:
        raise CommandError(
            f"warpkit merge: unknown keys {unknown} in {args.config}; known: {list(MERGE_KEYS)}"
        )
    settings.update({k: getattr(args, k) for k in MERGE_KEYS if getattr(args, k) is not None})
    return settings


def _split_settings(settings: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(method entry, its params as given, engine options) with the input contract checked; SystemExit."""
    from warpkit.merge.methods import get_method

    method = get_method(settings.pop("method", None) or "slerp")
    required = ("models", "out") if method.init == "none" else ("init", "models", "out")
    missing = [k for k in required if not settings.get(k)]
    if missing:
        raise CommandError(
            f"warpkit merge: missing {', '.join('--' + k for k in missing)} (flags or --config)."
        )
    if method.init == "none" and settings.get("init"):
        raise CommandError(
            f"warpkit merge: --method {method.name} takes no --init ({settings['init']}): it averages the models "
            "themselves and the first one supplies config and tokenizer. Drop --init, or list the model whose "
            "config and tokenizer you want first."
        )
    extra = [
        spell(p.name, True)
        for p in INIT_OPTIONS
        if method.init == "none" and settings.get(p.name) is not None
    ]
    if extra:
        raise CommandError(
            f"warpkit merge: {', '.join(extra)} do not apply to --method {method.name} (a plain average of full "
            "models, with no init to interpolate towards); drop them."
        )
    params = {p.name: settings.pop(p.name) for p in all_params() if settings.get(p.name) is not None}
    return method, params, settings


def _check_options(options: dict[str, Any]) -> None:
    """What argparse checks only for flags, for a YAML recipe too: the engine options' types, and --models
    a list (of paths, as --init and --out). ValueError."""
    for p in ENGINE_OPTIONS:  # max_shard_size: parse_size takes a size ("5GB") or a number of bytes
        if p.name != "max_shard_size" and options.get(p.name) is not None:
            options[p.name] = p.check(options[p.name], spell(p.name, True))
    models = options["models"]
    if not isinstance(models, list):
        raise ValueError(f"--models={models!r} must be a list of folders (in a YAML recipe: models: [a, b]).")
    options["models"] = [str(m) for m in models]  # YAML reads a folder named 2024 as a number
    options.update({k: str(options[k]) for k in ("init", "out") if options.get(k) is not None})


def _check_inputs_exist(method: Any, options: dict[str, Any]) -> None:
    """Every input exists, or ValueError naming it by its flag (the first check that needs the inputs)."""
    kinds = "save_pretrained folders" + (" or peft LoRA adapter folders" if method.init != "none" else "")
    init = options.get("init")
    inputs = [("--init=", init, "the save_pretrained folder the models were fine-tuned from")] if init else []
    for flag, path, fix in [*inputs, *(("--models: ", m, kinds) for m in options["models"])]:
        if not Path(path).exists():
            raise ValueError(f"{flag}{path} does not exist; pass {fix}.")


def merge_plan(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """What `warpkit merge` would do, checked before anything is read: (method entry, its params as given,
    the engine options and inputs). SystemExit with the reason otherwise."""
    from warpkit.merge.folders import as_device, as_dtype
    from warpkit.merge.output import check_out
    from warpkit.merge.writer import parse_size

    settings = _merge_settings(args)
    try:
        method, params, options = _split_settings(settings)
        resolved = method.resolve(params, cli=True)
        _check_options(options)
        method.check_inputs(
            len(options["models"]), options.get("weights"), resolved,
            allow_extrapolation=bool(options.get("allow_extrapolation")), cli=True,
        )  # fmt: skip
        inputs = [*([options["init"]] if options.get("init") else []), *options["models"]]
        check_out(options["out"], inputs, bool(options.get("overwrite")), cli=True)
        as_dtype(options.get("dtype"), "--dtype")
        as_dtype(options.get("compute_dtype"), "--compute-dtype")
        as_device(options.get("device"), "--device")
        parse_size(options.get("max_shard_size") or 0, "--max-shard-size")
    except ValueError as e:
        raise CommandError(f"warpkit merge: {e}") from e
    return method, params, options


def _merge(args: argparse.Namespace) -> int:
    method, params, options = merge_plan(args)
    # The bar is drawn on a terminal only: piped or captured stderr gets the result line and errors alone.
    common = {"progress": not args.no_progress and sys.stderr.isatty(), "hash_inputs": not args.no_hash}
    t0 = time.perf_counter()
    try:
        _check_inputs_exist(method, options)
        if method.runner is not None:
            print(_run_whole_model(method, params, options, common) + f" ({time.perf_counter() - t0:.1f} s)")
            return 0
        from warpkit.merge.folders import merge_folders

        init, models, out = options.pop("init"), options.pop("models"), options.pop("out")
        report = merge_folders(method.name, init, models, out, **options, **common, **params)
    except (ValueError, TypeError) as e:
        raise CommandError(f"warpkit merge: {e}") from e
    angles = [
        s.angles_deg[-1] for s in report.stats.values() if s.angles_deg and math.isfinite(s.angles_deg[-1])
    ]
    summary = f", mean angle {sum(angles) / len(angles):.1f} deg over {len(angles)} groups" if angles else ""
    print(f"{report.out} ({method.name}, {report.seconds:.1f} s{summary})")
    return 0


def _run_whole_model(method, params: dict[str, Any], options: dict[str, Any], common: dict[str, Any]) -> str:
    """Soups: the registry names the runner; a scorer given as code or as a frontier config is built here,
    where every layer may be imported."""
    from warpkit._util.imports import import_object

    if params.get("scorer"):
        params["score"] = import_object(params["scorer"], "--scorer", callable_=True)
    elif params.get("score_config"):
        from warpkit.frontier.scorer import frontier_scorer

        params["score"] = frontier_scorer(params["score_config"], kl_coef=params.get("kl_coef") or 0.0)
    runner = import_object(method.runner, "merge runner", callable_=True)
    models, out, weights = options.pop("models"), options.pop("out"), options.pop("weights", None)
    return runner(models, out, weights, params, **options, **common)


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
    from warpkit.frontier.config import load_frontier_config
    from warpkit.frontier.output import check_output_dir, print_frontier, write_frontier
    from warpkit.frontier.run import run_frontier

    config = load_frontier_config(args.config, output_dir=args.output_dir, device=args.device)
    check_output_dir(config.output_dir)
    result = run_frontier(config)
    out = write_frontier(result, config.output_dir, plot=not args.no_plot)
    print_frontier(result)
    pngs = ", frontier.png" + (", rewards.png" if result.reward_front_axes else "")
    print(f"wrote {out}/frontier.json, frontier.csv, samples.jsonl" + ("" if args.no_plot else pngs))
    return 0


# ----------------------------------------------------------------------------- main

_PARSERS = [_default_model_parser, _tiny_model_parser, _train_parser, _merge_parser, _frontier_parser, forget_parser]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from warpkit import __version__

    parser = _Parser(
        prog="warpkit", description="WARP (Weight Averaged Rewarded Policies) for Hugging Face TRL."
    )
    parser.add_argument("--version", action="version", version=f"warpkit {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from warpkit._util.log import setup_logging

    setup_logging()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.run is not _train:  # only `train` takes free-form --field VALUE overrides
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return args.run(args)
    except CommandError as e:
        print(str(e), file=sys.stderr)
        raise
    except (ValueError, FileNotFoundError, RunFailedError) as e:
        print(f"warpkit: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunFailedError) else 2  # a run's own error (with its log) is not bad input
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the driver turns it into this): rerun to resume
        print("warpkit: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

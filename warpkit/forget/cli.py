"""`warpkit forget CONFIG --output_dir DIR`: the subcommand's parser and runner, registered by `warpkit.cli`.

Heavy imports happen in the runner, so `warpkit --help` stays instant. A bad input raises ValueError, which
the console script prints as one line (exit code 2).
"""

from __future__ import annotations

import argparse

__all__ = ["forget_parser"]


def forget_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "forget",
        help="Fuse to Forget: what a merge keeps and forgets (ALR, likelihood, accuracy, Fisher overlap)",
        description="Score a reference, named models and their fusions (an interpolation path over an alpha "
        "grid, or merges by any registry method) on probe sets marked with the models that saw them: mean "
        "token log-likelihood, perplexity, the Average Likelihood Ratio against the reference, exact-match "
        "accuracy, Fisher overlaps; write forget.json, forget.csv and PNG plots.",
    )
    p.add_argument("config", help="YAML file of ForgetConfig fields (see configs/forget_tiny.yaml)")
    p.add_argument("--output_dir", "--output-dir", default=None, help="overrides output_dir of the config")
    p.add_argument("--device", default=None, help="overrides device (auto, cpu, cuda, cuda:1, ...)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_forget_command)


def run_forget_command(args: argparse.Namespace) -> int:
    from warpkit.forget.config import load_forget_config
    from warpkit.forget.output import check_output_dir, print_forget, write_forget
    from warpkit.forget.run import run_forget

    config = load_forget_config(args.config, output_dir=args.output_dir, device=args.device)
    check_output_dir(config.output_dir)
    result = run_forget(config, progress=not args.no_progress)
    written = write_forget(result, config.output_dir, plot=not args.no_plot)
    print_forget(result)
    print(f"wrote {', '.join(str(p) for p in written)} ({result.settings['seconds']:.1f} s)")
    return 0

"""Does WARP help? Train every seed of `experiments/warp_evidence.yaml`, evaluate each seed's policies with
the ablations on one reward-KL frontier, and write `results/warp_evidence/` (RESULTS.md from the JSON).

Phases, each resumable (re-run the same command after any interruption; finished work is skipped):
1. train: one `warpkit train` of the config per seed (WARP, I = 3, M = 2, and the baselines at equal
   sequential budget), under `runs/warp_evidence/seed_<s>/`. Seed 0 trains every baseline of the config,
   the other seeds `MAIN_BASELINES`.
2. evaluate: per seed, the frontier of WARP's iterations, the baselines' trajectories and, for seed 0, the
   ablations (LERP instead of SLERP at iteration 1; M = 1: the LITI front of one run), every point on the
   same held-out prompts with common random numbers.
3. report: across seeds, `results/warp_evidence/{summary.json, RESULTS.md, frontier.png}`.

Run (about 2 hours on 2 CPU cores):
    python -m experiments.warp_evidence [--phase train|evaluate|report|all] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = HERE / "warp_evidence.yaml"
SEEDS = (0, 1, 2)
MAIN_BASELINES = ("sft_beta0_05", "ema_anchor")  # trained for every seed; the rest for seed 0 only
log = logging.getLogger("warp_evidence")

__all__ = ["CONFIG", "MAIN_BASELINES", "SEEDS", "seed_config"]


def seed_config(seed: int, runs_dir: Path, config_path: Path = CONFIG) -> Any:
    """The `WarpConfig` of one seed: data order `seed`, output `runs_dir/seed_<seed>`, its baselines."""
    from warpkit._util.config import build_dataclass, load_yaml_mapping
    from warpkit.loop.config import WarpConfig

    raw = load_yaml_mapping(config_path, "WARP config")
    raw["seed"] = seed
    raw["output_dir"] = str(runs_dir / f"seed_{seed}")
    if seed != SEEDS[0]:
        raw["baselines"] = [b for b in raw.get("baselines", []) if b["name"] in MAIN_BASELINES]
    return build_dataclass(WarpConfig, raw, str(config_path))


def train(seeds: list[int], runs_dir: Path) -> None:
    """Phase 1: `warpkit train` of each seed (resumes; a finished seed is skipped by its manifest)."""
    from warpkit.loop.driver import run_warp, validate_rl_section

    for seed in seeds:
        log.info("seed %d: training under %s", seed, runs_dir / f"seed_{seed}")
        run_warp(seed_config(seed, runs_dir), validate=validate_rl_section)


def main(argv: list[str] | None = None) -> int:
    from warpkit._util.log import setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["train", "evaluate", "report", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--runs_dir", type=Path, default=REPO / "runs" / "warp_evidence")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "warp_evidence")
    args = parser.parse_args(argv)
    setup_logging()
    if args.phase in ("train", "all"):
        train(args.seeds, args.runs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

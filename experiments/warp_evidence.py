"""Does WARP help? Train every seed of `experiments/warp_evidence.yaml`, evaluate each seed's policies with
the ablations on one reward-KL frontier, and write `results/warp_evidence/` (RESULTS.md from the JSON).

Phases, each resumable (re-run the same command after any interruption; finished work is skipped):
1. train: one `warpkit train` of the config per seed (WARP, I = 3, M = 2, and the baselines at equal
   sequential budget), under `runs/warp_evidence/seed_<s>/`. The first seed trains every baseline of the
   config, the other seeds its `main_baselines`.
2. evaluate: per seed, the frontier of WARP's iterations, the baselines' trajectories and, for seed 0, the
   ablations (LERP instead of SLERP at iteration 1; M = 1: the LITI front of one run), every point on the
   same held-out prompts with common random numbers.
3. report: across seeds, `results/warp_evidence/{summary.json, RESULTS.md, frontier.png}`.

Run (about 2 hours on 2 CPU cores):
    python -m experiments.warp_evidence [--phase train|evaluate|report|all] [--seeds 0 1 2]
        [--config experiments/warp_evidence.yaml] [--runs_dir runs/warp_evidence] [--results results/warp_evidence]
The GPU recipe: --config experiments/warp_evidence_gpu.yaml --runs_dir runs/warp_evidence_gpu
--results results/warp_evidence_gpu.
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
log = logging.getLogger("warp_evidence")

__all__ = ["CONFIG", "SEEDS", "evaluate", "load_experiment", "seed_config", "train"]


def load_experiment(config_path: Path = CONFIG) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(the WARP config's fields, the frontier settings of every seed's evaluation (`evaluation:`), the
    baselines every seed trains (`main_baselines:`; the others are trained for the first seed only))."""
    from warpkit._util.config import ConfigError, load_yaml_mapping

    raw = load_yaml_mapping(config_path, "WARP evidence config")
    for key in ("evaluation", "main_baselines"):
        if key not in raw:
            raise ConfigError(f"{config_path}: set {key}: (see experiments/warp_evidence.yaml).")
    return raw, raw.pop("evaluation"), list(raw.pop("main_baselines"))


def seed_config(seed: int, runs_dir: Path, config_path: Path = CONFIG, first_seed: int = SEEDS[0]) -> Any:
    """The `WarpConfig` of one seed: data order `seed`, output `runs_dir/seed_<seed>`, its baselines."""
    from warpkit._util.config import build_dataclass
    from warpkit.loop.config import WarpConfig

    raw, _, main_baselines = load_experiment(config_path)
    raw["seed"] = seed
    raw["output_dir"] = str(runs_dir / f"seed_{seed}")
    if seed != first_seed:
        raw["baselines"] = [b for b in raw.get("baselines", []) if b["name"] in main_baselines]
    return build_dataclass(WarpConfig, raw, str(config_path))


def train(
    seeds: list[int], runs_dir: Path, config_path: Path = CONFIG, train_fn: Any = None, threads: int | None = None
) -> None:  # fmt: skip
    """Phase 1: `warpkit train` of each seed (resumes; a finished seed is skipped by its manifest).
    `train_fn`: the driver's (tests pass a fake trainer); `threads`: CPU threads of each run (None: all)."""
    from warpkit.loop.driver import run_warp, validate_rl_section

    for seed in seeds:
        log.info("seed %d: training under %s", seed, runs_dir / f"seed_{seed}")
        config = seed_config(seed, runs_dir, config_path)
        config.cpu_threads_per_process = threads
        run_warp(config, validate=None if train_fn else validate_rl_section, train_fn=train_fn)


def side_by_side(phase: str, seeds: list[int], runs_dir: Path, config_path: Path, jobs: int) -> None:
    """`phase` (train or evaluate) of `jobs` seeds at once, each a process of this script on cores / jobs
    threads (OMP_NUM_THREADS, and `--threads` for the runs). On a small CPU this beats one multithreaded
    process at a time: a process's many small parallel regions stall whenever any other process holds one
    of its cores (here an 11 s RL step became 70 s next to a test run)."""
    import os
    import shlex
    import subprocess
    import time

    threads = max(len(os.sched_getaffinity(0)) // jobs, 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running = list(seeds), []
    while pending or running:
        while pending and len(running) < jobs:
            cmd = [sys.executable, "-m", "experiments.warp_evidence", "--phase", phase, "--seeds", str(pending.pop(0)),
                   "--config", str(config_path), "--runs_dir", str(runs_dir), "--threads", str(threads)]  # fmt: skip
            running.append(subprocess.Popen(cmd, cwd=REPO, env=env))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            if proc.returncode != 0:
                raise SystemExit(
                    f"{phase} of a seed failed (exit {proc.returncode}): {shlex.join(proc.args)}"
                )
            running.remove(proc)


ABLATION_LABELS = {
    "lerp_iter1": "LERP of iteration 1's two runs (lambda = 1/2)",
    "warp_m1_iter1": "M = 1: LITI front of one run of iteration 1",
}


def ablations(config: Any, sft: Path, out: Path) -> list[dict[str, Any]]:
    """Frontier entries of the ablations at iteration 1, from the same two runs: their LERP (claim 3,
    against the SLERP point warp-iter1/eta=1) and the LITI front of run 1 alone (M = 1, claim 4)."""
    from warpkit.merge.folders import merge_folders

    policies = [out / "iter_1" / f"run_{m}" / "policy" for m in (1, 2)]
    lerp = out / "ablations" / "lerp_iter1"
    if not (lerp / "warpkit_merge.json").is_file():  # merge_folders publishes the folder whole, or not at all
        merge_folders("lerp", sft, policies, lerp, granularity=config.merge_granularity, progress=False)
    return [
        {"name": "lerp_iter1", "method": "lerp_iter1", "path": str(lerp), "params": {"lambda": 0.5}},
        {
            "name": "m1-iter1",
            "method": "warp_m1_iter1",
            "liti": {"init": str(sft), "merged": str(policies[0]), "etas": list(config.frontier_etas)},
            "params": {"iteration": 1, "num_policies": 1},
        },
    ]


def evaluate(seeds: list[int], runs_dir: Path, config_path: Path = CONFIG, train_fn: Any = None) -> None:
    """Phase 2: per seed, the frontier of its artefacts and the ablations (the config's `evaluation:`),
    through the driver (its manifest skips a frontier already evaluated on the same inputs, and the runs
    trained in phase 1), and the task-vector geometry."""
    from warpkit.loop.driver import run_warp, validate_rl_section
    from warpkit.workloads import resolve_model_path

    _, evaluation, _ = load_experiment(config_path)
    for seed in seeds:
        config = seed_config(seed, runs_dir, config_path)
        sft, out = Path(resolve_model_path(config.model_name_or_path)), Path(config.output_dir)
        config.frontier_policies = ablations(config, sft, out)
        title = f"WARP (I={config.iterations}, M={config.num_policies}) vs baselines, seed {seed}"
        config.frontier = {**evaluation, "title": title, "method_labels": ABLATION_LABELS}
        log.info("seed %d: frontier of %s", seed, out)
        run_warp(config, validate=None if train_fn else validate_rl_section, train_fn=train_fn)
        write_geometry(config, out)


def write_geometry(config: Any, out: Path) -> None:
    """out/geometry.json, per iteration: cos(d_1, d_2) of the two runs' task vectors per block (from
    merge_stats.json), cos(theta_1, theta_2) of their whole weights, and Model Stock's eta = 2cos/(1+cos)."""
    import json

    from warpkit._util.files import write_atomic

    doc = {}
    for i in range(1, config.iterations + 1):
        stats = json.loads((out / f"iter_{i}" / "merge_stats.json").read_text())
        cos = {k.split("/")[1]: v for k, v in stats.items() if k.endswith("/cos")}
        runs = [out / f"iter_{i}" / f"run_{m}" / "policy" for m in (1, 2)]
        doc[f"iter_{i}"] = {
            "task_vector_cos": cos,
            "weights_cos": weights_cos(*runs),
            "model_stock_eta": {g: 2 * c / (1 + c) for g, c in cos.items()},
        }
    write_atomic(out / "geometry.json", json.dumps(doc, indent=1))


def weights_cos(a: Path, b: Path) -> float:
    """cos(theta_a, theta_b) over every weight of two safetensors folders, in float64, tensor by tensor."""
    from safetensors import safe_open

    dot = norm_a = norm_b = 0.0
    files = sorted(a.glob("*.safetensors"))
    for f in files:
        with safe_open(f, "pt") as fa, safe_open(b / f.name, "pt") as fb:
            for key in fa.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                x, y = fa.get_tensor(key).double(), fb.get_tensor(key).double()
                dot += float((x * y).sum())
                norm_a += float((x * x).sum())
                norm_b += float((y * y).sum())
    return dot / (norm_a * norm_b) ** 0.5


def main(argv: list[str] | None = None) -> int:
    from warpkit._util.log import setup_logging

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--phase", choices=["train", "evaluate", "report", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--runs_dir", type=Path, default=REPO / "runs" / "warp_evidence")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "warp_evidence")
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds trained at once (each run: cores / jobs threads)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: all cores)")
    parser.add_argument(
        "--schedule",
        default=None,
        help="report: how the seeds were run, when not by this command (RESULTS.md)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.phase in ("train", "all"):
        if args.jobs > 1:
            side_by_side("train", args.seeds, args.runs_dir, args.config, args.jobs)
        else:
            train(args.seeds, args.runs_dir, args.config, threads=args.threads)
    if args.phase in ("evaluate", "all"):
        if args.jobs > 1:
            side_by_side("evaluate", args.seeds, args.runs_dir, args.config, args.jobs)
        else:
            evaluate(args.seeds, args.runs_dir, args.config)
    if args.phase in ("report", "all"):
        from experiments.warp_evidence_report import write_report

        write_report(args.seeds, args.runs_dir, args.results, args.config, args.schedule)
    return 0


if __name__ == "__main__":
    sys.exit(main())

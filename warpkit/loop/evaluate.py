"""What WARP is compared with, and the comparison: baseline runs at equal sequential budget, and the frontier
config of a finished run (WARP's LITI front per iteration and each baseline's trajectory).

Baselines are single RL runs from the SFT init in the same harness (fixed SFT anchor over a beta grid, EMA
anchor without merging, its relatives BEMA and Elastic Reset): each trains `iterations * rl.max_steps` steps, as
many sequential steps as WARP's final policy has seen, and keeps a checkpoint every `rl.max_steps` steps (or its
own `save_steps`) as its trajectory. A baseline with `final_policy: swa | lawa` is drawn as its averaged policy
(one point, method `<anchor>_anchor_<final_policy>`), the others as their trajectories.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from warpkit.loop.config import WarpConfig
from warpkit.loop.launch import RunSpec
from warpkit.loop.manifest import Manifest, Step, fingerprint

__all__ = ["baseline_specs", "evaluate_frontier", "frontier_document"]

log = logging.getLogger(__name__)
_ANCHOR_LABELS = {
    "sft": "RL, SFT anchor",
    "ema": "RL, EMA anchor, no merge",
    "bema": "RL, BEMA anchor, no merge",
    "elastic_reset": "RL, Elastic Reset (SFT anchor)",
}
_FINAL_LABELS = {
    "swa": "SWA of checkpoints from step {swa_start}",
    "lawa": "LAWA of the last {lawa_k} checkpoints",
}
_PARAMS = ("beta", "ema_rate", "reset_every", "final_policy", "swa_start", "lawa_k")


def baseline_specs(config: WarpConfig, sft: Path, out: Path) -> list[RunSpec]:
    """One run per baseline, from the SFT init, under `baselines/<name>/`, with equal sequential budget."""
    specs = []
    for n, baseline in enumerate(config.baselines):
        rl = {**config.rl, **baseline.get("rl", {})}
        if "max_steps" not in baseline.get("rl", {}) and "max_steps" in config.rl:
            rl["max_steps"] = config.iterations * int(config.rl["max_steps"])
            rl["save_strategy"] = "steps"
            # a checkpoint per WARP-iteration length, unless the baseline asks for more (SWA / LAWA windows)
            rl["save_steps"] = baseline.get("rl", {}).get("save_steps", int(config.rl["max_steps"]))
            rl["save_total_limit"] = None  # keep them all: they are the trajectory the frontier draws
        folder = out / "baselines" / baseline["name"]
        specs.append(RunSpec(0, n + 1, sft, folder, config.seed, rl, name=baseline["name"]))
    return specs


def frontier_document(config: WarpConfig, sft: Path, out: Path) -> dict[str, Any]:
    """The frontier config for this run's artefacts: WARP's LITI front per iteration and each baseline."""
    iterations = range(1, config.iterations + 1)
    policies: list[dict[str, Any]] = [
        {
            "name": f"warp-iter{i}",
            "method": f"warp_iter{i}",
            "liti": {
                "init": str(sft),
                "merged": str(out / f"iter_{i}" / "merged"),
                "etas": config.frontier_etas,
            },
            "params": {"iteration": i, "num_policies": config.num_policies, "liti_eta": config.liti_eta},
        }
        for i in iterations
    ]
    labels = {f"warp_iter{i}": f"WARP iteration {i} (LITI front from SFT)" for i in iterations}
    methods = {b["name"]: b.get("method") for b in config.baselines}
    for spec in baseline_specs(config, sft, out):
        method, label, policy = _baseline_policy(spec)
        if methods[spec.name]:  # the config's own group, labelled with the run's parameters
            method, label = methods[spec.name], f"{label} ({spec.name})"
        labels.setdefault(method, label)
        params = {k: spec.rl[k] for k in _PARAMS if k in spec.rl}
        policies.append({"name": spec.name, "method": method, **policy, "params": params})
    user = dict(config.frontier or {})
    return {
        "title": f"WARP (I={config.iterations}, M={config.num_policies}) vs baselines",
        **user,
        "method_labels": {**labels, **user.get("method_labels", {})},
        "reference": str(sft),
        "policies": policies + list(config.frontier_policies),
        "output_dir": str(out / "frontier"),
    }


def _baseline_policy(spec: RunSpec) -> tuple[str, str, dict[str, str]]:
    """A baseline's frontier method, its label, and what is drawn: its trajectory (checkpoints in order), or
    for `final_policy` swa / lawa its averaged policy (the checkpoints are the raw iterates, not what it ends as)."""
    anchor, final = spec.rl.get("anchor", "ema"), spec.rl.get("final_policy", "last")
    if final == "last":
        return (
            f"{anchor}_anchor",
            _ANCHOR_LABELS[anchor],
            {"trajectory": str(spec.output_dir / "checkpoint-*")},
        )
    label = f"{_ANCHOR_LABELS[anchor]}, {_FINAL_LABELS[final].format(**spec.rl)}"
    return f"{anchor}_anchor_{final}", label, {"path": str(spec.policy_dir)}


def evaluate_frontier(
    config: WarpConfig, sft: Path, out: Path, manifest: Manifest, baseline_keys: list[str]
) -> bool:
    """Run the frontier evaluation unless the manifest has it for these exact inputs. Returns whether it ran."""
    document = frontier_document(config, sft, out)
    merges = [manifest.steps[f"iter_{i}/merge"]["outputs"] for i in range(1, config.iterations + 1)]
    baselines = [manifest.steps[k]["outputs"] for k in baseline_keys]
    step = Step("frontier", fingerprint([document, merges, baselines]), [out / "frontier"])

    def evaluate() -> None:
        from warpkit.frontier import load_frontier_config, run_frontier, write_frontier
        from warpkit.frontier.output import comparison_lines

        path = out / "frontier.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        log.info("frontier: evaluating %d policy groups (%s)", len(document["policies"]), path)
        result = run_frontier(load_frontier_config(path))
        write_frontier(result, out / "frontier")
        for line in [*comparison_lines(result), *filter(None, [result.settings.get("note")])]:
            log.info("frontier: %s", line)
        log.info("frontier: %s", out / "frontier" / "frontier.png")

    return manifest.run(step, evaluate, clear_outputs=False)  # frontier/ may hold other files

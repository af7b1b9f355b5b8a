"""The report of the WARP evidence experiment: summary.json from each seed's frontier.json and geometry.json,
then RESULTS.md and frontier.png from summary.json alone (no hand-copied numbers; tests/experiments checks
that the committed RESULTS.md is what `render` makes of the committed summary.json, and that summary.json is
what `summarise_seeds` makes of the committed per-seed files).

Each claim of ../shared/WARP.md is an effect per seed with its evaluation interval (from the frontier
library: paired t over prompts for reward gaps, bootstrap over prompts for hypervolume differences) and,
across seeds, the mean with a t interval over seeds (`warpkit.frontier.intervals.t_interval`). Verdict:
*holds* when the across-seed interval excludes 0 in the claimed direction, *contradicted* when it excludes 0
in the other, *inconclusive* otherwise; a claim measured on one seed is judged on that seed's interval.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from warpkit.frontier.intervals import t_interval

__all__ = ["CLAIMS", "effect", "render", "summarise_seeds", "verdict", "write_report"]

# (id, claim, kind, a, b, expected sign, note). kind: matched = mean reward gap a - b at matched KL;
# hv = hypervolume a - b; point:<field> = paired difference of two points' <field> over prompts.
CLAIMS: list[tuple[str, str, str, str, str, int]] = [
    ("1", "EMA anchor above SFT anchor at the same beta (0.05), reward at matched KL",
     "matched", "ema_anchor", "sft_anchor", +1),
    ("1b", "SFT anchor, small beta (0.01): more KL than beta 0.05 after the whole budget",
     "point:kl_exact", "sft_beta0_01/step={last}", "sft_beta0_05/step={last}", +1),
    ("1c", "SFT anchor, large beta (0.2): less KL than beta 0.05 after the whole budget",
     "point:kl_exact", "sft_beta0_2/step={last}", "sft_beta0_05/step={last}", -1),
    ("3", "SLERP above LERP in reward (iteration 1, lambda = 1/2, the same two runs)",
     "point:reward", "warp-iter1/eta=1", "lerp_iter1", +1),
    ("3b", "LERP lowers KL relative to SLERP (same merge)",
     "point:kl_exact", "lerp_iter1", "warp-iter1/eta=1", -1),
    ("4", "WARP's final LITI front above the EMA-anchor trajectory, at matched KL",
     "matched", "warp_iter3", "ema_anchor", +1),
    ("4b", "WARP's final LITI front above the SFT-anchor trajectory (beta 0.05), at matched KL",
     "matched", "warp_iter3", "sft_anchor", +1),
    ("4c", "M = 2 above M = 1 (iteration 1 LITI fronts), at matched KL",
     "matched", "warp_iter1", "warp_m1_iter1", +1),
    ("5", "Iteration 2's front above iteration 1's (hypervolume)", "hv", "warp_iter2", "warp_iter1", +1),
    ("5b", "Iteration 3's front above iteration 2's (hypervolume)", "hv", "warp_iter3", "warp_iter2", +1),
    ("F1", "WARP's final front above the BEMA-anchor trajectory, at matched KL",
     "matched", "warp_iter3", "bema_anchor", +1),
    ("F2", "WARP's final front above Elastic Reset's trajectory, at matched KL",
     "matched", "warp_iter3", "elastic_reset_anchor", +1),
]  # fmt: skip


def effect(doc: dict[str, Any], kind: str, a: str, b: str) -> tuple[float, float, float] | None:
    """(effect, low, high) of one claim in one seed's frontier.json; None when it cannot be measured there
    (a method absent, fronts that do not overlap in KL)."""
    if kind == "matched":
        for m in doc["matched_kl"]:
            sign = (
                1
                if (m["method_a"], m["method_b"]) == (a, b)
                else -1
                if (m["method_b"], m["method_a"]) == (a, b)
                else 0
            )
            if sign and m["kl"] and "mean_gap_interval" in m:
                lo, hi = m["mean_gap_interval"]
                return (sign * m["mean_gap"], *sorted((sign * lo, sign * hi)))
        return None
    if kind == "hv":
        for d in doc["hypervolume"].get("differences", []):
            sign = (
                1
                if (d["method_a"], d["method_b"]) == (a, b)
                else -1
                if (d["method_b"], d["method_a"]) == (a, b)
                else 0
            )
            if sign:
                lo, hi = d["interval"]
                return (sign * d["difference"], *sorted((sign * lo, sign * hi)))
        return None
    field = kind.split(":", 1)[1]
    rows = {p["name"]: p for p in doc["points"]}
    if a not in rows or b not in rows:
        return None
    d = [x - y for x, y in zip(rows[a]["per_prompt"][field], rows[b]["per_prompt"][field], strict=True)]
    return t_interval(d, doc["settings"]["confidence_level"])


def verdict(expected: int, low: float, high: float) -> str:
    """holds / contradicted / inconclusive: does the interval exclude 0, and on which side."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if expected * low > 0 and expected * high > 0:
        return "holds"
    if expected * low < 0 and expected * high < 0:
        return "contradicted"
    return "inconclusive"


def _claim(claim: tuple, docs: dict[int, dict[str, Any]], last_step: int) -> dict[str, Any]:
    cid, text, kind, a, b, expected = claim
    a, b = a.format(last=last_step), b.format(last=last_step)  # a baseline's last checkpoint
    per_seed = {s: e for s, doc in docs.items() if (e := effect(doc, kind, a, b)) is not None}
    row: dict[str, Any] = {"id": cid, "claim": text, "kind": kind, "a": a, "b": b, "expected_sign": expected}
    row["per_seed"] = {str(s): list(e) for s, e in per_seed.items()}
    if len(per_seed) >= 2:
        mean, lo, hi = t_interval([e[0] for e in per_seed.values()])
        row["across_seeds"] = [mean, lo, hi]
    elif per_seed:
        mean, lo, hi = next(iter(per_seed.values()))
    else:
        mean = lo = hi = math.nan
    row["verdict"] = verdict(expected, lo, hi) if per_seed else "not measured"
    return row


def _geometry(geometries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Claims 2 and 6 per iteration: mean / min / max over blocks and seeds."""
    out: dict[str, Any] = {}
    for it in sorted({k for g in geometries.values() for k in g}):
        cos = [c for g in geometries.values() if it in g for c in g[it]["task_vector_cos"].values()]
        eta = [e for g in geometries.values() if it in g for e in g[it]["model_stock_eta"].values()]
        weights = [g[it]["weights_cos"] for g in geometries.values() if it in g]
        out[it] = {
            "task_vector_cos": {"mean": sum(cos) / len(cos), "min": min(cos), "max": max(cos), "n": len(cos)},
            "weights_cos_min": min(weights),
            "model_stock_eta": {"mean": sum(eta) / len(eta), "min": min(eta), "max": max(eta)},
        }
    return out


def _points(docs: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every point name: its method, and reward / KL mean and spread (sd) across the seeds that have it."""
    names: dict[str, dict[str, Any]] = {}
    for seed, doc in docs.items():
        for p in doc["points"]:
            entry = names.setdefault(p["name"], {"name": p["name"], "method": p["method"], "seeds": {}})
            entry["seeds"][str(seed)] = {
                k: p[k] for k in ("reward_mean", "reward_stderr", "kl_exact_mean", "kl_exact_stderr")
            }
    for entry in names.values():
        for key in ("reward_mean", "kl_exact_mean"):
            values = [v[key] for v in entry["seeds"].values()]
            mean = sum(values) / len(values)
            sd = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else math.nan
            )
            entry[key.replace("_mean", "")] = {"mean": mean, "sd_across_seeds": sd}
        entry["max_stderr"] = max(v["reward_stderr"] for v in entry["seeds"].values())
    return list(names.values())


def summarise_seeds(
    docs: dict[int, dict[str, Any]], geometries: dict[int, dict[str, Any]], facts: dict[str, Any]
) -> dict[str, Any]:
    """summary.json: the claims (per seed and across seeds), the geometry, every point across seeds, and
    the run's facts (command, machine, versions, wall times)."""
    return {
        "facts": facts,
        "seeds": sorted(docs),
        "claims": [_claim(c, docs, facts["last_step"]) for c in CLAIMS],
        "geometry": _geometry(geometries),
        "points": _points(docs),
        "hypervolume": {str(s): d["hypervolume"]["by_method"] for s, d in docs.items()},
    }


def _fmt(e: list[float] | None) -> str:
    if not e:
        return "—"
    mean, lo, hi = e
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else f"{mean:+.3f}"


def render(summary: dict[str, Any]) -> str:
    """RESULTS.md, every number read from `summary` (summary.json)."""
    f, seeds = summary["facts"], summary["seeds"]
    lines = [
        "# Does WARP help? Reward-KL evidence on the embedded default (CPU)",
        "",
        f"What: {f['setup']}",
        "",
        "Command (from the repository root; resumable, re-run it after any interruption):",
        "",
        f"    {f['command']}",
        "",
        f"Machine: {f['machine']}. Versions: {f['versions']}.",
        "Wall time, per session of runs:",
        *(_render_session(s) for s in f["sessions"]),
        "",
        f"Seeds (data order): {', '.join(map(str, seeds))}. Files: `summary.json` (everything below),",
        "`seed_<s>/frontier.json` (every point with its per-prompt means, fronts, hypervolumes with bootstrap",
        "intervals, matched-KL gaps with paired intervals), `seed_<s>/frontier.csv`, `seed_<s>/frontier.png`,",
        "`seed_<s>/geometry.json`; `frontier.png` (means across seeds, bars: spread across seeds).",
        "",
        "## Claims",
        "",
        f"Effect a − b per seed with its {f['level']:.0%} evaluation interval (paired over the same prompts and",
        "random numbers: t over prompts for reward gaps and point differences, bootstrap over prompts for",
        f"hypervolumes), then the mean over seeds with a {f['level']:.0%} t interval over seeds. Verdict: holds /",
        "contradicted when the across-seed interval (one seed: its own interval) excludes 0 on the claimed /",
        "the other side, else inconclusive at this scale.",
        "",
        "| # | claim | a − b | " + " | ".join(f"seed {s}" for s in seeds) + " | across seeds | verdict |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for c in summary["claims"]:
        per = [_fmt(c["per_seed"].get(str(s))) for s in seeds]
        across = _fmt(c.get("across_seeds"))
        lines.append(
            f"| {c['id']} | {c['claim']} | `{c['a']}` − `{c['b']}` ({c['kind']}) | "
            + " | ".join(per)
            + f" | {across} | **{c['verdict']}** |"
        )
    lines += ["", "## Task-vector geometry (claims 2 and 6)", ""]
    lines += [
        "Per iteration, over blocks and seeds: cos(d₁, d₂) of the two runs' task vectors (claim 2: near 0),",
        "the smallest cos(θ₁, θ₂) of their weights (claim 2: > 0.999), and Model Stock's η = 2cos/(1 + cos)",
        "(claim 6: near 0, i.e. it would undo the update).",
        "",
        "| iteration | cos(d₁, d₂) mean [min, max] | min cos(θ₁, θ₂) | Model Stock η mean [min, max] |",
        "|---|---|---|---|",
    ]
    for it, g in summary["geometry"].items():
        c, e = g["task_vector_cos"], g["model_stock_eta"]
        lines.append(
            f"| {it} | {c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}] | {g['weights_cos_min']:.6f} | "
            f"{e['mean']:.3f} [{e['min']:.3f}, {e['max']:.3f}] |"
        )
    lines += ["", "## Points", "", "Reward (VADER) and KL (nats, exact per position) of every point: mean over the",
              "seeds that have it ± spread (sd across seeds); the largest per-point reward standard error.", "",
              "| point | method | seeds | reward | KL | max stderr |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p in summary["points"]:
        r, k = p["reward"], p["kl_exact"]
        sd = lambda x: f" ± {x:.3f}" if math.isfinite(x) else ""  # noqa: E731
        lines.append(
            f"| {p['name']} | {p['method']} | {len(p['seeds'])} | {r['mean']:.3f}{sd(r['sd_across_seeds'])} | "
            f"{k['mean']:.3f}{sd(k['sd_across_seeds'])} | {p['max_stderr']:.3f} |"
        )
    lines += ["", "## Notes", "", *f["notes"], ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """frontier.png: each method's points, mean over seeds, bars = sd across seeds, lines in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from warpkit.frontier.plot import method_colours

    fig, ax = plt.subplots(figsize=(10, 6.5))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for p in summary["points"]:
        by_method.setdefault(p["method"], []).append(p)
    colours = method_colours(len(by_method))
    for colour, (method, pts) in zip(colours, by_method.items(), strict=True):
        pts = sorted(pts, key=lambda p: p["kl_exact"]["mean"])
        x = [p["kl_exact"]["mean"] for p in pts]
        y = [p["reward"]["mean"] for p in pts]
        xe = [p["kl_exact"]["sd_across_seeds"] if len(p["seeds"]) > 1 else 0 for p in pts]
        ye = [p["reward"]["sd_across_seeds"] if len(p["seeds"]) > 1 else 0 for p in pts]
        seeds = max(len(p["seeds"]) for p in pts)
        ax.errorbar(
            x,
            y,
            xerr=xe,
            yerr=ye,
            marker="o",
            ms=4,
            capsize=2,
            color=colour,
            label=f"{method} ({seeds} seeds)",
        )
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(policy || SFT), nats per completion (exact per position)")
    ax.set_ylabel("reward (VADER), held-out prompts")
    ax.set_title("WARP vs baselines, mean over seeds (bars: sd across seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOTES = [
    "- Scale: a 135M model, a lexicon reward and a few dozen sequential RL steps per method, far from the",
    "  paper's thousands of steps on Gemma 7B; a verdict here is about this scale only.",
    "- Seeds change the prompt order of every run; the sampling seed of the runs and of the evaluation is",
    "  fixed, so the evaluation's noise is shared by all points (common random numbers) and the spread",
    "  across seeds is the training's.",
    "- Claims measured on seed 0 only (the other seeds train the main baselines alone): 1b, 1c, F1, F2.",
    "- Hypervolumes are against each seed's own reference point (1.1 x its largest KL, the SFT's reward):",
    "  compare them within a seed, as the differences in the claims table do.",
]


def _facts(config: Any, docs: dict[int, dict[str, Any]], sessions: list[dict[str, Any]]) -> dict[str, Any]:
    import os
    import platform

    import torch
    import transformers
    import trl

    from experiments.warp_evidence import SEEDS
    from warpkit import __version__

    rl, fr = config.rl, next(iter(docs.values()))["settings"]
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    return {
        "setup": (
            f"WARP (I = {config.iterations} iterations of M = {config.num_policies} RLOO runs of T = "
            f"{rl['max_steps']} steps, EMA anchor rate {rl['ema_rate']}, beta {rl['beta']}, SLERP per "
            f"{config.merge_granularity}, LITI eta {config.liti_eta}) against single runs of "
            f"{config.iterations * rl['max_steps']} steps from the SFT init (checkpoints every {rl['max_steps']}), "
            f"all with learning rate {rl['learning_rate']}, {rl['per_device_train_batch_size']} completions of "
            f"{rl['max_completion_length']} tokens per step; frontier on {fr['num_prompts_used']} held-out prompts "
            f"x {fr['samples_per_prompt']} samples at temperature {fr['temperature']}."
        ),
        "command": "HF_HUB_OFFLINE=1 python -m experiments.warp_evidence"
        + ("" if tuple(sorted(docs)) == SEEDS else " --seeds " + " ".join(map(str, sorted(docs)))),
        "machine": f"{len(os.sched_getaffinity(0))} cores ({cpu}), CPU only, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}, warpkit {__version__}",
        "sessions": sessions,
        "level": fr["confidence_level"],
        "last_step": config.iterations * rl["max_steps"],
        "notes": NOTES,
    }


def _seed_times(runs_dir: Path, seed: int) -> dict[str, float]:
    """From the files the driver leaves: the seed's first run started, its last run recorded, its frontier
    config written and its frontier recorded (epoch seconds)."""
    from datetime import datetime

    out = runs_dir / f"seed_{seed}"
    steps = json.loads((out / "warp_manifest.json").read_text())["steps"]
    done = [datetime.fromisoformat(v["finished"]).timestamp() for k, v in steps.items() if "run" in k or "baselines/" in k]  # fmt: skip
    return {
        "start": (out / "iter_1" / "run_1" / ".warpkit_fingerprint").stat().st_mtime,
        "trained": max(done),
        "evaluating": (out / "frontier.yaml").stat().st_mtime,
        "end": datetime.fromisoformat(steps["frontier"]["finished"]).timestamp(),
    }


def group_sessions(times: dict[int, dict[str, float]]) -> list[list[int]]:
    """Seeds whose [start, end] intervals overlap (or chain) ran in one session: the groups, in time order."""
    groups: list[list[int]] = []
    last_end = -math.inf
    for seed in sorted(times, key=lambda s: times[s]["start"]):
        if groups and times[seed]["start"] <= last_end:
            groups[-1].append(seed)
            last_end = max(last_end, times[seed]["end"])
        else:
            groups.append([seed])
            last_end = times[seed]["end"]
    return [sorted(g) for g in groups]


def _session(seeds: list[int], times: dict[int, dict[str, float]], schedule: str | None) -> dict[str, Any]:
    """One session: per seed, training (first run started to last run recorded) and frontier (its config
    written to its record) in minutes, and the whole (first run started to last frontier written)."""
    from datetime import datetime

    first, last = min(times[s]["start"] for s in seeds), max(times[s]["end"] for s in seeds)
    return {
        "seeds": list(seeds),
        "started": datetime.fromtimestamp(first).astimezone().isoformat(timespec="minutes"),
        "total_min": round((last - first) / 60),
        "per_seed": {
            str(s): {
                "training_min": round((times[s]["trained"] - times[s]["start"]) / 60),
                "frontier_min": round((times[s]["end"] - times[s]["evaluating"]) / 60),
            }
            for s in seeds
        },
        "schedule": schedule,
    }


def _sessions(results: Path, fresh: list[int], runs_dir: Path, schedule: str | None) -> list[dict[str, Any]]:
    """The sessions behind the report. Seeds under `runs_dir` are grouped by time (`group_sessions`); a
    group keeps the schedule the committed summary.json gave the same seeds, and the last group gets
    `schedule` when given. Seeds read from `results` (an earlier session's, runs/ gone) keep their
    session's entry from summary.json (its total_min stays that session's own)."""
    previous = []
    if (results / "summary.json").is_file():
        previous = json.loads((results / "summary.json").read_text())["facts"].get("sessions", [])
    kept = []
    for old in previous:
        seeds = [s for s in old["seeds"] if s not in fresh]
        if seeds:
            kept.append({**old, "seeds": seeds, "per_seed": {str(s): old["per_seed"][str(s)] for s in seeds}})
    times = {s: _seed_times(runs_dir, s) for s in fresh}
    groups = group_sessions(times)
    new = []
    for n, group in enumerate(groups):
        known = next((o.get("schedule") for o in previous if sorted(o["seeds"]) == group), None)
        new.append(_session(group, times, schedule if schedule and n == len(groups) - 1 else known))
    return kept + new


def _render_session(s: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, s["seeds"]))
    per = "; ".join(
        f"seed {k}: training {v['training_min']} min, frontier {v['frontier_min']} min"
        for k, v in s["per_seed"].items()
    )
    head = f"- seeds {seeds} (started {s['started']}): {s['total_min']} min in all"
    line = f"{head}, first run started to last frontier written ({per})."
    return line + (f" Scheduled: {s['schedule']}." if s.get("schedule") else "")


def write_report(
    seeds: list[int],
    runs_dir: Path,
    results: Path,
    config_path: Path | None = None,
    schedule: str | None = None,
) -> Path:
    """Copy each seed's frontier and geometry into `results`, then summary.json, RESULTS.md, frontier.png.
    A seed evaluated under `runs_dir` is copied from there; one that is not (an earlier session's: runs/
    is not kept) is read from its committed files in `results`, with that session's wall times."""
    from experiments.warp_evidence import CONFIG, seed_config
    from warpkit._util.files import write_atomic

    docs, geometries, fresh = {}, {}, []
    for s in seeds:
        src, dst = runs_dir / f"seed_{s}", results / f"seed_{s}"
        if (src / "frontier" / "frontier.json").is_file():
            fresh.append(s)
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("frontier.json", "frontier.csv", "frontier.png"):
                shutil.copyfile(src / "frontier" / name, dst / name)
            shutil.copyfile(src / "geometry.json", dst / "geometry.json")
        elif not (dst / "frontier.json").is_file():
            raise SystemExit(f"seed {s}: neither {src / 'frontier'} nor {dst} has a frontier.json; run "
                             f"--phase train and --phase evaluate with --seeds {s} first")  # fmt: skip
        docs[s] = json.loads((dst / "frontier.json").read_text())
        geometries[s] = json.loads((dst / "geometry.json").read_text())
    sessions = _sessions(results, fresh, runs_dir, schedule)
    summary = summarise_seeds(
        docs, geometries, _facts(seed_config(seeds[0], runs_dir, config_path or CONFIG), docs, sessions)
    )
    write_atomic(results / "summary.json", json.dumps(summary, indent=1))
    write_atomic(results / "RESULTS.md", render(summary))
    plot(summary, results / "frontier.png")
    return results / "RESULTS.md"

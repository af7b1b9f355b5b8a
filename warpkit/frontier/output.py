"""The files and the table of a frontier: frontier.json, frontier.csv, samples.jsonl, the plots, the printout.

- frontier.json: ``points`` (one row per point), ``fronts``, ``hypervolume``, ``matched_kl``, ``skipped``,
  ``settings`` (and ``reward_fronts``, ``reward_front_axes`` with extra rewards);
- frontier.csv: one line per point, the `COLUMNS` then ``reward_<name>_mean``, ``reward_<name>_stderr`` for
  each extra reward in config order;
- samples.jsonl: the first two samples of each point (prompt, completion, rewards, KL);
- frontier.png (`plot.plot_frontier`) and, with extra rewards, rewards.png (`plot.plot_rewards`).

Each file appears whole or not at all (`warpkit._util.files.staged_files`). `check_output_dir` refuses,
before anything is sampled, an output_dir that is a file or cannot be created or written.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from warpkit._util.files import staged_files
from warpkit.frontier.plot import plot_frontier, plot_rewards
from warpkit.frontier.summary import FrontierResult, reward_value
from warpkit.merge.output import check_writable_parent

__all__ = [
    "COLUMNS",
    "check_output_dir",
    "plot_result",
    "plot_result_rewards",
    "print_frontier",
    "write_csv",
    "write_frontier",
    "write_json",
    "write_samples",
]

COLUMNS = [
    "name", "method", "kind", "spec", "step", "eta", "reward_mean", "reward_stderr", "kl_mean", "kl_stderr",
    "kl_exact_mean", "kl_exact_stderr", "length_mean", "diversity", "distinct_1", "distinct_2",
    "num_samples", "num_reward_skipped", "params", "weights",
]  # fmt: skip
# Then reward_<name>_mean, reward_<name>_stderr for each extra reward, in config order.


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an output_dir that is a file, or whose nearest existing parent is a file or read-only.

    An existing folder is fine: only the frontier's own files in it are replaced, others are left alone.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"output_dir={out} is a file; the frontier writes frontier.json, frontier.csv and samples.jsonl "
            "into a folder. Remove the file or choose another output_dir (CLI: --output-dir)."
        )
    if not out.exists():
        check_writable_parent(out, "output_dir")
    elif not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_dir={out} cannot be written: it is read-only for this user. Choose another output_dir "
            "(or fix its permissions)."
        )


def write_frontier(result: FrontierResult, output_dir: str | Path, *, plot: bool = True) -> Path:
    """Write frontier.json, frontier.csv, samples.jsonl (and frontier.png, plus rewards.png with extra
    rewards) into ``output_dir``.

    Each file is written in a temporary folder first and moved into place, so an interrupted run never
    leaves a truncated file that looks complete; other files in ``output_dir`` are left alone.
    """
    out = Path(output_dir)
    with staged_files(out) as tmp:
        write_json(result, tmp / "frontier.json")
        write_csv(result, tmp / "frontier.csv")
        write_samples(result, tmp / "samples.jsonl")
        if plot:
            plot_result(result, tmp / "frontier.png")
            if result.reward_front_axes:
                plot_result_rewards(result, tmp / "rewards.png")
    return out


def write_json(result: FrontierResult, path: Path) -> None:
    """frontier.json: every field of the result but the samples (reward fronts only with extra rewards)."""
    doc = {
        "points": result.points,
        "fronts": result.fronts,
        "hypervolume": result.hypervolume,
        "matched_kl": result.matched_kl,
        "skipped": result.skipped,
        "settings": result.settings,
    }
    if result.reward_front_axes:
        doc |= {"reward_fronts": result.reward_fronts, "reward_front_axes": result.reward_front_axes}
    path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True))


def write_csv(result: FrontierResult, path: Path) -> None:
    """frontier.csv: `COLUMNS` (params and weights as JSON), then each extra reward's mean and stderr."""
    extra = list(result.settings.get("extra_rewards", {}))
    extra_columns = [f"reward_{n}_{k}" for n in extra for k in ("mean", "stderr")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra_columns)
        writer.writeheader()
        for row in result.points:
            line = {k: row.get(k) for k in COLUMNS}
            line["params"] = json.dumps(row["params"])
            line["weights"] = "" if row.get("weights") is None else json.dumps(row["weights"])
            for n in extra:
                line[f"reward_{n}_mean"] = row["rewards"][n]["mean"]
                line[f"reward_{n}_stderr"] = row["rewards"][n]["stderr"]
            writer.writerow(line)


def write_samples(result: FrontierResult, path: Path) -> None:
    """samples.jsonl: one JSON object per kept sample."""
    with open(path, "w") as f:
        for sample in result.samples:
            f.write(json.dumps(sample) + "\n")


def _reward_label(spec: str) -> str:
    """``module:function`` -> ``function``; a reward model folder -> its folder name."""
    return Path(spec).name if os.path.isdir(spec) else spec.rpartition(":")[2]


def plot_result(result: FrontierResult, path: Path) -> None:
    """frontier.png: `plot_frontier` with labels from the run's settings (reward, KL estimator, sizes)."""
    s = result.settings
    estimator = "per-position exact KL" if s["front_kl"] == "kl_exact" else "Monte Carlo log-ratio"
    reward = _reward_label(s["reward"])
    hv = result.hypervolume
    plot_frontier(
        result.points,
        path,
        kl_key=f"{s['front_kl']}_mean",
        fronts=result.fronts,
        hypervolume=hv["by_method"],
        hypervolume_reference=(hv["reference_point"]["kl"], hv["reference_point"]["reward"]),
        method_labels=s["method_labels"],
        title=s["title"] or "Reward-KL frontier",
        subtitle="\n".join(
            [
                f"{s['num_prompts_used']} held-out prompts x {s['samples_per_prompt']} samples, temperature "
                f"{s['temperature']:g}, <= {s['max_new_tokens']} new tokens; error bars: 1 s.e.",
                *comparison_lines(result)[:PLOTTED_COMPARISONS],
                *([s["note"]] if s.get("note") else []),
            ]
        ),
        xlabel=f"KL(policy || SFT) per completion, nats ({estimator}, T = {s['temperature']:g})",
        ylabel=f"reward: {reward} (mean ± s.e.)",
        xscale=s["plot_xscale"],
    )


PLOTTED_COMPARISONS = 3  # matched-KL verdicts written under the plot's title (all of them are printed)


def comparison_lines(result: FrontierResult) -> list[str]:
    """One line per matched-KL comparison with an interval: the mean gap, its interval, and whether the
    interval excludes 0 (a difference this evaluation resolves) or not."""
    lines = []
    for m in result.matched_kl:
        if not m["kl"] or "mean_gap_interval" not in m:
            continue
        lo, hi = m["mean_gap_interval"]
        resolved = lo > 0 or hi < 0
        lines.append(
            f"{m['method_a']} - {m['method_b']} at matched KL: {m['mean_gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"({m['level']:.0%}): " + ("resolved" if resolved else "not resolved, the interval contains 0")
        )
    return lines


def plot_result_rewards(result: FrontierResult, path: Path) -> None:
    """rewards.png: `plot_rewards` of the points with both rewards of ``reward_front_axes`` finite."""
    s = result.settings
    x_axis, y_axis = result.reward_front_axes

    def label(axis: str) -> str:
        spec = s["reward"] if axis == "reward" else s["extra_rewards"][axis]
        name = "main reward" if axis == "reward" else f"reward {axis!r}"
        return f"{name}: {_reward_label(spec)} (mean ± s.e.)"

    points = [
        p | {"x": reward_value(p, x_axis), "y": reward_value(p, y_axis)}
        for p in result.points
        if all(math.isfinite(reward_value(p, a)[0]) for a in (x_axis, y_axis))
    ]
    plot_rewards(
        points,
        path,
        fronts=result.reward_fronts,
        method_labels=s["method_labels"],
        title=s["title"] or "Reward against reward",
        subtitle=(
            f"{s['num_prompts_used']} held-out prompts x {s['samples_per_prompt']} samples, temperature "
            f"{s['temperature']:g}; both rewards on the same samples; error bars: 1 s.e."
        ),
        xlabel=label(x_axis),
        ylabel=label(y_axis),
    )


def print_frontier(result: FrontierResult) -> None:
    """The table `warpkit frontier` prints: every point, each method's front, reward fronts, matched KL."""
    key = f"{result.settings['front_kl']}_mean"
    print(f"{'point':<28} {'method':<14} {'reward':>16} {'KL (MC)':>16} {'KL (exact/pos)':>16} {'len':>6}")
    for r in result.points:
        print(
            f"{r['name']:<28} {r['method']:<14} {r['reward_mean']:>8.3f} ± {r['reward_stderr']:<5.3f} "
            f"{r['kl_mean']:>8.3f} ± {r['kl_stderr']:<5.3f} {r['kl_exact_mean']:>8.3f} ± {r['kl_exact_stderr']:<5.3f} "
            f"{r['length_mean']:>6.1f}"
        )
    for method, names in result.fronts.items():
        hv = result.hypervolume["by_method"][method]
        lo, hi = result.hypervolume.get("interval", {}).get(method, (math.nan, math.nan))
        ci = f" [{lo:.4g}, {hi:.4g}]" if math.isfinite(lo) else ""
        print(f"front {method}: {' -> '.join(names)}  (hypervolume {hv:.4g}{ci}, KL axis: {key})")
    if result.reward_fronts:
        x, y = result.reward_front_axes
        for method, names in result.reward_fronts.items():
            print(f"reward front {method} ({x} vs {y}, both maximised): {' -> '.join(names)}")
    for m in result.matched_kl:
        if m["kl"]:
            lo, hi = m.get("mean_gap_interval", (math.nan, math.nan))
            ci = f" [{lo:+.4f}, {hi:+.4f}] ({m['level']:.0%}, paired by prompt)" if math.isfinite(lo) else ""
            verdict = "" if not ci else ": resolved" if lo > 0 or hi < 0 else ": not resolved (contains 0)"
            print(
                f"reward at matched KL, {m['method_a']} - {m['method_b']}: mean gap {m['mean_gap']:+.4f}{ci} "
                f"over KL [{m['kl'][0]:.3g}, {m['kl'][-1]:.3g}]{verdict}"
            )
        else:
            print(
                f"reward at matched KL, {m['method_a']} - {m['method_b']}: their fronts do not overlap in KL"
            )
    if result.settings.get("note"):
        print(result.settings["note"])

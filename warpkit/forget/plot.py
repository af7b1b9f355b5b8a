"""The Fuse-to-Forget PNGs (matplotlib Agg, imported when a plot is drawn):

- `plot_path`: each metric against α along one interpolation path, one line per probe set (the paper's
  Figures 2 and 5): ALR (log scale, the reference's 1 dashed), mean token log-likelihood, and exact-match
  accuracy when a probe set has targets; error bars 1 s.e. over texts;
- `plot_bars`: individual against fused models, one group of bars per probe set (the paper's Figure 4):
  ALR and the log-likelihood gain over the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["bar_points", "plot_bars", "plot_path"]

Row = Mapping[str, Any]
_METRICS = [
    ("alr", "ALR = mean p_ref / p_θ (per token)"),
    ("ll_mean", "mean token log-likelihood (nats)"),
    ("accuracy", "exact-match accuracy"),
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(probe: str, seen_by: Sequence[str]) -> str:
    return f"{probe} (seen by {', '.join(seen_by)})" if seen_by else f"{probe} (held out)"


def plot_path(rows: Sequence[Row], path: str | Path, *, title: str, ends: Sequence[str]) -> Path:
    """Metrics against α for the rows of one path (kind ``path``), one line per probe set."""
    plt = _pyplot()
    metrics = [(k, t) for k, t in _METRICS if any(r[k] is not None for r in rows)]
    probes = list(dict.fromkeys(r["probe_set"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), dpi=150, squeeze=False)
    for ax, (key, text) in zip(axes[0], metrics, strict=True):
        for c, probe in enumerate(probes):
            mine = sorted(
                (r for r in rows if r["probe_set"] == probe and r[key] is not None), key=lambda r: r["alpha"]
            )
            if not mine:
                continue
            se = f"{key}_stderr" if key != "ll_mean" else "ll_stderr"
            ax.errorbar(
                [r["alpha"] for r in mine], [r[key] for r in mine], yerr=[r[se] or 0.0 for r in mine],
                marker="o", ms=3.5, capsize=2.5, color=f"C{c}", label=_label(probe, mine[0]["seen_by"]),
            )  # fmt: skip
        if key == "alr":
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.4", ls="--", lw=1, label="reference (ALR = 1)")
        ax.set_xlabel(f"α   (θ = (1 - α) {ends[0]} + α {ends[1]})")
        ax.set_ylabel(text)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7.5, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def bar_points(rows: Sequence[Row]) -> list[str]:
    """The bars of each group: reference, the models, the merges, each path's point nearest α = 0.5."""
    names = list(dict.fromkeys(r["point"] for r in rows if r["kind"] in ("reference", "model", "merge")))
    paths: dict[str, Row] = {}
    for r in rows:
        if r["kind"] == "path" and 0 < r["alpha"] < 1:
            best = paths.get(r["fusion"])
            if best is None or abs(r["alpha"] - 0.5) < abs(best["alpha"] - 0.5):
                paths[r["fusion"]] = r
    return names + [r["point"] for r in paths.values()]


def plot_bars(rows: Sequence[Row], path: str | Path, *, title: str) -> Path:
    """ALR and log-likelihood gain of individual and fused models, grouped by probe set."""
    plt = _pyplot()
    points = bar_points(rows)
    probes = list(dict.fromkeys(r["probe_set"] for r in rows))
    by = {(r["point"], r["probe_set"]): r for r in rows}
    width = 0.8 / max(1, len(points))
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.6 * len(probes) * 2), 4.6), dpi=150)
    for ax, (key, se, text) in zip(
        axes, [("alr", "alr_stderr", "ALR (log scale; reference = 1)"),
               ("ll_gain_mean", "ll_gain_stderr", "log-likelihood gain over the reference (nats/token)")],
        strict=True,
    ):  # fmt: skip
        for i, point in enumerate(points):
            xs = [j + (i - (len(points) - 1) / 2) * width for j in range(len(probes))]
            ys = [by[(point, p)][key] for p in probes]
            errs = [by[(point, p)][se] or 0.0 for p in probes]
            ax.bar(xs, ys, width, yerr=errs, capsize=2, color=f"C{i}", label=point)
        ax.set_xticks(range(len(probes)))
        ax.set_xticklabels(
            [_label(p, by[(points[0], p)]["seen_by"]) for p in probes], fontsize=7.5, rotation=15
        )
        ax.set_ylabel(text)
        ax.grid(axis="y", alpha=0.3)
        if key == "alr":
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.4", ls="--", lw=1)
    axes[0].legend(fontsize=7.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

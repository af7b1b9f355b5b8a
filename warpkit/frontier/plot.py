"""The reward-KL plot: one colour per method, its Pareto front as a solid line, training trajectories as
dashed arrows, LITI sweeps labelled with their eta, the SFT reference as a star. The reward-reward plot
(`plot_rewards`): the same conventions with a second reward on the y axis and rewarded soups drawn as
lines in weight order, labelled with their w. Matplotlib (Agg) only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_frontier", "plot_rewards"]

_MARKERS = {"path": "o", "trajectory": "s", "liti": "^", "soup": "D", "reference": "*"}


def plot_frontier(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    kl_key: str = "kl_exact_mean",
    fronts: Mapping[str, Sequence[str]] | None = None,
    hypervolume: Mapping[str, float] | None = None,
    hypervolume_reference: tuple[float, float] | None = None,
    method_labels: Mapping[str, str] | None = None,
    title: str = "Reward-KL frontier",
    subtitle: str = "",
    xlabel: str = "KL(policy || SFT), nats per completion",
    ylabel: str = "reward (mean ± s.e.)",
    xscale: str = "linear",
) -> Path:
    """Draw ``points`` (rows of frontier.json) to a PNG at ``path`` and return the path.

    Each row needs name, method, kind (path / trajectory / liti / reference), spec (its policy entry),
    step, eta, reward_mean, reward_stderr and ``kl_key`` with its ``_stderr`` twin. ``fronts`` maps a
    method to the names of its front points in KL order; ``hypervolume`` adds "HV" to the legend.
    ``xscale`` is ``linear`` or ``symlog`` (linear below 1 nat, logarithmic above).
    """
    if xscale not in ("linear", "symlog"):
        raise ValueError(f"xscale must be 'linear' or 'symlog', got {xscale!r}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = dict(method_labels or {})
    se_key = kl_key.replace("_mean", "_stderr")
    by_name = {p["name"]: p for p in points}
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != "sft"]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 7.5), dpi=150)

    def xy(p: Mapping[str, Any]) -> tuple[float, float]:
        return p[kl_key], p["reward_mean"]

    handles = []
    for c, method in enumerate(methods):
        colour = colours(c % 10)
        rows = [p for p in points if p["method"] == method]
        for p in rows:
            x, y = xy(p)
            xerr, yerr = p.get(se_key), p.get("reward_stderr")
            ax.errorbar(
                x,
                y,
                xerr=None if xerr is None or math.isnan(xerr) else xerr,
                yerr=None if yerr is None or math.isnan(yerr) else yerr,
                fmt=_MARKERS.get(p["kind"], "o"),
                color=colour,
                markersize=6,
                alpha=0.85,
                elinewidth=0.8,
                capsize=2,
            )
            if p["kind"] == "liti":
                ax.annotate(
                    f"η={p['eta']:g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color=colour,
                )
            elif p["kind"] == "path":
                ax.annotate(
                    p["spec"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=colour
                )
            elif p["kind"] == "soup":
                ax.annotate(
                    _weights_label(p),
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                    color=colour,
                )
        # Trajectories: dashed, in training order, arrow on the last segment, first and last steps labelled.
        for spec in dict.fromkeys(p["spec"] for p in rows if p["kind"] == "trajectory"):
            traj = sorted((p for p in rows if p["spec"] == spec), key=lambda p: p["step"])
            xs, ys = [xy(p)[0] for p in traj], [xy(p)[1] for p in traj]
            ax.plot(xs, ys, linestyle="--", color=colour, linewidth=1.3, zorder=3)
            if len(traj) >= 2:
                ax.annotate(
                    "",
                    xy=(xs[-1], ys[-1]),
                    xytext=(xs[-2], ys[-2]),
                    arrowprops={"arrowstyle": "->", "color": colour, "linewidth": 1.3, "linestyle": "--"},
                )
            for p in (traj[0], traj[-1]) if len(traj) > 1 else (traj[0],):
                ax.annotate(
                    f"{spec} step {p['step']}",
                    xy(p),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=7,
                    color=colour,
                )
        # The front as a wide translucent band under the points, so trajectories on it stay visible.
        front = [by_name[n] for n in (fronts or {}).get(method, [])]
        if front:
            # Densified, so the band is the linear interpolation in data space on a symlog axis too.
            fx, fy = [xy(front[0])[0]], [xy(front[0])[1]]
            for a, b in itertools.pairwise(front):
                (x0, y0), (x1, y1) = xy(a), xy(b)
                fx += [x0 + (x1 - x0) * t / 32 for t in range(1, 33)]
                fy += [y0 + (y1 - y0) * t / 32 for t in range(1, 33)]
            ax.plot(
                fx,
                fy,
                "-",
                color=colour,
                linewidth=5,
                alpha=0.35,
                solid_capstyle="round",
                zorder=1,
            )
        label = labels.get(method, method)
        if hypervolume and method in hypervolume:
            label += f"  (HV {hypervolume[method]:.3g})"
        handles.append(Line2D([], [], color=colour, linewidth=5, alpha=0.6, label=label))

    for p in points:
        if p["method"] == "sft":
            ax.plot(*xy(p), marker="*", color="black", markersize=14, linestyle="none", zorder=5)
            ax.annotate("SFT (reference)", xy(p), textcoords="offset points", xytext=(-10, -18), fontsize=8)
    if hypervolume_reference is not None:
        ax.plot(*hypervolume_reference, marker="x", color="grey", markersize=8, linestyle="none")
        ax.annotate(
            "HV reference",
            hypervolume_reference,
            textcoords="offset points",
            xytext=(-20, 6),
            fontsize=7,
            color="grey",
        )

    grey = "0.35"
    handles += [
        Line2D([], [], color=grey, linewidth=5, alpha=0.35, label="Pareto front of the method (band)"),
        Line2D(
            [],
            [],
            color=grey,
            linestyle="--",
            marker="s",
            markersize=4,
            label="training trajectory (checkpoints, in order)",
        ),
        Line2D([], [], color=grey, linestyle="none", marker="^", label="LITI sweep point (η labelled)"),
        Line2D([], [], color=grey, linestyle="none", marker="o", label="single checkpoint"),
        Line2D(
            [], [], color="black", linestyle="none", marker="*", markersize=10, label="SFT reference (KL = 0)"
        ),
    ]
    if any(p["kind"] == "soup" for p in points):
        handles.insert(
            -2, Line2D([], [], color=grey, linestyle="none", marker="D", label="rewarded soup (w labelled)")
        )
    # Below the axes, so the legend never hides a point.
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(True, alpha=0.3)
    if xscale == "symlog":  # linear up to 1 nat, logarithmic beyond: small and large KLs both readable
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=-0.1)
    else:
        ax.set_xlim(left=min(-0.03 * ax.get_xlim()[1], ax.get_xlim()[0]))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _weights_label(point: Mapping[str, Any]) -> str:
    """A soup point's label: ``w=(0.25, 0.75)``."""
    return "w=(" + ", ".join(f"{w:g}" for w in point["weights"]) + ")"


def _band(ax: Any, xs: Sequence[float], ys: Sequence[float], colour: Any) -> None:
    """A front as a wide translucent band under the points, so lines on it stay visible."""
    ax.plot(xs, ys, "-", color=colour, linewidth=5, alpha=0.35, solid_capstyle="round", zorder=1)


def plot_rewards(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    fronts: Mapping[str, Sequence[str]] | None = None,
    method_labels: Mapping[str, str] | None = None,
    title: str = "Reward against reward",
    subtitle: str = "",
    xlabel: str = "reward 1 (mean ± s.e.)",
    ylabel: str = "reward 2 (mean ± s.e.)",
) -> Path:
    """Draw two rewards of each point against each other to a PNG at ``path`` and return the path.

    Each row needs name, method, kind, spec, and ``x`` and ``y`` as ``(mean, stderr)`` pairs (the two
    rewards); soup rows also ``weights`` (w, length M), LITI rows ``eta``, trajectory rows ``step``.
    Soup points of one policy entry are joined in the order given (the sweep's weight order) and labelled
    with w. ``fronts`` maps a method to the names of its points on the front where both rewards are
    maximised, in increasing x.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = dict(method_labels or {})
    by_name = {p["name"]: p for p in points}
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != "sft"]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 7.5), dpi=150)

    def xy(p: Mapping[str, Any]) -> tuple[float, float]:
        return p["x"][0], p["y"][0]

    def errorbar(p: Mapping[str, Any], colour: Any, marker: str, size: float = 6) -> None:
        xerr, yerr = p["x"][1], p["y"][1]
        ax.errorbar(
            *xy(p),
            xerr=None if xerr is None or math.isnan(xerr) else xerr,
            yerr=None if yerr is None or math.isnan(yerr) else yerr,
            fmt=marker,
            color=colour,
            markersize=size,
            alpha=0.85,
            elinewidth=0.8,
            capsize=2,
            zorder=4,
        )

    def note(text: str, p: Mapping[str, Any], colour: Any, offset: tuple[int, int] = (5, 4)) -> None:
        ax.annotate(text, xy(p), textcoords="offset points", xytext=offset, fontsize=7, color=colour)

    handles = []
    for c, method in enumerate(methods):
        colour = colours(c % 10)
        rows = [p for p in points if p["method"] == method]
        for p in rows:
            errorbar(p, colour, _MARKERS.get(p["kind"], "o"))
            if p["kind"] == "liti":
                note(f"η={p['eta']:g}", p, colour, (4, -10))
            elif p["kind"] == "path":
                note(p["spec"], p, colour)
            elif p["kind"] == "trajectory":
                note(f"{p['spec']} step {p['step']}", p, colour)
        # Rewarded soups: the interpolation path in weight order; each point labelled with its w.
        for spec in dict.fromkeys(p["spec"] for p in rows if p["kind"] == "soup"):
            soup = [p for p in rows if p["spec"] == spec]
            ax.plot([xy(p)[0] for p in soup], [xy(p)[1] for p in soup], "-", color=colour, lw=1.3, zorder=3)
            # Labels alternate above and below the line, so neighbours stay apart.
            for i, p in enumerate(soup):
                note(_weights_label(p), p, colour, (5, 5 - 16 * (i % 2)))
        front = [by_name[n] for n in (fronts or {}).get(method, [])]
        if front:
            _band(ax, [xy(p)[0] for p in front], [xy(p)[1] for p in front], colour)
        handles.append(Line2D([], [], color=colour, linewidth=5, alpha=0.6, label=labels.get(method, method)))

    for p in points:
        if p["method"] == "sft":
            errorbar(p, "black", "*", 14)
            note("SFT (reference)", p, "black", (-10, -18))

    grey = "0.35"
    kinds = {p["kind"] for p in points}
    handles.append(
        Line2D(
            [], [], color=grey, linewidth=5, alpha=0.35, label="Pareto front of the method (both maximised)"
        )
    )
    for kind, line, label in (
        ("soup", "-", "rewarded soup θ(w) = Σ w_m θ_m, joined in weight order"),
        ("liti", "none", "LITI sweep point (η labelled)"),
        ("trajectory", "none", "training checkpoint (step labelled)"),
        ("path", "none", "single checkpoint"),
    ):
        if kind in kinds:
            handles.append(Line2D([], [], color=grey, linestyle=line, marker=_MARKERS[kind], label=label))
    if "reference" in kinds:
        handles.append(
            Line2D([], [], color="black", linestyle="none", marker="*", markersize=10, label="SFT reference")
        )
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

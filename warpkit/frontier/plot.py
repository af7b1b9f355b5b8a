"""The reward-KL plot: one colour per method, its Pareto front as a solid line, training trajectories as
dashed arrows, LITI sweeps labelled with their eta, the SFT reference as a star. The reward-reward plot
(`plot_rewards`): the same conventions with a second reward on the y axis and rewarded soups drawn as
lines in weight order, labelled with their w. Matplotlib (Agg) only, imported when a plot is drawn.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["method_colours", "plot_frontier", "plot_rewards"]

_MARKERS = {"path": "o", "trajectory": "s", "liti": "^", "soup": "D", "reference": "*"}
_GREY = "0.35"

Row = Mapping[str, Any]
XY = Callable[[Row], tuple[float, float]]


def plot_frontier(
    points: Sequence[Row],
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
    plt, Line2D = _pyplot()
    labels = dict(method_labels or {})
    se_key = kl_key.replace("_mean", "_stderr")
    by_name = {p["name"]: p for p in points}
    methods = _methods(points)
    colours = method_colours(len(methods))
    fig, ax = plt.subplots(figsize=(10, 7.5), dpi=150)

    def xy(p: Row) -> tuple[float, float]:
        return p[kl_key], p["reward_mean"]

    handles = []
    for method, colour in zip(methods, colours, strict=True):
        rows = [p for p in points if p["method"] == method]
        for p in rows:
            _errorbar(ax, xy(p), p.get(se_key), p.get("reward_stderr"), _MARKERS.get(p["kind"], "o"), colour)
            _label_kl_point(ax, p, xy(p), colour)
        _draw_trajectories(ax, rows, xy, colour)
        front = [by_name[n] for n in (fronts or {}).get(method, [])]
        if front:
            _band(ax, *_densified([xy(p) for p in front]), colour)
        label = labels.get(method, method)
        if hypervolume and method in hypervolume:
            label += f"  (HV {hypervolume[method]:.3g})"
        handles.append(Line2D([], [], color=colour, linewidth=5, alpha=0.6, label=label))
    _draw_references(ax, points, xy, hypervolume_reference)
    handles += _frontier_legend(points)
    _decorate(ax, handles, xlabel, ylabel, title, subtitle)
    if xscale == "symlog":  # linear up to 1 nat, logarithmic beyond: small and large KLs both readable
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=-0.1)
    else:
        ax.set_xlim(left=min(-0.03 * ax.get_xlim()[1], ax.get_xlim()[0]))
    return _save(plt, fig, path)


def plot_rewards(
    points: Sequence[Row],
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
    plt, Line2D = _pyplot()
    labels = dict(method_labels or {})
    by_name = {p["name"]: p for p in points}
    methods = _methods(points)
    colours = method_colours(len(methods))
    fig, ax = plt.subplots(figsize=(10, 7.5), dpi=150)

    def xy(p: Row) -> tuple[float, float]:
        return p["x"][0], p["y"][0]

    handles = []
    for method, colour in zip(methods, colours, strict=True):
        rows = [p for p in points if p["method"] == method]
        for p in rows:
            _errorbar(ax, xy(p), p["x"][1], p["y"][1], _MARKERS.get(p["kind"], "o"), colour, zorder=4)
            _label_reward_point(ax, p, xy(p), colour)
        _draw_soups(ax, rows, xy, colour)
        front = [by_name[n] for n in (fronts or {}).get(method, [])]
        if front:
            _band(ax, [xy(p)[0] for p in front], [xy(p)[1] for p in front], colour)
        handles.append(Line2D([], [], color=colour, linewidth=5, alpha=0.6, label=labels.get(method, method)))
    for p in points:
        if p["method"] == "sft":
            _errorbar(ax, xy(p), p["x"][1], p["y"][1], "*", "black", size=14, zorder=4)
            _note(ax, "SFT (reference)", xy(p), "black", (-10, -18))
    handles += _rewards_legend(points)
    _decorate(ax, handles, xlabel, ylabel, title, subtitle)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- shared pieces


def method_colours(n: int) -> list[tuple[float, ...]]:
    """`n` RGBA colours, one per method: tab10's up to 10 methods, tab20's beyond (its dark half first, so
    the first ten stay close to tab10), cycling only past 20; a plot of 11 methods no longer repeats one."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [colormaps["tab20"](order[i % 20]) for i in range(n)]


def _pyplot() -> tuple[Any, Any]:
    """(pyplot, Line2D) with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    return plt, Line2D


def _methods(points: Sequence[Row]) -> list[str]:
    """The methods in order of first appearance, the SFT reference (drawn on its own) left out."""
    return [m for m in dict.fromkeys(p["method"] for p in points) if m != "sft"]


def _errorbar(
    ax: Any,
    xy: tuple[float, float],
    xerr: float | None,
    yerr: float | None,
    marker: str,
    colour: Any,
    *,
    size: float = 6,
    zorder: float | None = None,
) -> None:
    """A point with 1-s.e. error bars; a NaN or missing error draws no bar."""
    ax.errorbar(
        *xy,
        xerr=None if xerr is None or math.isnan(xerr) else xerr,
        yerr=None if yerr is None or math.isnan(yerr) else yerr,
        fmt=marker,
        color=colour,
        markersize=size,
        alpha=0.85,
        elinewidth=0.8,
        capsize=2,
        zorder=zorder,  # None: matplotlib's default
    )


def _note(ax: Any, text: str, xy: tuple[float, float], colour: Any, offset: tuple[int, int] = (5, 4)) -> None:
    """A small coloured label next to a point."""
    ax.annotate(text, xy, textcoords="offset points", xytext=offset, fontsize=7, color=colour)


def _weights_label(point: Row) -> str:
    """A soup point's label: ``w=(0.25, 0.75)``."""
    return "w=(" + ", ".join(f"{w:g}" for w in point["weights"]) + ")"


def _band(ax: Any, xs: Sequence[float], ys: Sequence[float], colour: Any) -> None:
    """A front as a wide translucent band under the points, so lines on it stay visible."""
    ax.plot(xs, ys, "-", color=colour, linewidth=5, alpha=0.35, solid_capstyle="round", zorder=1)


def _decorate(ax: Any, handles: list[Any], xlabel: str, ylabel: str, title: str, subtitle: str) -> None:
    """Legend below the axes (it never hides a point), axis labels, title and subtitle, grid."""
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(True, alpha=0.3)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the reward-KL plot


def _label_kl_point(ax: Any, p: Row, xy: tuple[float, float], colour: Any) -> None:
    """LITI points show their eta, single checkpoints their entry's name, soup points their w."""
    if p["kind"] == "liti":
        _note(ax, f"η={p['eta']:g}", xy, colour, (4, -10))
    elif p["kind"] == "path":
        _note(ax, p["spec"], xy, colour)
    elif p["kind"] == "soup":
        _note(ax, _weights_label(p), xy, colour, (4, -10))


def _draw_trajectories(ax: Any, rows: Sequence[Row], xy: XY, colour: Any) -> None:
    """Trajectories: dashed, in training order, arrow on the last segment, first and last steps labelled."""
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
            _note(ax, f"{spec} step {p['step']}", xy(p), colour)


def _densified(front: Sequence[tuple[float, float]], steps: int = 32) -> tuple[list[float], list[float]]:
    """The front's polyline with ``steps`` points per segment, so the band is the linear interpolation in
    data space on a symlog axis too."""
    fx, fy = [front[0][0]], [front[0][1]]
    for (x0, y0), (x1, y1) in itertools.pairwise(front):
        fx += [x0 + (x1 - x0) * t / steps for t in range(1, steps + 1)]
        fy += [y0 + (y1 - y0) * t / steps for t in range(1, steps + 1)]
    return fx, fy


def _draw_references(
    ax: Any, points: Sequence[Row], xy: XY, hypervolume_reference: tuple[float, float] | None
) -> None:
    """The SFT reference as a black star, and the hypervolume's reference point as a grey cross."""
    for p in points:
        if p["method"] == "sft":
            ax.plot(*xy(p), marker="*", color="black", markersize=14, linestyle="none", zorder=5)
            ax.annotate("SFT (reference)", xy(p), textcoords="offset points", xytext=(-10, -18), fontsize=8)
    if hypervolume_reference is not None:
        ax.plot(*hypervolume_reference, marker="x", color="grey", markersize=8, linestyle="none")
        _note(ax, "HV reference", hypervolume_reference, "grey", (-20, 6))


def _frontier_legend(points: Sequence[Row]) -> list[Any]:
    """The legend entries of the marker and line kinds (the soup entry only when there are soups)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_GREY, linewidth=5, alpha=0.35, label="Pareto front of the method (band)"),
        Line2D(
            [],
            [],
            color=_GREY,
            linestyle="--",
            marker="s",
            markersize=4,
            label="training trajectory (checkpoints, in order)",
        ),
        Line2D([], [], color=_GREY, linestyle="none", marker="^", label="LITI sweep point (η labelled)"),
        Line2D([], [], color=_GREY, linestyle="none", marker="o", label="single checkpoint"),
        Line2D(
            [], [], color="black", linestyle="none", marker="*", markersize=10, label="SFT reference (KL = 0)"
        ),
    ]
    if any(p["kind"] == "soup" for p in points):
        handles.insert(
            -2, Line2D([], [], color=_GREY, linestyle="none", marker="D", label="rewarded soup (w labelled)")
        )
    return handles


# ----------------------------------------------------------------------------- the reward-reward plot


def _label_reward_point(ax: Any, p: Row, xy: tuple[float, float], colour: Any) -> None:
    """LITI points show their eta, single checkpoints their name, trajectory points their step (soup
    points are labelled along their line, `_draw_soups`)."""
    if p["kind"] == "liti":
        _note(ax, f"η={p['eta']:g}", xy, colour, (4, -10))
    elif p["kind"] == "path":
        _note(ax, p["spec"], xy, colour)
    elif p["kind"] == "trajectory":
        _note(ax, f"{p['spec']} step {p['step']}", xy, colour)


def _draw_soups(ax: Any, rows: Sequence[Row], xy: XY, colour: Any) -> None:
    """Rewarded soups: the interpolation path in weight order; each point labelled with its w."""
    for spec in dict.fromkeys(p["spec"] for p in rows if p["kind"] == "soup"):
        soup = [p for p in rows if p["spec"] == spec]
        ax.plot([xy(p)[0] for p in soup], [xy(p)[1] for p in soup], "-", color=colour, lw=1.3, zorder=3)
        # Labels alternate above and below the line, so neighbours stay apart.
        for i, p in enumerate(soup):
            _note(ax, _weights_label(p), xy(p), colour, (5, 5 - 16 * (i % 2)))


def _rewards_legend(points: Sequence[Row]) -> list[Any]:
    """The legend entries of the kinds present."""
    from matplotlib.lines import Line2D

    kinds = {p["kind"] for p in points}
    handles = [
        Line2D(
            [], [], color=_GREY, linewidth=5, alpha=0.35, label="Pareto front of the method (both maximised)"
        )
    ]
    for kind, line, label in (
        ("soup", "-", "rewarded soup θ(w) = Σ w_m θ_m, joined in weight order"),
        ("liti", "none", "LITI sweep point (η labelled)"),
        ("trajectory", "none", "training checkpoint (step labelled)"),
        ("path", "none", "single checkpoint"),
    ):
        if kind in kinds:
            handles.append(Line2D([], [], color=_GREY, linestyle=line, marker=_MARKERS[kind], label=label))
    if "reference" in kinds:
        handles.append(
            Line2D([], [], color="black", linestyle="none", marker="*", markersize=10, label="SFT reference")
        )
    return handles

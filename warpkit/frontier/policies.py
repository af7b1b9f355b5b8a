"""The policies a frontier evaluates: one dataclass per kind of entry, each checking its own fields.

A policy entry (`PolicySpec`) is one of four kinds, and expands into the points of the frontier:

- ``path``: one checkpoint folder (one point, named after the entry);
- ``trajectory``: an ordered list of checkpoint folders, or a glob such as ``run/checkpoint-*`` sorted by
  its step number (one point per checkpoint, ``name/step=N``, drawn as a training trajectory);
- ``liti``: a LITI sweep ``theta_eta = (1 - eta) * init + eta * merged`` over ``etas`` (`LitiSweep`; one
  point per eta, ``name/eta=E``, interpolated in memory from tensors loaded once);
- ``soup``: a rewarded soup (Ramé et al. 2023) ``theta(w) = sum_m w_m theta_m`` of M policies fine-tuned
  from one init on different rewards (`SoupSweep`; one point per weight vector, ``name/w=W1,W2``).

Nothing here loads a model: `PolicySpec.points` and `PolicySpec.folders` only name what will be loaded.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warpkit.merge.math import check_eta

__all__ = [
    "LitiSweep",
    "Point",
    "PolicySpec",
    "SoupSweep",
    "expand_path",
    "expand_trajectory",
    "reference_point",
]


@dataclass
class LitiSweep:
    """A LITI sweep (WARP stage 3) between an iteration's init and its merged policy.

    Args:
        init: checkpoint folder of the init (θ_init; the SFT model in iteration 1).
        merged: checkpoint folder of the merged policy (θ_slerp).
        etas: the η values; the paper traces the front with {0, 0.1, 0.3, 0.5, 0.8, 1}.
        allow_extrapolation: permit η > 1 (ExPO-style extrapolation past the merge).
    """

    init: str
    merged: str
    etas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    allow_extrapolation: bool = False

    def check(self, policy: str) -> None:
        """Refuse an empty sweep, or an η outside [0, 1] (above 1 only with ``allow_extrapolation``)."""
        if not self.etas:
            raise ValueError(f"policy {policy!r}: liti.etas is empty; give at least one eta.")
        try:
            check_eta(
                self.etas,
                self.allow_extrapolation,
                name="liti.etas",
                fix="set liti.allow_extrapolation: true",
            )
        except ValueError as e:
            raise ValueError(f"policy {policy!r}: {e}") from e


@dataclass
class SoupSweep:
    """A rewarded-soups sweep (Ramé et al. 2023, arXiv 2306.04488) over M policies of one init.

    Each point is ``theta(w) = sum_m w_m theta_m`` with ``w`` on the simplex (``w_m >= 0``, ``sum w = 1``),
    interpolated in memory; evaluating every point on every reward traces the front across rewards.

    Args:
        models: the M >= 2 checkpoint folders θ_1..θ_M (same architecture and shapes), each fine-tuned from
            the same init on its own reward R_m.
        weights: the weight vectors, each of length M; None (M = 2 only) sweeps ``w = (1 - t, t)`` over
            ``num_points`` evenly spaced t in [0, 1].
        num_points: number of t values when ``weights`` is None (>= 2, default 5); not with ``weights``.
    """

    models: list[str]
    weights: list[list[float]] | None = None
    num_points: int | None = None

    def vectors(self) -> list[list[float]]:
        """The weight vectors w in sweep order: ``weights``, or ``[1 - t, t]`` for t = 0, 1/(n-1), ..., 1."""
        if self.weights is not None:
            return [list(w) for w in self.weights]
        n = 5 if self.num_points is None else self.num_points
        return [[1.0 - i / (n - 1), i / (n - 1)] for i in range(n)]

    def check(self, policy: str) -> None:
        """Refuse a soup that is not a convex combination of at least two models, naming the bad vector."""
        m = len(self.models)
        if m < 2:
            raise ValueError(
                f"policy {policy!r}: a soup needs at least 2 models, got {m} ({self.models}). A single "
                "checkpoint is a `path` entry."
            )
        if self.weights is None:
            self._check_default_sweep(policy)
            return
        if not self.weights:
            raise ValueError(f"policy {policy!r}: soup.weights is empty; give at least one weight vector.")
        if self.num_points is not None:
            raise ValueError(
                f"policy {policy!r}: soup.num_points={self.num_points} and soup.weights both given; "
                "num_points only spaces the default 2-model sweep w = (1 - t, t). Drop one of them."
            )
        for w in self.weights:
            why = _off_simplex(w, m)
            if why:
                raise ValueError(
                    f"policy {policy!r}: soup weight vector {w} {why}. Each vector needs {m} entries >= 0 that "
                    f"sum to 1 (a point on the simplex: rewarded soups interpolate between the models, they "
                    f"do not extrapolate), e.g. {[0.5, 0.5] + [0.0] * (m - 2)}."
                )

    def _check_default_sweep(self, policy: str) -> None:
        m = len(self.models)
        if m > 2:
            identity = [[1.0 if i == j else 0.0 for i in range(m)] for j in range(m)]
            raise ValueError(
                f"policy {policy!r}: a soup of {m} models needs explicit soup.weights (a list of weight "
                f"vectors of length {m}, e.g. {identity} plus the mixtures you want); only a 2-model soup "
                "sweeps w = (1 - t, t) by default."
            )
        if self.num_points is not None and self.num_points < 2:
            raise ValueError(
                f"policy {policy!r}: soup.num_points must be >= 2 (the sweep includes both ends t = 0 and "
                f"t = 1), got {self.num_points}."
            )


def _off_simplex(w: list[float], m: int) -> str | None:
    """Why ``w`` is not a point of the M-simplex (phrased to follow "weight vector w ..."), or None."""
    if len(w) != m:
        return f"has {len(w)} entries for {m} models"
    if not all(math.isfinite(x) for x in w):
        return "has a non-finite entry"
    if any(x < 0 for x in w):
        return "has a negative entry"
    if abs(sum(w) - 1.0) > 1e-6:
        return f"sums to {sum(w):.6g}"
    return None


@dataclass
class Point:
    """One point of the frontier before it is evaluated: its row's identity columns in frontier.json.

    ``kind`` is ``reference``, ``path``, ``trajectory``, ``liti`` or ``soup``; ``spec`` the name of its
    policy entry; ``step`` (trajectory), ``eta`` (LITI) and ``weights`` (soup) locate it in its entry.
    """

    name: str
    method: str
    kind: str
    spec: str
    step: int | None = None
    eta: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None


def reference_point() -> Point:
    """The SFT reference itself (name and method ``sft``): KL = 0, and a member of every method's front."""
    return Point("sft", "sft", "reference", "sft")


@dataclass
class PolicySpec:
    """Policies of one method: exactly one of ``path``, ``trajectory``, ``liti`` or ``soup``.

    Args:
        name: unique name; points are named ``name``, ``name/step=N``, ``name/eta=E`` or ``name/w=W1,W2``.
        method: the group drawn with one colour and one Pareto front (e.g. ``sft_anchor``, ``ema_anchor``,
            ``warp_iter1``, ``warp_m1``).
        path: one checkpoint folder.
        trajectory: checkpoint folders in training order, or one glob sorted by the number in each name.
        liti: a LITI sweep.
        soup: a rewarded-soups sweep.
        params: free-form hyperparameters recorded with each point (e.g. ``{beta: 0.1}``).
    """

    name: str
    method: str
    path: str | None = None
    trajectory: list[str] | str | None = None
    liti: LitiSweep | None = None
    soup: SoupSweep | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Exactly one kind of entry, and that entry's own checks."""
        kinds = [k for k in ("path", "trajectory", "liti", "soup") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"policy {self.name!r} must set exactly one of path, trajectory, liti, soup; "
                f"it sets {kinds or 'none'}."
            )
        if self.soup is not None:
            self.soup.check(self.name)
        if self.liti is not None:
            self.liti.check(self.name)

    def points(self) -> list[tuple[Point, str | None]]:
        """(point, folder) pairs in sweep order; LITI and soup points have no folder (built in memory)."""
        base = {"method": self.method, "spec": self.name, "params": self.params}
        if self.path is not None:
            return [(Point(self.name, kind="path", **base), self.path)]
        if self.trajectory is not None:
            return [
                (Point(f"{self.name}/step={step}", kind="trajectory", step=step, **base), path)
                for step, path in expand_trajectory(self.trajectory)
            ]
        if self.soup is not None:
            return [
                (
                    Point(f"{self.name}/w={','.join(f'{x:g}' for x in w)}", kind="soup", weights=w, **base),
                    None,
                )
                for w in self.soup.vectors()
            ]
        assert self.liti is not None, "check() guarantees one kind"
        return [(Point(f"{self.name}/eta={e:g}", kind="liti", eta=e, **base), None) for e in self.liti.etas]

    def folders(self) -> list[tuple[str, str]]:
        """(folder, how errors name it) for every checkpoint folder this entry loads."""
        if self.soup is not None:
            return [(m, f"policy {self.name!r} (soup.models[{i}])") for i, m in enumerate(self.soup.models)]
        if self.liti is not None:
            return [
                (self.liti.init, f"policy {self.name!r} (liti.init)"),
                (self.liti.merged, f"policy {self.name!r} (liti.merged)"),
            ]
        return [(path, f"policy {self.name!r}") for _, path in self.points() if path is not None]

    def expand_paths(self) -> None:
        """Expand ``$VARS`` and ``~`` in every folder of the entry (a trajectory glob is expanded when used)."""
        if self.path is not None:
            self.path = expand_path(self.path)
        if isinstance(self.trajectory, list):
            self.trajectory = [expand_path(t) for t in self.trajectory]
        if self.liti is not None:
            self.liti.init, self.liti.merged = expand_path(self.liti.init), expand_path(self.liti.merged)
        if self.soup is not None:
            self.soup.models = [expand_path(m) for m in self.soup.models]


def expand_path(path: str) -> str:
    """``$VARS`` and ``~`` expanded; otherwise the path as written (relative to the current directory)."""
    return os.path.expanduser(os.path.expandvars(path))


def expand_trajectory(trajectory: list[str] | str) -> list[tuple[int, str]]:
    """``(step, folder)`` pairs in training order.

    A list keeps its order, steps read from a trailing number in each folder name (``checkpoint-300``)
    or, failing that, the position. A string is a glob, sorted by that number.
    """

    def step_of(path: str, default: int) -> int:
        m = re.search(r"(\d+)\D*$", Path(path).name)
        return int(m.group(1)) if m else default

    if isinstance(trajectory, str):
        paths = glob.glob(expand_path(trajectory))
        if not paths:
            raise ValueError(f"trajectory glob {trajectory!r} matches no folder (check the path and $VARS).")
        paths.sort(key=lambda p: (step_of(p, 0), p))
    else:
        paths = [expand_path(p) for p in trajectory]
        if not paths:
            raise ValueError("a trajectory needs at least one checkpoint folder.")
    return [(step_of(p, i), p) for i, p in enumerate(paths)]

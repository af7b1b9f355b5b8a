"""The models a Fuse-to-Forget run scores: the reference, each named model, and the fusion points.

- an interpolation path θ(α) = (1 - α) θ_a + α θ_b loads its two ends once and forms every α in place in
  one working model, tensor by tensor (`warpkit.merge.math.combine`, written over the weights so α = 0
  and α = 1 are the ends bit for bit): three copies of the weights at most, whatever the grid;
- a merge runs the registry's own code (`merge_folders`, or a soup's runner) into a temporary folder, which
  is loaded once and removed with the run. Merges run first, before any scoring, so a merge that cannot
  be made fails the run in seconds.

`point_models` yields (point, model); a path's working model is overwritten at the next point, so each
model is used before the next is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from warpkit._util.imports import import_object
from warpkit.forget.config import REFERENCE, ForgetConfig, FusionSpec
from warpkit.forget.inputs import ForgetInputs, load_model
from warpkit.merge.folders import merge_folders
from warpkit.merge.math import combine
from warpkit.merge.methods import get_method

__all__ = ["Point", "build_merges", "point_models"]


@dataclass
class Point:
    """One scored model: ``kind`` is ``reference``, ``model``, ``path`` or ``merge``; ``fusion`` names its
    fusion entry, ``alpha`` its place on a path, ``models`` the named models it combines (itself for a
    model), ``method`` a merge's registry method."""

    name: str
    kind: str
    models: list[str] = field(default_factory=list)
    fusion: str | None = None
    alpha: float | None = None
    method: str | None = None

    @property
    def fused(self) -> bool:
        """A fusion point strictly between its models (a path's ends are the models themselves)."""
        return self.kind == "merge" or (self.kind == "path" and self.alpha is not None and 0 < self.alpha < 1)


def build_merges(config: ForgetConfig, inputs: ForgetInputs, work: str | Path) -> dict[str, str]:
    """Make every merge of the config in ``work``; {fusion name: merged folder}."""
    out = {}
    for spec in config.fusions:
        if spec.merge is None:
            continue
        m = spec.merge
        method = get_method(m.method)
        folder = str(Path(work) / f"merge-{len(out)}")
        models = [inputs.folders[n] for n in m.models]
        try:
            if method.runner is not None:
                _run_whole_model(method, models, folder, m.weights, dict(m.params), m.allow_extrapolation)
            else:
                init = inputs.folders[m.init or REFERENCE]
                merge_folders(
                    method.name, init, models, folder, m.weights, granularity=m.granularity,  # type: ignore[arg-type]
                    allow_extrapolation=m.allow_extrapolation, progress=False, hash_inputs=False, **m.params,
                )  # fmt: skip
        except (ValueError, TypeError) as e:
            raise ValueError(f"fusion {spec.name!r}: the {m.method} merge failed: {e}") from e
        out[spec.name] = folder
    return out


def _run_whole_model(
    method: Any, models: list[str], out: str, weights, params: dict, extrapolate: bool
) -> None:
    """A method without an init (soups): its registry runner, with a scorer built from ``scorer`` or
    ``score_config`` where the method takes one."""
    if params.get("scorer"):
        params["score"] = import_object(params["scorer"], "scorer", callable_=True)
    elif params.get("score_config"):
        from warpkit.frontier.scorer import frontier_scorer

        params["score"] = frontier_scorer(params["score_config"], kl_coef=params.get("kl_coef") or 0.0)
    runner = import_object(method.runner, "merge runner", callable_=True)
    extra = {"allow_extrapolation": True} if extrapolate else {}
    runner(models, out, weights, params, progress=False, hash_inputs=False, **extra)


def point_models(
    config: ForgetConfig, inputs: ForgetInputs, merged: dict[str, str]
) -> Iterator[tuple[Point, torch.nn.Module]]:
    """(point, model) for the reference, every named model, then every fusion point in config order."""
    load = lambda path: load_model(path, config.dtype, inputs.device)  # noqa: E731
    reference = load(inputs.folders[REFERENCE])
    yield Point(REFERENCE, "reference"), reference
    del reference
    for name, path in config.models.items():
        model = load(path)
        yield Point(name, "model", [name]), model
        del model
    for spec in config.fusions:
        if spec.path is not None:
            yield from _path_models(spec, inputs, load)
        else:
            assert spec.merge is not None
            model = load(merged[spec.name])
            yield Point(spec.name, "merge", spec.models(), spec.name, method=spec.merge.method), model
            del model


def _path_models(spec: FusionSpec, inputs: ForgetInputs, load) -> Iterator[tuple[Point, torch.nn.Module]]:
    """θ(α) for each α of the path, formed in place in a working model from the two ends loaded once."""
    assert spec.path is not None
    a, b = spec.path.models
    working = load(inputs.folders[a])
    end_a = {k: v.detach().clone() for k, v in working.state_dict().items()}
    other = load(inputs.folders[b])
    end_b = {k: v.detach() for k, v in other.state_dict().items()}
    del other
    targets = working.state_dict()
    for alpha in spec.path.alphas:
        with torch.no_grad():
            for name, t in targets.items():
                if not t.is_floating_point():
                    continue
                mixed = combine(end_a[name].float(), [end_b[name].float()], [alpha])
                t.copy_(mixed.to(t.dtype))
        point = Point(f"{spec.name}/alpha={alpha:g}", "path", [a, b], spec.name, alpha=alpha)
        yield point, working
    del working, end_a, end_b, targets

"""The settings of a Fuse-to-Forget analysis: `ForgetConfig`, read from YAML with unknown fields refused.

A config names the reference the likelihood ratios are taken against (usually the init), the models by
name, the probe sets (each marked with the models that saw it in training), the fusion points (an
interpolation path between two models over an alpha grid, or a merge by any method of the registry), and
the Fisher overlaps to compute. Every field is checked when the config is built (names, alphas, methods
and their settings), before anything is loaded; the folders and texts are checked by `inputs`.

Model references inside the config (``seen_by``, a path's or merge's ``models``, a merge's ``init``, a
Fisher pair) are names of ``models``, or ``reference``. Paths expand ``$VARS`` and ``~``; the reference and
models may also be ``warpkit:default`` or ``warpkit:tiny``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warpkit._util.config import load_dataclass
from warpkit._util.imports import is_object_spec
from warpkit.merge.methods import get_method

__all__ = [
    "DTYPES",
    "REFERENCE",
    "FisherSpec",
    "ForgetConfig",
    "FusionSpec",
    "MergeSpec",
    "PathSpec",
    "ProbeSet",
    "load_forget_config",
]

DTYPES = ("float32", "float64", "bfloat16", "float16")
REFERENCE = "reference"  # the name of the reference model wherever models are named


@dataclass
class ProbeSet:
    """A named set of texts, and which models saw it in training.

    Args:
        name: unique name (a column value of forget.csv and a plot label).
        texts: ``module:function`` (called with ``kwargs``, or with ``split``), a data file (``.jsonl``,
            ``.json``, ``.csv``, ``.parquet``), a ``.txt`` file (one text per line), a ``save_to_disk``
            folder, or an inline list of strings (or of mappings with the columns below).
        column: the column holding each text (with ``target_column``: each prompt). Plain strings need none.
        target_column: the column of targets: each row is then a (prompt, target) pair, scored by the
            log-likelihood of the target given the prompt and by exact match of greedy decoding.
        split: the split of a dataset folder or ``DatasetDict``, or the argument of a function without kwargs.
        kwargs: keyword arguments for a ``module:function``.
        rows: ``[start, stop]``: keep rows start..stop-1 (e.g. one shard of a shared source).
        seen_by: the models (names of ``models``) trained on these texts: two or more = shared knowledge,
            one = that model's alone, none = held out.
    """

    name: str
    texts: str | list[Any]
    column: str = "text"
    target_column: str | None = None
    split: str = "train"
    kwargs: dict[str, Any] | None = None
    rows: list[int] | None = None
    seen_by: list[str] = field(default_factory=list)


@dataclass
class PathSpec:
    """The interpolation path θ(α) = (1 - α) θ_a + α θ_b between two models, formed in memory per α.

    Args:
        models: ``[a, b]``: α = 0 is model a, α = 1 model b.
        alphas: the α grid (the paper's Figure 2 uses 0, 0.1, ..., 1).
        allow_extrapolation: permit α outside [0, 1] (beyond either model).
    """

    models: list[str]
    alphas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    allow_extrapolation: bool = False


@dataclass
class MergeSpec:
    """A merge of named models by a method of the registry (`warpkit merge --method`), streamed to a
    temporary folder, scored, and removed.

    Args:
        method: a registry name (``warpkit merge --help`` lists them).
        models: the models merged (names).
        init: their common init for methods that need one (a name; default ``reference``).
        weights: one per model; default uniform.
        params: the method's own settings (``density``, ``scale``, ``scorer``...), as in a merge recipe.
        granularity: ``block``, ``tensor`` or ``model`` (SLERP's angle groups).
        allow_extrapolation: permit negative weights / lambdas outside [0, 1].
    """

    method: str
    models: list[str]
    init: str | None = None
    weights: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    granularity: str = "block"
    allow_extrapolation: bool = False


@dataclass
class FusionSpec:
    """A fused model or family of them: exactly one of ``path`` or ``merge``."""

    name: str
    path: PathSpec | None = None
    merge: MergeSpec | None = None

    def models(self) -> list[str]:
        """The names of the models this fusion combines."""
        return list(self.path.models if self.path is not None else self.merge.models)  # type: ignore[union-attr]


@dataclass
class FisherSpec:
    """The Fisher overlaps of two models.

    Args:
        models: ``[a, b]``, names of ``models`` (or ``reference``).
        probe_sets: what to compare them on, each entry a probe set name (both Fishers on that set: the
            paper's overlap on shared knowledge) or a pair ``[p, q]`` (model a's Fisher on p against model
            b's on q: each model on its own data, the paper's overlap on unshared knowledge); default every
            probe set by name.
        max_texts: use the first N texts of each probe set (one backward pass per text and model).
    """

    models: list[str]
    probe_sets: list[str | list[str]] | None = None
    max_texts: int | None = 64

    def comparisons(self, probes: list[str]) -> list[tuple[str, str]]:
        """(probe set of model a, probe set of model b) for each overlap."""
        entries = self.probe_sets if self.probe_sets is not None else probes
        return [(e, e) if isinstance(e, str) else (e[0], e[1]) for e in entries]


@dataclass
class ForgetConfig:
    """Everything one `warpkit forget` run needs.

    Args:
        reference: the model the likelihood ratios are taken against (ALR = 1): usually the init the
            models were fine-tuned from; a folder, ``warpkit:default`` or ``warpkit:tiny``.
        models: the individual models, ``{name: folder}``.
        probe_sets: the texts to score, each marked with the models that saw it (`ProbeSet`).
        fusions: fusion points: interpolation paths and merges (`FusionSpec`).
        fisher: Fisher overlaps to compute (`FisherSpec`).
        batch_size: texts per forward pass.
        max_tokens: cut each text to its first N tokens (None: refuse a text longer than the context).
        kept_threshold: a fused model "keeps" a probe set when its log-likelihood gain over the reference is
            at least this fraction of the gain of the models that saw it (else "forgotten").
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
        dtype: model weights dtype; log-softmax, ratios and Fishers are float32 or better.
        output_dir: where forget.json, forget.csv and the PNGs go.
        title: plot title.
    """

    reference: str
    models: dict[str, str]
    probe_sets: list[ProbeSet]
    fusions: list[FusionSpec] = field(default_factory=list)
    fisher: list[FisherSpec] = field(default_factory=list)
    batch_size: int = 8
    max_tokens: int | None = None
    kept_threshold: float = 0.5
    device: str = "auto"
    dtype: str = "float32"
    output_dir: str = "forget_out"
    title: str | None = None

    def __post_init__(self) -> None:
        self._check_settings()
        self._check_models()
        self._check_probe_sets()
        names = set(self.models) | {REFERENCE}
        fusions = [f.name for f in self.fusions]
        _unique(fusions, "fusion")
        for f in self.fusions:
            _check_fusion(f, names)
        probes = [p.name for p in self.probe_sets]
        for i, spec in enumerate(self.fisher):
            _check_fisher(spec, f"fisher[{i}]", names, probes)

    def _check_settings(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(
                f"max_tokens must be >= 2 (one token to predict from one) or null, got {self.max_tokens}."
            )
        if not 0 < self.kept_threshold < 1:
            raise ValueError(f"kept_threshold must be in (0, 1), got {self.kept_threshold}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")

    def _check_models(self) -> None:
        if not self.models:
            raise ValueError("models is empty: name at least one model, e.g. models: {a: runs/a}.")
        for name, path in self.models.items():
            if not isinstance(name, str) or not name or "/" in name or name == REFERENCE:
                raise ValueError(
                    f"model name {name!r} is not usable: names are non-empty, without '/' (it separates a "
                    f"path's alpha in point names), and not {REFERENCE!r} (the reference's own name)."
                )
            if not isinstance(path, str) or not path:
                raise TypeError(f"models[{name!r}] must be a model folder, got {path!r}.")

    def _check_probe_sets(self) -> None:
        if not self.probe_sets:
            raise ValueError("probe_sets is empty: give at least one set of texts to score.")
        _unique([p.name for p in self.probe_sets], "probe set")
        for p in self.probe_sets:
            unknown = [m for m in p.seen_by if m not in self.models]
            if unknown:
                raise ValueError(
                    f"probe set {p.name!r} is marked seen_by {unknown}, which are not models of this config "
                    f"(models: {sorted(self.models)}). Fix the name, or add the model under models."
                )
            _unique(p.seen_by, f"probe set {p.name!r}: seen_by entry")
            if isinstance(p.texts, list) and not p.texts:
                raise ValueError(f"probe set {p.name!r} has no texts (texts: []); give at least one.")
            if p.rows is not None and (len(p.rows) != 2 or not 0 <= p.rows[0] < p.rows[1]):
                raise ValueError(
                    f"probe set {p.name!r}: rows must be [start, stop] with 0 <= start < stop, got {p.rows}."
                )

    def fusion_points_count(self) -> int:
        """Paths count one point per alpha, merges one each."""
        return sum(len(f.path.alphas) if f.path is not None else 1 for f in self.fusions)


def _unique(names: list[str], what: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique; repeated: {dup}.")


def _known(names: list[str], known: set[str], where: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"{where} names {unknown}, which are not models of this config; use names of models "
            f"{sorted(known - {REFERENCE})} or {REFERENCE!r}."
        )


def _check_fusion(f: FusionSpec, names: set[str]) -> None:
    if f.name in names or "/" in f.name or not f.name:
        raise ValueError(
            f"fusion name {f.name!r} must be non-empty, without '/', and differ from the model names and "
            f"{REFERENCE!r} (rows are named after it)."
        )
    if (f.path is None) == (f.merge is None):
        raise ValueError(f"fusion {f.name!r} must set exactly one of path or merge.")
    if f.path is not None:
        p = f.path
        if len(p.models) != 2 or p.models[0] == p.models[1]:
            raise ValueError(
                f"fusion {f.name!r}: path.models must be two different models [a, b], got {p.models}."
            )
        _known(p.models, names, f"fusion {f.name!r}: path.models")
        _check_alphas(p, f.name)
        return
    m = f.merge
    assert m is not None
    _known(m.models + ([m.init] if m.init else []), names, f"fusion {f.name!r}: merge")
    try:
        method = get_method(m.method)
        resolved = method.resolve(m.params)
        method.check_inputs(len(m.models), m.weights, resolved, allow_extrapolation=m.allow_extrapolation)
    except ValueError as e:
        raise ValueError(f"fusion {f.name!r}: merge: {e}") from None
    if method.init == "none" and m.init is not None:
        raise ValueError(
            f"fusion {f.name!r}: merge method {m.method} averages the models themselves and takes no init "
            f"(got init: {m.init}); drop init."
        )


def _check_alphas(p: PathSpec, fusion: str) -> None:
    if not p.alphas:
        raise ValueError(
            f"fusion {fusion!r}: path.alphas is empty; give at least one alpha, e.g. [0, 0.5, 1]."
        )
    if not all(math.isfinite(a) for a in p.alphas):
        raise ValueError(f"fusion {fusion!r}: path.alphas must be finite, got {p.alphas}.")
    outside = [a for a in p.alphas if not 0 <= a <= 1]
    if outside and not p.allow_extrapolation:
        raise ValueError(
            f"fusion {fusion!r}: path.alphas {outside} are outside [0, 1]: θ(α) = (1 - α) θ_a + α θ_b then "
            "extrapolates beyond the two models instead of fusing them. Use alphas in [0, 1], or set "
            "path.allow_extrapolation: true if that is intended."
        )


def _check_fisher(spec: FisherSpec, where: str, names: set[str], probes: list[str]) -> None:
    if len(spec.models) != 2 or spec.models[0] == spec.models[1]:
        raise ValueError(f"{where}.models must be two different models [a, b], got {spec.models}.")
    _known(spec.models, names, f"{where}.models")
    bad = [e for e in spec.probe_sets or [] if not isinstance(e, str) and len(e) != 2]
    if bad:
        raise ValueError(f"{where}.probe_sets entries are names or pairs [p, q] of names, got {bad}.")
    unknown = list(dict.fromkeys(p for pair in spec.comparisons(probes) for p in pair if p not in probes))
    if unknown:
        raise ValueError(f"{where}.probe_sets names {unknown}, not probe sets of this config ({probes}).")
    if spec.max_texts is not None and spec.max_texts < 1:
        raise ValueError(f"{where}.max_texts must be >= 1 or null, got {spec.max_texts}.")


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def load_forget_config(path: str | Path, **overrides: Any) -> ForgetConfig:
    """Read a YAML file into a `ForgetConfig`; ``overrides`` (e.g. ``output_dir``) replace its fields
    (None values are ignored). Folder fields and file-valued probe texts expand ``$VARS`` and ``~``."""
    config = load_dataclass(ForgetConfig, path, what="forget config", **overrides)
    config.reference = _expand(config.reference)
    config.models = {name: _expand(p) for name, p in config.models.items()}
    config.output_dir = _expand(config.output_dir)
    for p in config.probe_sets:
        if isinstance(p.texts, str) and not is_object_spec(p.texts):
            p.texts = _expand(p.texts)
    return config

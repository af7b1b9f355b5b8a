"""`warpkit forget`: score every model and fusion point on every probe set (`run_forget`).

Order of work: every input is checked first (`inputs.prepare_inputs`: folders, safetensors, architecture,
tokenizer, probe texts against the context), then the merges are made (`points.build_merges`, into a
temporary folder), then each point is loaded or formed in place and scored on every probe set
(`score.score_texts`); the Fishers the config asks for are taken while their model is loaded, written to
the temporary folder, and compared tensor by tensor at the end (`score.stream_fisher_overlap`). Nothing is
written to ``output_dir`` here (`output.write_forget` does).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from warpkit.forget.config import REFERENCE, ForgetConfig
from warpkit.forget.inputs import ForgetInputs, prepare_inputs
from warpkit.forget.points import Point, build_merges, point_models
from warpkit.forget.score import diagonal_fisher, score_texts, stream_fisher_overlap
from warpkit.forget.summary import point_row, summarise

__all__ = ["ForgetResult", "run_forget"]


@dataclass
class ForgetResult:
    """Everything forget.json holds: ``rows`` (one per point and probe set, `summary.COLUMNS`),
    ``summary`` (kept / forgotten per fusion point and probe set), ``fisher`` (overlaps), ``probe_sets``
    (name, seen_by, sizes), ``per_text`` (ℓ_θ(x) and exact matches by point and probe set), ``settings``."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    fisher: list[dict[str, Any]]
    probe_sets: list[dict[str, Any]]
    per_text: dict[str, dict[str, dict[str, Any]]]
    settings: dict[str, Any]


FisherKey = tuple[str, str, int]  # (model name, probe set, number of texts)


def _fisher_keys(config: ForgetConfig, inputs: ForgetInputs) -> list[tuple[FisherKey, FisherKey]]:
    """For each requested overlap, the two Fishers it compares."""
    pairs = []
    for spec in config.fisher:
        a, b = spec.models
        for pa, pb in spec.comparisons([p.name for p in config.probe_sets]):
            n = min(len(inputs.probes[pa]), len(inputs.probes[pb]), spec.max_texts or len(inputs.probes[pa]))
            pairs.append(((a, pa, n), (b, pb, n)))
    return pairs


def _take_fishers(
    point: Point, model: torch.nn.Module, keys: set[FisherKey], inputs: ForgetInputs, work: Path,
    files: dict[FisherKey, Path], progress: Callable[[int], None],
) -> None:  # fmt: skip
    """Write the Fishers of this named model (reference or model) that the overlaps need."""
    for key in sorted(k for k in keys if k[0] == point.name and k not in files):
        _, probe, n = key
        texts = inputs.probes[probe][:n]
        files[key] = diagonal_fisher(
            model, texts, work / f"fisher-{len(files)}.safetensors", pad_token_id=inputs.pad_token_id,
            progress=progress,
        )  # fmt: skip


def run_forget(config: ForgetConfig, *, progress: bool = True) -> ForgetResult:
    """Score the reference, every model and every fusion point of ``config`` on every probe set.

    Model names in ``config`` (``warpkit:default``...) are replaced by their folders, in place.
    """
    t0 = time.perf_counter()
    inputs = prepare_inputs(config)
    pairs = _fisher_keys(config, inputs)
    keys = {k for pair in pairs for k in pair}
    num_points = 1 + len(config.models) + config.fusion_points_count()
    total = num_points * sum(len(t) for t in inputs.probes.values()) + sum(k[2] for k in keys)
    per_text: dict[str, dict[str, dict[str, Any]]] = {}
    points: list[Point] = []
    fisher = []
    with tempfile.TemporaryDirectory(prefix="warpkit-forget-") as tmp:
        work = Path(tmp)
        merged = build_merges(config, inputs, work)
        files: dict[FisherKey, Path] = {}
        with tqdm(total=total, desc="forget", unit="text", disable=not progress) as bar:
            for point, model in point_models(config, inputs, merged):
                bar.set_postfix_str(point.name)
                points.append(point)
                per_text[point.name] = {}
                for name, texts in inputs.probes.items():
                    ll, match = score_texts(
                        model, texts, pad_token_id=inputs.pad_token_id, batch_size=config.batch_size,
                        progress=bar.update,
                    )  # fmt: skip
                    per_text[point.name][name] = {"ll": ll, "match": match}
                if point.kind in (REFERENCE, "model"):
                    _take_fishers(point, model, keys, inputs, work, files, bar.update)
        for a, b in pairs:
            overlap, numel = stream_fisher_overlap(files[a], files[b])
            fisher.append({"models": [a[0], b[0]], "probe_sets": [a[1], b[1]], "num_texts": a[2],
                           "num_params": numel, "overlap": overlap})  # fmt: skip
    return _result(config, inputs, points, per_text, fisher, time.perf_counter() - t0)


def _result(
    config: ForgetConfig,
    inputs: ForgetInputs,
    points: list[Point],
    per_text: dict,
    fisher: list,
    seconds: float,
) -> ForgetResult:
    tokens = {n: sum(len(e.ids) - e.start for e in texts) for n, texts in inputs.probes.items()}
    rows = [
        point_row(p, probe, per_text[p.name][probe.name]["ll"], per_text[p.name][probe.name]["match"],
                  per_text[REFERENCE][probe.name]["ll"], tokens[probe.name])
        for p in points
        for probe in config.probe_sets
    ]  # fmt: skip
    summary = summarise(points, config.probe_sets, per_text, config.kept_threshold)
    seen_by = {p.name: p.seen_by for p in config.probe_sets}
    for f in fisher:
        f["seen_by"] = [seen_by[p] for p in f["probe_sets"]]
    probe_sets = [
        {"name": p.name, "seen_by": p.seen_by, "num_texts": len(inputs.probes[p.name]),
         "num_tokens": tokens[p.name], "pairs": p.target_column is not None}
        for p in config.probe_sets
    ]  # fmt: skip
    settings = dataclasses.asdict(config) | {
        "device": str(inputs.device), "seconds": round(seconds, 2), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    return ForgetResult(rows, summary, fisher, probe_sets, per_text, settings)

"""From per-text numbers to the rows of forget.json: one row per (point, probe set), and the verdict of each
fusion point on each probe set: kept (the fused model still finds the texts as likely as the models that
saw them) or forgotten (back towards the reference).

The verdict reads the log-likelihood gain over the reference, G = mean_x [ℓ_θ(x) - ℓ_ref(x)] (nats per
token, `warpkit.forget.metrics`): kept_fraction = G_fused / G_seen, where G_seen averages, text by text,
the models of the fusion that saw the set. At or above ``kept_threshold`` the set is "kept", below it
"forgotten"; "not learned" when the models that saw it gained nothing significant (G_seen <= 2 s.e.), and
"unseen" when none of the fused models saw it. ALR is reported beside it with the paired difference
fused - seen (its error over the same texts), the paper's Table 2 in one row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from warpkit.forget.config import REFERENCE, ProbeSet
from warpkit.forget.metrics import likelihood_ratios, mean_stderr, paired_difference, perplexity
from warpkit.forget.points import Point

__all__ = ["COLUMNS", "PerText", "point_row", "summarise"]

# Per text, by point name then probe set name: {"ll": [...], "match": [...] or None}.
PerText = Mapping[str, Mapping[str, Mapping[str, Any]]]

COLUMNS = [
    "point", "kind", "fusion", "alpha", "method", "models", "probe_set", "seen_by", "seen", "num_texts",
    "num_tokens", "ll_mean", "ll_stderr", "perplexity", "perplexity_stderr", "alr", "alr_stderr",
    "ll_gain_mean", "ll_gain_stderr", "accuracy", "accuracy_stderr",
]  # fmt: skip


def _seen(point: Point, probe: ProbeSet) -> list[str]:
    return [m for m in point.models if m in probe.seen_by]


def point_row(
    point: Point, probe: ProbeSet, ll: Sequence[float], match: Sequence[bool] | None,
    ref_ll: Sequence[float], num_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """The metrics of one point on one probe set, each with its standard error over the texts."""
    ll_mean, ll_se = mean_stderr(ll)
    ppl, ppl_se = perplexity(ll_mean, ll_se)
    alr, alr_se = mean_stderr(likelihood_ratios(ll, ref_ll))
    gain, gain_se = paired_difference(ll, ref_ll)
    acc, acc_se = mean_stderr([float(m) for m in match]) if match is not None else (None, None)
    return {
        "point": point.name, "kind": point.kind, "fusion": point.fusion, "alpha": point.alpha,
        "method": point.method, "models": list(point.models), "probe_set": probe.name,
        "seen_by": list(probe.seen_by), "seen": _seen(point, probe), "num_texts": len(ll),
        "num_tokens": num_tokens, "ll_mean": ll_mean, "ll_stderr": ll_se, "perplexity": ppl,
        "perplexity_stderr": ppl_se, "alr": alr, "alr_stderr": alr_se, "ll_gain_mean": gain,
        "ll_gain_stderr": gain_se, "accuracy": acc, "accuracy_stderr": acc_se,
    }  # fmt: skip


def _per_text_mean(columns: Sequence[Sequence[float]]) -> list[float]:
    return [math.fsum(v) / len(v) for v in zip(*columns, strict=True)]


def _verdict(point: Point, probe: ProbeSet, per_text: PerText, threshold: float) -> dict[str, Any]:
    """The summary row of one fusion point on one probe set."""
    ref = per_text[REFERENCE][probe.name]["ll"]
    fused = per_text[point.name][probe.name]["ll"]
    seen = _seen(point, probe)
    knowledge = "shared" if len(seen) >= 2 else f"only {seen[0]}" if seen else "unseen"
    gain_f = [f - r for f, r in zip(fused, ref, strict=True)]
    row: dict[str, Any] = {
        "point": point.name, "fusion": point.fusion, "alpha": point.alpha, "probe_set": probe.name,
        "knowledge": knowledge, "seen": seen, "alr_fused": mean_stderr(likelihood_ratios(fused, ref))[0],
        "ll_gain_fused": mean_stderr(gain_f)[0], "alr_seen": None, "delta_alr": None,
        "delta_alr_stderr": None, "ll_gain_seen": None, "ll_gain_seen_stderr": None, "delta_ll_gain": None,
        "delta_ll_gain_stderr": None, "kept_fraction": None, "verdict": "unseen",
    }  # fmt: skip
    if not seen:
        return row
    lr_seen = _per_text_mean([likelihood_ratios(per_text[m][probe.name]["ll"], ref) for m in seen])
    gain_seen = _per_text_mean(
        [[x - r for x, r in zip(per_text[m][probe.name]["ll"], ref, strict=True)] for m in seen]
    )
    g_seen, g_seen_se = mean_stderr(gain_seen)
    row["alr_seen"] = mean_stderr(lr_seen)[0]
    row["delta_alr"], row["delta_alr_stderr"] = paired_difference(likelihood_ratios(fused, ref), lr_seen)
    row["ll_gain_seen"], row["ll_gain_seen_stderr"] = g_seen, g_seen_se
    row["delta_ll_gain"], row["delta_ll_gain_stderr"] = paired_difference(gain_f, gain_seen)
    if not g_seen > 0 or (math.isfinite(g_seen_se) and g_seen <= 2 * g_seen_se):
        row["verdict"] = "not learned"
        return row
    row["kept_fraction"] = row["ll_gain_fused"] / g_seen
    row["verdict"] = "kept" if row["kept_fraction"] >= threshold else "forgotten"
    return row


def summarise(
    points: Sequence[Point], probes: Sequence[ProbeSet], per_text: PerText, threshold: float
) -> list[dict[str, Any]]:
    """The verdict rows of every fusion point strictly between its models, on every probe set."""
    return [_verdict(p, probe, per_text, threshold) for p in points if p.fused for probe in probes]

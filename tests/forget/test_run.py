"""`warpkit forget` end to end on hand-set tiny LMs whose every number is known in closed form
(`conftest`: constant logits z, so ℓ(x) = mean z[x_t] - log Σ exp z).

Model a adds +6 to the logits of the tokens of the shared and a-only texts, model b of the shared and
b-only texts. The path's midpoint adds +6 where both did, +3 where one did: on the shared texts it keeps
the whole gain, on each model's own texts it keeps part of it."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from tests.forget.conftest import ONLY_A, ONLY_B, SHARED, expected_ll
from warpkit.cli import main
from warpkit.forget.config import load_forget_config
from warpkit.forget.output import write_forget
from warpkit.forget.run import run_forget


def _config(tmp_path, folders, **extra):
    doc = {
        "reference": str(folders["reference"]),
        "models": {"a": str(folders["a"]), "b": str(folders["b"])},
        "probe_sets": [
            {"name": "shared", "texts": SHARED, "seen_by": ["a", "b"]},
            {"name": "only_a", "texts": ONLY_A, "seen_by": ["a"]},
            {"name": "only_b", "texts": ONLY_B, "seen_by": ["b"]},
            {
                "name": "pairs",
                "texts": [{"p": "the cat sat on the", "t": " mat"}, {"p": "violins", "t": " hum"}],
                "column": "p",
                "target_column": "t",
            },
        ],
        "fusions": [
            {"name": "ab", "path": {"models": ["a", "b"], "alphas": [0.0, 0.5, 1.0]}},
            {"name": "soup", "merge": {"method": "soup", "models": ["a", "b"]}},
        ],
        "fisher": [{"models": ["a", "b"], "probe_sets": ["shared", ["only_a", "only_b"]]}],
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "forget.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _midpoint(logits):
    a, b = logits["a"], logits["b"]
    return {v: (a.get(v, 0.0) + b.get(v, 0.0)) / 2 for v in set(a) | set(b)}


@pytest.fixture(scope="module")
def result(logit_models, tmp_path_factory):
    folders, _, _ = logit_models
    config = load_forget_config(_config(tmp_path_factory.mktemp("forget-run"), folders))
    return run_forget(config, progress=False)


def test_every_number_is_the_closed_form(result, logit_models):
    """Reference: ℓ = -ln V and ALR = 1; each model and the midpoint: ℓ and ALR from their logits."""
    _, logits, tokenizer = logit_models
    rows = {(r["point"], r["probe_set"]): r for r in result.rows}
    models = {
        "reference": logits["reference"],
        "a": logits["a"],
        "b": logits["b"],
        "ab/alpha=0.5": _midpoint(logits),
    }
    for probe, texts in (("shared", SHARED), ("only_a", ONLY_A), ("only_b", ONLY_B)):
        ref = [expected_ll(tokenizer, t, {}) for t in texts]
        assert ref == pytest.approx([-math.log(50257)] * len(texts))
        for point, z in models.items():
            ll = [expected_ll(tokenizer, t, z) for t in texts]
            alr = sum(math.exp(r - x) for r, x in zip(ref, ll, strict=True)) / len(texts)
            row = rows[(point, probe)]
            assert row["ll_mean"] == pytest.approx(sum(ll) / len(ll), abs=1e-4), (point, probe)
            assert row["alr"] == pytest.approx(alr, rel=1e-3), (point, probe)
            assert row["perplexity"] == pytest.approx(math.exp(-row["ll_mean"]))
    assert rows[("reference", "shared")]["alr"] == 1.0 and rows[("reference", "shared")]["alr_stderr"] == 0.0


def test_path_ends_are_the_models_and_the_soup_is_the_midpoint(result):
    rows = {(r["point"], r["probe_set"]): r for r in result.rows}
    for probe in ("shared", "only_a", "only_b", "pairs"):
        assert result.per_text["ab/alpha=0"][probe] == result.per_text["a"][probe]  # bit for bit
        assert result.per_text["ab/alpha=1"][probe] == result.per_text["b"][probe]
        assert rows[("soup", probe)]["ll_mean"] == pytest.approx(
            rows[("ab/alpha=0.5", probe)]["ll_mean"], abs=1e-6
        )


def test_accuracy_on_pairs(result):
    """Greedy decoding from a constant-logit model emits its argmax token, the lowest id with the largest
    logit: no single target of the pairs is that token for the reference (all logits 0: token 0, '!')."""
    rows = {(r["point"], r["probe_set"]): r for r in result.rows}
    assert rows[("reference", "pairs")]["accuracy"] == 0.0
    assert rows[("a", "shared")]["accuracy"] is None


def test_verdicts_shared_kept_unshared_partly_forgotten(result):
    """On the shared texts the midpoint has the models' logits exactly where the texts' tokens are, so it
    keeps essentially the whole gain; on a-only texts it has half of a's bias and falls back."""
    summary = {(s["point"], s["probe_set"]): s for s in result.summary}
    assert set(summary) == {
        (p, s) for p in ("ab/alpha=0.5", "soup") for s in ("shared", "only_a", "only_b", "pairs")
    }
    shared, only_a = summary[("ab/alpha=0.5", "shared")], summary[("ab/alpha=0.5", "only_a")]
    assert shared["knowledge"] == "shared" and shared["verdict"] == "kept" and shared["kept_fraction"] > 0.9
    assert only_a["knowledge"] == "only a" and only_a["kept_fraction"] < shared["kept_fraction"]
    assert only_a["delta_alr"] > 0  # the ALR rises towards the reference's 1
    assert summary[("soup", "pairs")]["verdict"] == "unseen"


def test_fisher_overlaps(result):
    assert [(f["models"], f["probe_sets"]) for f in result.fisher] == [
        (["a", "b"], ["shared", "shared"]),
        (["a", "b"], ["only_a", "only_b"]),
    ]
    for f in result.fisher:
        assert 0.0 <= f["overlap"] <= 1.0 and f["num_texts"] == 2 and f["num_params"] > 0


def test_files_and_cli(result, logit_models, tmp_path, capsys):
    written = write_forget(result, tmp_path / "api")
    assert sorted(p.name for p in written) == [
        "forget.csv",
        "forget.json",
        "forget_ab.png",
        "forget_bars.png",
    ]
    with open(tmp_path / "api" / "forget.csv") as f:
        assert (
            len(list(csv.DictReader(f))) == len(result.rows) == 7 * 4
        )  # reference, a, b, 3 path points, soup
    folders, _, _ = logit_models
    out = tmp_path / "cli"
    assert (
        main(
            [
                "forget",
                str(_config(tmp_path, folders)),
                "--output_dir",
                str(out),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 0
    )
    doc = json.loads((out / "forget.json").read_text())
    assert set(doc) == {"rows", "summary", "fisher", "probe_sets", "settings", "per_text"}
    assert "Fisher overlap a / b on only_a / only_b" in capsys.readouterr().out
    assert not (out / "forget_bars.png").exists()

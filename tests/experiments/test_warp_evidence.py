"""The WARP evidence experiment's machinery (experiments/warp_evidence*.py) end to end on a tiny model with
a fake trainer: every seed trained and evaluated with the ablations, the geometry, summary.json, RESULTS.md
rendered from it alone, and the claims' effects read back from the frontier output by hand."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from experiments.warp_evidence import CONFIG, evaluate, load_experiment, train
from experiments.warp_evidence_report import effect, render, verdict, write_report
from tests.loop.fakes import fake_policy_state
from warpkit.loop.launch import RunSpec
from warpkit.testing import save_tiny_model

TINY_FRONTIER = {
    "num_prompts": 3, "samples_per_prompt": 2, "max_new_tokens": 4, "temperature": 0.9, "batch_size": 8,
    "seed": 0, "bootstrap_resamples": 50,
}  # fmt: skip


def _save(init: Path, state: dict, folder: Path) -> None:
    shutil.copytree(init, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def fake_run(spec: RunSpec, env: dict[str, str]) -> None:
    """The policy = init + noise (seeded by the run); a baseline also leaves checkpoints every save_steps."""
    state = fake_policy_state(spec.init, spec.data_seed + 100 * spec.index)
    if spec.name is not None:
        every, last = int(spec.rl["save_steps"]), int(spec.rl["max_steps"])
        init = load_file(str(spec.init / "model.safetensors"))
        for step in range(every, last + 1, every):
            w = step / last
            _save(
                spec.init,
                {k: (1 - w) * init[k] + w * v for k, v in state.items()},
                spec.output_dir / f"checkpoint-{step}",
            )
    _save(spec.init, state, spec.policy_dir)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    sft = save_tiny_model(root / "sft", "llama", hidden_size=32, num_layers=2, seed=0)
    raw = yaml.safe_load(CONFIG.read_text()) | {"model_name_or_path": str(sft), "evaluation": TINY_FRONTIER}
    config = root / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))
    runs, results = root / "runs", root / "results"
    train([0, 1], runs, config, train_fn=fake_run)
    evaluate([0, 1], runs, config, train_fn=fake_run)
    write_report([0, 1], runs, results, config)
    return runs, results


def test_every_seed_is_evaluated_with_the_ablations(experiment):
    runs, results = experiment
    for seed in (0, 1):
        doc = json.loads((results / f"seed_{seed}" / "frontier.json").read_text())
        methods = {p["method"] for p in doc["points"]}
        assert {"warp_iter1", "warp_iter2", "warp_iter3", "sft_anchor", "ema_anchor", "lerp_iter1"} <= methods
        assert "warp_m1_iter1" in methods
        assert ("sft_anchor_beta0_01" in methods) == (seed == 0)  # the beta grid's extremes: seed 0 only
        assert all(len(p["per_prompt"]["reward"]) == 3 for p in doc["points"])
    # the LERP ablation is the mean of iteration 1's two policies
    out = runs / "seed_0"
    p1, p2 = (load_file(str(out / "iter_1" / f"run_{m}" / "policy" / "model.safetensors")) for m in (1, 2))
    lerp = load_file(str(out / "ablations" / "lerp_iter1" / "model.safetensors"))
    for k in lerp:
        torch.testing.assert_close(lerp[k], (p1[k].double() / 2 + p2[k].double() / 2).to(lerp[k].dtype))


def test_geometry_of_independent_noise(experiment):
    runs, results = experiment
    geometry = json.loads((results / "seed_0" / "geometry.json").read_text())
    for it in ("iter_1", "iter_2", "iter_3"):
        cos = list(geometry[it]["task_vector_cos"].values())
        assert cos and all(abs(c) < 0.2 for c in cos)  # independent N(0, 1) task vectors: nearly orthogonal
        # cos(theta_1, theta_2) by hand: both whole models flattened into one float64 vector each
        a, b = (
            load_file(str(runs / "seed_0" / it / f"run_{m}" / "policy" / "model.safetensors")) for m in (1, 2)
        )
        x, y = (torch.cat([t[k].double().flatten() for k in sorted(t)]) for t in (a, b))
        assert geometry[it]["weights_cos"] == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-12)
        for g, c in geometry[it]["task_vector_cos"].items():
            assert geometry[it]["model_stock_eta"][g] == pytest.approx(2 * c / (1 + c))


def test_claims_are_read_from_the_frontier_output(experiment):
    _, results = experiment
    summary = json.loads((results / "summary.json").read_text())
    doc = json.loads((results / "seed_0" / "frontier.json").read_text())
    claims = {c["id"]: c for c in summary["claims"]}
    # a point difference by hand: SLERP point minus LERP point, per prompt, then the t interval over 3 prompts
    rows = {p["name"]: p for p in doc["points"]}
    d = [
        a - b
        for a, b in zip(
            rows["warp-iter1/eta=1"]["per_prompt"]["reward"],
            rows["lerp_iter1"]["per_prompt"]["reward"],
            strict=True,
        )
    ]
    mean = sum(d) / 3
    half = 4.302653 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    assert claims["3"]["per_seed"]["0"] == pytest.approx([mean, mean - half, mean + half], abs=1e-6)
    # across two seeds: t interval with 1 degree of freedom around the mean of the two seeds' effects
    e0, e1 = claims["3"]["per_seed"]["0"][0], claims["3"]["per_seed"]["1"][0]
    assert claims["3"]["across_seeds"][0] == pytest.approx((e0 + e1) / 2)
    half = 12.706205 * abs(e0 - e1) / 2  # s = |e0 - e1| / sqrt(2), / sqrt(2) again
    assert claims["3"]["across_seeds"][2] == pytest.approx((e0 + e1) / 2 + half, abs=1e-5)
    # seed-0-only claims have one seed; hypervolume claims come from the bootstrap differences
    assert set(claims["1b"]["per_seed"]) == {"0"} and "across_seeds" not in claims["1b"]
    [hv] = [
        x
        for x in doc["hypervolume"]["differences"]
        if {x["method_a"], x["method_b"]} == {"warp_iter2", "warp_iter1"}
    ]
    sign = 1 if hv["method_a"] == "warp_iter2" else -1
    assert claims["5"]["per_seed"]["0"][0] == pytest.approx(sign * hv["difference"])
    assert effect(doc, "hv", "warp_iter1", "warp_iter2")[0] == pytest.approx(-sign * hv["difference"])
    for c in claims.values():
        assert c["verdict"] in ("holds", "contradicted", "inconclusive", "not measured")
    # RESULTS.md is rendered from summary.json alone, with every claim's row
    text = (results / "RESULTS.md").read_text()
    assert text == render(summary)
    assert all(f"| {c['id']} |" in text for c in summary["claims"])
    assert (results / "frontier.png").stat().st_size > 10_000


def test_a_later_session_adds_seeds_to_the_committed_results(experiment, tmp_path):
    """Seeds trained in an earlier session (their runs/ gone) are read from the committed results, with that
    session's wall times; the new seeds' come from their runs. The claims are those of one report of all."""
    runs, results = experiment
    old = json.loads((results / "summary.json").read_text())
    committed, later = tmp_path / "results", tmp_path / "runs"
    shutil.copytree(results, committed)
    # this session ran seed 1 again; seed 0's runs are gone
    shutil.copytree(runs / "seed_1", later / "seed_1")
    config = runs.parent / "experiment.yaml"
    write_report([0, 1], later, committed, config, schedule="seed 1 alone")
    summary = json.loads((committed / "summary.json").read_text())
    assert summary["claims"] == old["claims"] and summary["points"] == old["points"]
    [first] = old["facts"]["sessions"]
    assert [s["seeds"] for s in summary["facts"]["sessions"]] == [[0], [1]]
    assert summary["facts"]["sessions"][0]["per_seed"] == {"0": first["per_seed"]["0"]}
    assert summary["facts"]["sessions"][1]["schedule"] == "seed 1 alone"
    text = (committed / "RESULTS.md").read_text()
    assert text == render(summary) and "- seeds 0 (started " in text and "- seeds 1 (started " in text
    assert "--seeds 0 1" in summary["facts"]["command"]  # not the default seeds: the command says which
    with pytest.raises(SystemExit, match=r"seed 2: neither .* has a frontier\.json"):
        write_report([0, 1, 2], later, committed, config)


def test_verdict_rule():
    assert verdict(+1, 0.01, 0.2) == "holds" and verdict(-1, -0.3, -0.1) == "holds"
    assert verdict(+1, -0.3, -0.1) == "contradicted"
    assert verdict(+1, -0.1, 0.2) == "inconclusive" and verdict(+1, math.nan, math.nan) == "inconclusive"


@pytest.mark.parametrize("name", ["warp_evidence.yaml", "warp_evidence_gpu.yaml"])
def test_the_cpu_and_gpu_recipes_load_and_train_what_the_claims_compare(name, tmp_path, monkeypatch):
    from experiments.warp_evidence import seed_config
    from warpkit.frontier.config import FrontierConfig
    from warpkit.loop.evaluate import baseline_specs
    from warpkit.loop.rl import check_settings

    path = CONFIG.parent / name
    if "gpu" in name:  # its bf16 runs parsed as on the GPU they are for (transformers checks the device)
        monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    text = path.read_text()
    assert (text.startswith("#") and "Launch:" in text) or "Run it" in text
    _, evaluation, main = load_experiment(path)
    FrontierConfig(reference="r", **evaluation)  # the evaluation settings are a valid frontier config
    first, other = seed_config(0, tmp_path, path), seed_config(1, tmp_path, path)
    assert [b["name"] for b in other.baselines] == main
    assert {"sft_beta0_01", "sft_beta0_05", "sft_beta0_2", "ema_anchor"} <= {
        b["name"] for b in first.baselines
    }
    for spec in baseline_specs(first, tmp_path / "sft", tmp_path):
        check_settings({**spec.run_config(), "data_seed": 0})
        assert spec.rl["max_steps"] == first.iterations * first.rl["max_steps"]  # equal sequential budget


def test_seeds_are_grouped_into_sessions_by_overlapping_times():
    """Seed 0 ran alone, 1 and 2 overlapped it (chained through 1), 3 and 4 ran a day later side by side."""
    from experiments.warp_evidence_report import group_sessions

    def t(start, end):
        return {"start": start, "end": end}

    times = {
        0: t(0, 100),
        1: t(10, 50),
        2: t(90, 160),
        3: t(86400, 90000),
        4: t(86401, 89000),
        5: t(90001, 90002),
    }
    assert group_sessions(times) == [[0, 1, 2], [3, 4], [5]]
    assert group_sessions({}) == []

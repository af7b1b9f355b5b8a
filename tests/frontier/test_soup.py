"""Rewarded soups on the frontier: soup points, extra rewards, fronts across rewards, rewards.png.

The models: the tiny GPT-2 of tests/test_frontier_cli.py (column 0 of lm_head is an exact per-token logit
bias) and two hand-made "policies fine-tuned on different rewards" from it: ``positive`` adds a bias to ten
positive words (sentiment reward), ``concise`` adds a bias to EOS (brevity reward). A soup of the two
interpolates both biases linearly in w, so sweeping w trades one reward for the other.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from warpkit.frontier.config import FrontierConfig, PolicySpec, SoupSweep, load_frontier_config
from warpkit.testing import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
POSITIVE = [1049, 922, 1842, 7932, 1266, 3772, 6275, 4998, 4950, 2818]  # " great", " good", " love", ...
EOS = 50256
PROMPTS = ["The movie was", "I think the ending"]
THIS = "tests.frontier.test_soup"


def build_rewarded_soup_models(root: Path) -> Path:
    """sft, positive (logit bias +6 on POSITIVE), concise (logit bias +9 on EOS): the models of
    configs/rewarded_soup_tiny.yaml. +9 on EOS ends about a third of the steps of a random tiny model."""
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    base = make_tiny_model("gpt2", tie_word_embeddings=False, hidden_size=32, num_layers=2, seed=0)
    with torch.no_grad():
        base.transformer.ln_f.weight[0] = 0.0
        base.transformer.ln_f.bias[0] = 1.0  # a constant unit: lm_head column 0 is a per-token logit bias
        base.lm_head.weight[:, 0] = 0.0
    for name, ids, bias in (("sft", [], 0.0), ("positive", POSITIVE, 6.0), ("concise", [EOS], 9.0)):
        with torch.no_grad():
            base.lm_head.weight[:, 0] = 0.0
            base.lm_head.weight[ids, 0] = bias
        base.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def soup_root(tmp_path_factory) -> Path:
    return build_rewarded_soup_models(tmp_path_factory.mktemp("soup-models"))


# Rewards named by the configs below as "tests.test_frontier_soup:<function>" (pytest puts the checkout on
# sys.path). The main reward records what it scored, so extra rewards can be recomputed independently.
# pytest imports this file as `test_frontier_soup` and the frontier as `tests.test_frontier_soup`: two
# module objects, so read CALLS through the latter (`_calls()`).
CALLS: list[dict] = []


def _calls() -> list[dict]:
    return importlib.import_module(THIS).CALLS


def recorded_length(completions, completion_ids, **_):
    CALLS.append({"completions": list(completions), "ids": [list(c) for c in completion_ids]})
    return [float(len(c)) for c in completion_ids]


def positive_count(completion_ids, **_):
    # A tensor, as reward models return: the frontier converts it (check_rewards).
    positive = torch.tensor(POSITIVE)
    return torch.stack(
        [torch.isin(torch.tensor(c, dtype=torch.long), positive).sum() for c in completion_ids]
    ).float()


def char_count(completions, **_):
    return [float(len(c)) for c in completions]


def nan_first(completions, **_):
    return [math.nan] + [1.0] * (len(completions) - 1)


def _config(root: Path, policies: list[PolicySpec], **kw) -> FrontierConfig:
    settings = {
        "prompts": PROMPTS,
        "num_prompts": None,
        "samples_per_prompt": 2,
        "max_new_tokens": 4,
        "batch_size": 8,
        "reward": f"{THIS}:recorded_length",
        "device": "cpu",
    } | kw
    return FrontierConfig(reference=str(root / "sft"), policies=policies, **settings)


def _soup(root: Path, **kw) -> PolicySpec:
    return PolicySpec(
        "soup", "rewarded_soup", soup=SoupSweep([str(root / "positive"), str(root / "concise")], **kw)
    )


# ----------------------------------------------------------------------------- the interpolation


def test_weighted_average_is_the_float64_weighted_sum(soup_root):
    from transformers import AutoModelForCausalLM

    from warpkit.merge import weighted_average

    a = AutoModelForCausalLM.from_pretrained(soup_root / "positive").state_dict()
    b = AutoModelForCausalLM.from_pretrained(soup_root / "concise").state_dict()
    # Make the two states differ everywhere, so the check covers every tensor, not just lm_head.
    b = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in b.items()}
    soup = weighted_average([a, b], [0.25, 0.75])
    assert soup.keys() == a.keys()
    for name, t in soup.items():
        expected = (0.25 * a[name].double() + 0.75 * b[name].double()).to(a[name].dtype)
        assert t.dtype == a[name].dtype and torch.equal(t, expected), name
    # Weights that are not binary fractions tell a float64 accumulation from a float32 one: each entry is
    # the float64 sum rounded once to float32, within half a float32 ulp (|error| <= 2^-24 |value|), which
    # a float32 accumulation misses (it rounds after every product and sum).
    c = {k: -v for k, v in a.items()}
    soup = weighted_average([a, b, c], [0.3, 0.6, 0.1])
    for name, t in soup.items():
        expected = 0.3 * a[name].double() + 0.6 * b[name].double() + 0.1 * c[name].double()
        assert ((t.double() - expected).abs() <= 2**-24 * (1 + 1e-9) * expected.abs() + 1e-45).all(), name
    # The end points are the models themselves, bit for bit.
    assert all(torch.equal(v, a[k]) for k, v in weighted_average([a, b], [1.0, 0.0]).items())
    assert all(torch.equal(v, b[k]) for k, v in weighted_average([a, b], [0.0, 1.0]).items())
    # Integer buffers are copied from the first state, never interpolated.
    ints = weighted_average([{"n": torch.tensor([3])}, {"n": torch.tensor([5])}], [0.5, 0.5])
    assert torch.equal(ints["n"], torch.tensor([3]))
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_average([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="different tensors"):
        weighted_average([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [0.5, 0.5])


def test_soup_sweep_vectors_and_point_names():
    from warpkit.frontier.run import _jobs

    assert SoupSweep(["a", "b"]).vectors() == [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    spec = PolicySpec("rs", "m", soup=SoupSweep(["a", "b", "c"], weights=[[0.5, 0.25, 0.25], [0, 0, 1]]))
    FrontierConfig(reference="r", policies=[spec])  # three models with explicit weights are fine
    jobs = [job for job, folder in _jobs(spec)]
    assert [j.name for j in jobs] == ["rs/w=0.5,0.25,0.25", "rs/w=0,0,1"]
    assert {j.kind for j in jobs} == {"soup"} and jobs[0].weights == [0.5, 0.25, 0.25]


# ----------------------------------------------------------------------------- a run


def test_soup_points_extra_rewards_and_outputs(soup_root, tmp_path):
    from warpkit.frontier.run import run_frontier, write_frontier

    config = _config(
        soup_root,
        [
            PolicySpec("positive", "single_reward", path=str(soup_root / "positive")),
            PolicySpec("concise", "single_reward", path=str(soup_root / "concise")),
            _soup(soup_root, num_points=3),
        ],
        extra_rewards={
            "positive": f"{THIS}:positive_count",
            "chars": f"{THIS}:char_count",
            "sometimes": f"{THIS}:nan_first",
        },
        on_nan_reward="skip",
    )
    calls = _calls()
    calls.clear()
    result = run_frontier(config, progress=False)
    rows = {r["name"]: r for r in result.points}
    assert list(rows) == ["sft", "positive", "concise", "soup/w=1,0", "soup/w=0.5,0.5", "soup/w=0,1"]
    assert rows["soup/w=0.5,0.5"]["kind"] == "soup" and rows["soup/w=0.5,0.5"]["weights"] == [0.5, 0.5]
    assert rows["positive"]["weights"] is None

    # The end points of the soup ARE the two models: same weights bit for bit, same random numbers, hence
    # the very same samples and numbers as the plain path points.
    keys = (
        "reward_mean",
        "reward_stderr",
        "kl_mean",
        "kl_stderr",
        "kl_exact_mean",
        "length_mean",
        "diversity",
    )
    for soup, model in (("soup/w=1,0", "positive"), ("soup/w=0,1", "concise")):
        for key in keys:
            assert rows[soup][key] == rows[model][key], (soup, key)
        assert rows[soup]["rewards"] == rows[model]["rewards"]
    # The middle of the soup is neither model (the interpolation really happened).
    assert rows["soup/w=0.5,0.5"]["kl_exact_mean"] not in (
        rows["positive"]["kl_exact_mean"],
        rows["concise"]["kl_exact_mean"],
    )
    # The hand-made trade-off: the positive model says positive words, the concise one stops early.
    assert rows["positive"]["rewards"]["positive"]["mean"] > rows["concise"]["rewards"]["positive"]["mean"]
    assert rows["positive"]["length_mean"] > rows["concise"]["length_mean"]

    # Extra rewards scored the very completions the main reward saw, and their means and standard errors
    # match an independent recomputation (sample j of prompt i is row i * k + j).
    assert len(calls) == len(rows)
    for call, row in zip(calls, result.points, strict=True):
        index = [i for i in range(len(PROMPTS)) for _ in range(config.samples_per_prompt)]
        counts = [float(sum(Counter(ids)[t] for t in POSITIVE)) for ids in call["ids"]]
        chars = [float(len(c)) for c in call["completions"]]
        for name, values in (("positive", counts), ("chars", chars)):
            mean, stderr = row["rewards"][name]["mean"], row["rewards"][name]["stderr"]
            assert mean == pytest.approx(sum(values) / len(values), rel=1e-12, abs=1e-12), (row["name"], name)
            per_prompt = [
                [v for v, i in zip(values, index, strict=True) if i == p] for p in range(len(PROMPTS))
            ]
            se2 = sum((g[0] - g[1]) ** 2 / 2 / 2 for g in per_prompt) / len(PROMPTS) ** 2  # s^2 / n, n = 2
            assert stderr == pytest.approx(math.sqrt(se2), rel=1e-9, abs=1e-12), (row["name"], name)
            assert row["rewards"][name]["num_skipped"] == 0
        # on_nan_reward: skip drops the NaN of an extra reward from its mean and counts it.
        assert row["rewards"]["sometimes"]["mean"] == 1.0 and row["rewards"]["sometimes"]["num_skipped"] == 1
    assert result.skipped["extra_rewards"]["sometimes"] == {name: 1 for name in rows}

    # Fronts across rewards: (main reward, first extra reward), both maximised, within each method.
    assert result.reward_front_axes == ["reward", "positive"]
    assert set(result.reward_fronts) == {"single_reward", "rewarded_soup"}
    for method, names in result.reward_fronts.items():
        xs = [rows[n]["reward_mean"] for n in names]
        ys = [rows[n]["rewards"]["positive"]["mean"] for n in names]
        assert xs == sorted(xs) and ys == sorted(ys, reverse=True), method
        members = [r for r in result.points if r["method"] in (method, "sft")]
        for r in members:  # nothing outside the front dominates a front point
            assert r["name"] in names or any(
                rows[n]["reward_mean"] >= r["reward_mean"]
                and rows[n]["rewards"]["positive"]["mean"] >= r["rewards"]["positive"]["mean"]
                for n in names
            )
    metrics = result.metrics()
    assert (
        metrics["frontier/soup/w=0.5,0.5/reward_positive_mean"]
        == rows["soup/w=0.5,0.5"]["rewards"]["positive"]["mean"]
    )
    assert "frontier/sft/reward_chars_stderr" in metrics

    out = write_frontier(result, tmp_path / "out")
    doc = json.loads((out / "frontier.json").read_text())
    assert doc["reward_fronts"] == result.reward_fronts and doc["reward_front_axes"] == ["reward", "positive"]
    with open(out / "frontier.csv", newline="") as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    assert header[-7:] == [
        "weights",
        "reward_positive_mean",
        "reward_positive_stderr",
        "reward_chars_mean",
        "reward_chars_stderr",
        "reward_sometimes_mean",
        "reward_sometimes_stderr",
    ]
    by_name = {r["name"]: r for r in table}
    assert json.loads(by_name["soup/w=0.5,0.5"]["weights"]) == [0.5, 0.5] and by_name["sft"]["weights"] == ""
    assert float(by_name["concise"]["reward_chars_mean"]) == rows["concise"]["rewards"]["chars"]["mean"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert set(samples[0]["rewards"]) == {"positive", "chars", "sometimes"}
    for png in ("frontier.png", "rewards.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".frontier-tmp-*"))


def test_nan_extra_reward_is_an_error_by_default(soup_root):
    from warpkit.frontier.run import run_frontier

    config = _config(soup_root, [], extra_rewards={"sometimes": f"{THIS}:nan_first"})
    with pytest.raises(
        ValueError, match=r"extra reward 'sometimes' returned 1 non-finite.*on_nan_reward: skip"
    ):
        run_frontier(config, progress=False)


# ----------------------------------------------------------------------------- fronts and plots, hand-made


def _row(name: str, method: str, reward: float, other: float, kind: str = "path", weights=None) -> dict:
    return {
        "name": name,
        "method": method,
        "kind": kind,
        "spec": name.split("/")[0],
        "step": None,
        "eta": None,
        "weights": weights,
        "reward_mean": reward,
        "reward_stderr": 0.02,
        "kl_mean": 0.0 if method == "sft" else 1.0,
        "kl_stderr": 0.01,
        "kl_exact_mean": 0.0 if method == "sft" else 1.0,
        "kl_exact_stderr": 0.01,
        "length_mean": 3.0,
        "diversity": 1.0,
        "num_reward_skipped": 0,
        "params": {},
        "rewards": {"b": {"mean": other, "stderr": 0.03, "num_skipped": 0}},
    }


def test_pareto_front_max_on_hand_made_points():
    from warpkit.frontier.pareto import pareto_front_max

    x = [0.0, 1.0, 2.0, 1.0, 0.5, 2.0, 1.0]
    y = [3.0, 2.0, 0.0, 1.0, 1.0, 0.0, 2.0]
    # (0, 3), (1, 2), (2, 0) are non-dominated; (1, 1) and (0.5, 1) are dominated by (1, 2); the repeats
    # of (2, 0) and (1, 2) keep their first index. Sorted by increasing x, hence decreasing y.
    assert pareto_front_max(x, y) == [0, 1, 2]
    assert pareto_front_max([1.0], [1.0]) == [0]
    assert pareto_front_max([0.0, 1.0], [0.0, 1.0]) == [1]  # one point dominates: a single-point front


def test_reward_fronts_in_summary_on_hand_made_rows():
    from warpkit.frontier.run import _summarise

    rows = [
        _row("sft", "sft", 0.0, 0.5),
        _row("soup/w=1,0", "rs", 1.0, 0.0, "soup", [1.0, 0.0]),
        _row("soup/w=0.5,0.5", "rs", 0.7, 0.7, "soup", [0.5, 0.5]),
        _row("soup/w=0,1", "rs", -0.2, 1.0, "soup", [0.0, 1.0]),
        _row("bad-mix", "rs", 0.3, 0.3),  # dominated by the middle of the soup
        _row("ppo", "other", 0.5, 0.0),
        _row("nan", "other", 0.9, math.nan),  # no value on the y reward: left out of the reward front
    ]
    config = FrontierConfig(reference="r", extra_rewards={"b": "m:f"})
    result = _summarise(config, rows, [], "r", "cpu", None, [], 2)
    assert result.reward_front_axes == ["reward", "b"]
    assert result.reward_fronts == {
        "rs": ["soup/w=0,1", "soup/w=0.5,0.5", "soup/w=1,0"],
        "other": ["sft", "ppo"],
    }
    # reward_axes swaps the axes: the same points, in increasing order of the new x.
    config = FrontierConfig(reference="r", extra_rewards={"b": "m:f"}, reward_axes=["b", "reward"])
    result = _summarise(config, rows, [], "r", "cpu", None, [], 2)
    assert result.reward_fronts["rs"] == ["soup/w=1,0", "soup/w=0.5,0.5", "soup/w=0,1"]
    # Without extra rewards: no reward front.
    plain = [{k: v for k, v in r.items() if k != "rewards"} | {"rewards": {}} for r in rows[:-1]]
    result = _summarise(FrontierConfig(reference="r"), plain, [], "r", "cpu", None, [], 2)
    assert result.reward_fronts == {} and result.reward_front_axes == []


def test_rewards_png_only_with_extra_rewards(tmp_path):
    from warpkit.frontier.run import _summarise, write_frontier

    rows = [
        _row("sft", "sft", 0.0, 0.5),
        *[
            _row(f"soup/w={1 - t:g},{t:g}", "rs", 1 - t**2, t, "soup", [1 - t, t])
            for t in (0, 0.25, 0.5, 0.75, 1)
        ],
        _row("ppo", "other", 0.5, 0.1),
    ]
    config = FrontierConfig(
        reference="r", extra_rewards={"b": "m:f"}, title="Hand-made", method_labels={"rs": "rewarded soup"}
    )
    out = write_frontier(_summarise(config, rows, [], "r", "cpu", None, [], 2), tmp_path / "with")
    png = out / "rewards.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "reward_fronts" in json.loads((out / "frontier.json").read_text())

    plain = [{k: v for k, v in r.items() if k != "rewards"} | {"rewards": {}} for r in rows]
    out = write_frontier(
        _summarise(FrontierConfig(reference="r"), plain, [], "r", "cpu", None, [], 2), tmp_path / "without"
    )
    assert (out / "frontier.png").is_file() and not (out / "rewards.png").exists()
    assert "reward_fronts" not in json.loads((out / "frontier.json").read_text())
    assert "weights" in (out / "frontier.csv").read_text().splitlines()[0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("soup", "match"),
    [
        (
            {"models": ["a", "b"], "weights": [[0.5, 0.4]]},
            r"policy 'rs': soup weight vector \[0.5, 0.4\] sums to 0.9",
        ),
        (
            {"models": ["a", "b"], "weights": [[1.5, -0.5]]},
            r"\[1.5, -0.5\] has a negative entry.*>= 0 that sum to 1",
        ),
        (
            {"models": ["a", "b"], "weights": [[0.5, 0.25, 0.25]]},
            r"\[0.5, 0.25, 0.25\] has 3 entries for 2 models",
        ),
        ({"models": ["a", "b", "c"]}, r"soup of 3 models needs explicit soup.weights"),
        ({"models": ["a"]}, r"a soup needs at least 2 models, got 1.*`path` entry"),
        ({"models": ["a", "b"], "num_points": 1}, r"num_points must be >= 2"),
        ({"models": ["a", "b"], "weights": []}, r"soup.weights is empty"),
        ({"models": ["a", "b"], "weights": [[0.5, 0.5]], "num_points": 3}, r"num_points=3 and soup.weights"),
    ],
    ids=["sum", "negative", "length", "three-without-weights", "one-model", "one-point", "empty", "both"],
)
def test_bad_soup_is_refused_when_the_config_loads(tmp_path, soup, match):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"reference": "x", "policies": [{"name": "rs", "method": "m", "soup": soup}]})
    )
    with pytest.raises(ValueError, match=match):
        load_frontier_config(path)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"extra_rewards": {"not a name": "m:f"}},
            r"extra_rewards name 'not a name' is not usable.*identifiers",
        ),
        ({"extra_rewards": {"reward": "m:f"}}, r"extra_rewards name 'reward' is not usable"),
        ({"extra_rewards": {"Len": "m:f", "len": "m:g"}}, r"\['Len', 'len'\] differ only in case"),
        ({"extra_rewards": {"b": ""}}, r"extra_rewards\['b'\] must be a reward spec"),
        (
            {"extra_rewards": {"b": "m:f"}, "reward_axes": ["b", "c"]},
            r"reward_axes must be two different names",
        ),
        ({"reward_axes": ["reward", "b"]}, r"reward_axes .* needs extra_rewards"),
    ],
    ids=["not-identifier", "reward", "case", "empty-spec", "unknown-axis", "axes-without-extras"],
)
def test_bad_extra_rewards_are_refused(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FrontierConfig(reference="x", **fields)


def test_soup_of_models_with_other_shapes_is_refused_before_sampling(
    soup_root, tiny_model_factory, monkeypatch
):
    from warpkit.frontier import run as frontier_run

    wider = tiny_model_factory("gpt2", False, hidden_size=64)  # same vocabulary and tokenizer, other shapes
    monkeypatch.setattr(
        frontier_run, "evaluate_policy", lambda *a, **k: pytest.fail("sampled before the check")
    )
    config = _config(
        soup_root,
        [PolicySpec("rs", "m", soup=SoupSweep([str(soup_root / "positive"), str(wider)]))],
    )
    with pytest.raises(ValueError, match=r"policy 'rs': soup.models\[1\] .* does not match soup.models\[0\]"):
        frontier_run.run_frontier(config, progress=False)


def test_missing_soup_model_is_refused_before_sampling(soup_root, monkeypatch):
    from warpkit.frontier import run as frontier_run

    monkeypatch.setattr(
        frontier_run, "evaluate_policy", lambda *a, **k: pytest.fail("sampled before the check")
    )
    config = _config(
        soup_root, [PolicySpec("rs", "m", soup=SoupSweep([str(soup_root / "positive"), "nope"]))]
    )
    with pytest.raises(ValueError, match=r"policy 'rs' \(soup.models\[1\]\) 'nope' is not a model folder"):
        frontier_run.run_frontier(config, progress=False)


if (
    __name__ == "__main__"
):  # python tests/test_frontier_soup.py DIR  builds the models of rewarded_soup_tiny.yaml
    import sys

    print(build_rewarded_soup_models(Path(sys.argv[1])))


# ----------------------------------------------------------------------------- the shipped config


def test_rewarded_soup_tiny_config_end_to_end(soup_root, tmp_path, monkeypatch, capsys):
    from warpkit.cli import main

    monkeypatch.setenv("WARPKIT_TINY", str(soup_root))
    config = load_frontier_config(REPO / "configs" / "rewarded_soup_tiny.yaml")
    assert config.extra_rewards == {"brevity": "warpkit.workloads.default:brevity_reward"}
    out = tmp_path / "out"
    assert (
        main(["frontier", str(REPO / "configs" / "rewarded_soup_tiny.yaml"), "--output_dir", str(out)]) == 0
    )

    doc = json.loads((out / "frontier.json").read_text())
    rows = {r["name"]: r for r in doc["points"]}
    soup = [f"soup/w={1 - t / 4:g},{t / 4:g}" for t in range(5)]
    assert list(rows) == ["sft", *soup]
    # The hand-made trade-off: the positive end wins on sentiment, the concise end on brevity.
    pos, concise = rows[soup[0]], rows[soup[-1]]
    assert pos["reward_mean"] - concise["reward_mean"] > 2 * math.hypot(
        pos["reward_stderr"], concise["reward_stderr"]
    )
    b_pos, b_concise = pos["rewards"]["brevity"], concise["rewards"]["brevity"]
    assert b_concise["mean"] - b_pos["mean"] > 2 * math.hypot(b_pos["stderr"], b_concise["stderr"])
    # Both ends of the soup are on its reward front: each is the best on one reward.
    assert doc["reward_front_axes"] == ["reward", "brevity"]
    assert (
        doc["reward_fronts"]["rewarded_soup"][0] == soup[-1]
        and doc["reward_fronts"]["rewarded_soup"][-1] == soup[0]
    )
    assert (out / "rewards.png").stat().st_size > 20_000
    printed = capsys.readouterr().out
    assert (
        "reward front rewarded_soup (reward vs brevity, both maximised):" in printed
        and "rewards.png" in printed
    )

"""`warpkit frontier` end to end on the shipped tiny configs and their hand-made policies (CI's plots).

The models (`warpkit.testing.build_tiny_frontier_models`, `build_rewarded_soup_models`): a tiny random
GPT-2 whose final LayerNorm has one constant output unit (weight 0, bias 1), so column 0 of lm_head is an
exact per-token logit bias. Policies add a bias ``b`` to ten positive words: the KL to the SFT and the
VADER reward both grow with ``b`` -- a real trade-off without any training. The soup's two policies add a
bias to positive words and to EOS: the soup trades the VADER reward for the brevity reward.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from warpkit._util.files import TMP_MARK
from warpkit.cli import main
from warpkit.frontier import run
from warpkit.frontier.config import load_frontier_config

REPO = Path(__file__).resolve().parents[2]


def test_frontier_tiny_config_end_to_end(tiny_frontier_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WARPKIT_TINY", str(tiny_frontier_root))
    loads = []
    real_load = run.load_model
    monkeypatch.setattr(run, "load_model", lambda path, *a: loads.append(path) or real_load(path, *a))
    out = tmp_path / "out"
    assert main(["frontier", str(REPO / "configs" / "frontier_tiny.yaml"), "--output_dir", str(out)]) == 0

    doc = json.loads((out / "frontier.json").read_text())
    rows = {r["name"]: r for r in doc["points"]}
    expected = ["sft", "bias-2", "bias-4", "bias-6"] + [f"noisy/step={s}" for s in (100, 200, 300, 400)]
    expected += [f"liti/eta={e:g}" for e in (0.0, 0.3, 0.5, 0.8, 1.0)]
    assert list(rows) == expected
    for r in rows.values():
        assert r["num_samples"] == 8 * 2
        for key in (
            "reward_mean",
            "reward_stderr",
            "kl_mean",
            "kl_stderr",
            "kl_exact_mean",
            "length_mean",
            "diversity",
        ):
            assert math.isfinite(r[key]), (r["name"], key)
        assert 1 <= r["length_mean"] <= 10

    # The LITI sweep: one load of init and one of merged, the etas interpolated in memory.
    assert sum(str(p).endswith("bias-6") for p in loads) == 2  # the bias-6 point and liti.merged
    assert len(loads) == 1 + 3 + 4 + 2
    # eta = 0 is the init (= SFT) exactly; eta = 1 is the merged weights (= bias-6) exactly, and with
    # common random numbers it draws the very same samples as the bias-6 checkpoint.
    assert rows["liti/eta=0"]["kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert rows["liti/eta=0"]["reward_mean"] == pytest.approx(rows["sft"]["reward_mean"])
    for key in ("reward_mean", "kl_mean", "kl_exact_mean", "length_mean", "diversity"):
        assert rows["liti/eta=1"][key] == pytest.approx(rows["bias-6"][key], rel=1e-4, abs=1e-5)
    # The hand-made trade-off is visible: more bias, more reward and more KL (by many standard errors).
    lo, hi = rows["bias-2"], rows["bias-6"]
    assert hi["reward_mean"] - lo["reward_mean"] > 3 * math.hypot(hi["reward_stderr"], lo["reward_stderr"])
    assert hi["kl_exact_mean"] - lo["kl_exact_mean"] > 3 * math.hypot(
        hi["kl_exact_stderr"], lo["kl_exact_stderr"]
    )

    assert set(doc["fronts"]) == {"sft_anchor", "ema_anchor", "warp_iter1"}
    # Every front is non-dominated within its method: along it, KL and reward both increase.
    for names in doc["fronts"].values():
        kls = [rows[n]["kl_exact_mean"] for n in names]
        rewards = [rows[n]["reward_mean"] for n in names]
        assert kls == sorted(kls) and all(a < b for a, b in itertools.pairwise(rewards))
    assert doc["hypervolume"]["reference_point"]["reward"] == pytest.approx(rows["sft"]["reward_mean"])
    assert {(m["method_a"], m["method_b"]) for m in doc["matched_kl"]} == {
        ("sft_anchor", "ema_anchor"),
        ("sft_anchor", "warp_iter1"),
        ("ema_anchor", "warp_iter1"),
    }
    csv_lines = (out / "frontier.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[0].startswith("name,method,kind")
    png = out / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert not [p.name for p in out.iterdir() if TMP_MARK in p.name]
    printed = capsys.readouterr().out
    assert "front warp_iter1:" in printed and "liti/eta=0.5" in printed


def test_rewarded_soup_tiny_config_end_to_end(soup_root, tmp_path, monkeypatch, capsys):
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

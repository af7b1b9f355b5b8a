"""`warpkit frontier configs/frontier_tiny.yaml` end to end on hand-made tiny policies (CI's plot).

The models: a tiny random GPT-2 whose final LayerNorm has one constant output unit (weight 0, bias 1), so
column 0 of lm_head is an exact per-token logit bias. Policies add a bias ``b`` to ten positive words:
the KL to the SFT and the VADER reward both grow with ``b`` -- a real trade-off without any training.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from warpkit.testing import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
POSITIVE = [1049, 922, 1842, 7932, 1266, 3772, 6275, 4998, 4950, 2818]  # " great", " good", " love", ...


def build_tiny_frontier_models(root: Path) -> Path:
    """sft, bias-2/4/6 (logit bias on POSITIVE), noisy/checkpoint-{100..400} (bias + growing weight noise)."""
    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    base = make_tiny_model("gpt2", tie_word_embeddings=False, hidden_size=32, num_layers=2, seed=0)
    with torch.no_grad():
        base.transformer.ln_f.weight[0] = 0.0
        base.transformer.ln_f.bias[0] = 1.0
        base.lm_head.weight[:, 0] = 0.0

    def variant(folder: Path, bias: float, noise: float = 0.0) -> None:
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.lm_head.weight[POSITIVE, 0] = bias
            g = torch.Generator().manual_seed(7)
            for p in model.transformer.h.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    variant(root / "sft", 0.0)
    for b in (2, 4, 6):
        variant(root / f"bias-{b}", b)
    for step, (b, noise) in zip(
        (100, 200, 300, 400), ((1.5, 0.3), (3, 0.6), (4.5, 0.9), (6, 1.2)), strict=True
    ):
        variant(root / "noisy" / f"checkpoint-{step}", b, noise)
    return root


@pytest.fixture(scope="session")
def tiny_frontier_root(tmp_path_factory) -> Path:
    return build_tiny_frontier_models(tmp_path_factory.mktemp("frontier-models"))


def test_frontier_tiny_config_end_to_end(tiny_frontier_root, tmp_path, monkeypatch, capsys):
    from warpkit.frontier import run as frontier_run
    from warpkit.cli import main

    monkeypatch.setenv("WARPKIT_TINY", str(tiny_frontier_root))
    loads = []
    real_load = frontier_run.load_model
    monkeypatch.setattr(
        frontier_run, "load_model", lambda path, *a: loads.append(path) or real_load(path, *a)
    )
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
    assert not list(out.glob(".frontier-tmp-*"))
    printed = capsys.readouterr().out
    assert "front warp_iter1:" in printed and "liti/eta=0.5" in printed


if __name__ == "__main__":  # python tests/test_frontier_cli.py DIR  builds the models of frontier_tiny.yaml
    import sys

    print(build_tiny_frontier_models(Path(sys.argv[1])))

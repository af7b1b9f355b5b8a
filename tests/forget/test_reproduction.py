"""The Fuse-to-Forget memorization effect, reproduced tiny (slow: two fine-tunes of a tiny LM, ~2 minutes).

`experiments/fuse_to_forget.py` builds the models at a smaller size here: a random tiny llama fine-tuned
twice until it memorizes, on shared + only_a and shared + only_b (8 review sentences each). The midpoint
of the interpolation path must keep the shared shard (most of its log-likelihood gain over the reference)
and forget each unshared shard: its ALR there rises above the ALR of the model that saw it by more than two
standard errors of the paired difference (five for the log-likelihood gain), and it keeps a much smaller
share of its gain over the reference than of the shared shard's. Measured (30 steps, this seed): kept
fraction 0.96 on the shared shard, 0.48 and 0.32 on the unshared ones; log-likelihood drops of 4.6 and 6.0
nats per token with standard errors 0.13 and 0.45.
"""

from __future__ import annotations

import importlib.util

import pytest

from experiments.fuse_to_forget import build_models
from warpkit._util.config import build_dataclass
from warpkit.forget.config import ForgetConfig
from warpkit.forget.run import run_forget

SIZE = 8


@pytest.mark.slow
def test_fusion_keeps_the_shared_shard_and_forgets_the_unshared(tmp_path):
    if importlib.util.find_spec("gensim") is None:  # located, never imported: its data files only
        pytest.skip("the review sentences ship in the gensim wheel (make test installs it)")
    models = build_models(tmp_path, size=SIZE, steps=30, lr=1e-2, max_tokens=24)
    source = {"texts": "warpkit.workloads.default:review_prompts", "kwargs": {"split": "train"}}
    shards = [("shared", ["a", "b"]), ("only_a", ["a"]), ("only_b", ["b"])]
    doc = {
        "reference": str(models["ref"]),
        "models": {"a": str(models["a"]), "b": str(models["b"])},
        "probe_sets": [
            {"name": n, **source, "rows": [i * SIZE, (i + 1) * SIZE], "seen_by": seen}
            for i, (n, seen) in enumerate(shards)
        ],
        "fusions": [{"name": "ab", "path": {"models": ["a", "b"], "alphas": [0.0, 0.5, 1.0]}}],
        "max_tokens": 24,
        "device": "cpu",
    }
    result = run_forget(build_dataclass(ForgetConfig, doc, "test"), progress=False)
    verdict = {s["probe_set"]: s for s in result.summary if s["point"] == "ab/alpha=0.5"}
    shared = verdict["shared"]
    assert shared["ll_gain_seen"] > 3 * shared["ll_gain_seen_stderr"]  # the models did memorize it
    assert shared["verdict"] == "kept" and shared["kept_fraction"] > 0.8, shared
    for name in ("only_a", "only_b"):
        own = verdict[name]
        assert own["ll_gain_seen"] > 3 * own["ll_gain_seen_stderr"], own  # its model memorized it
        # ALR rises towards the reference's 1 (a mean of ratios: heavy-tailed, so 2 s.e.; its log twin, 5 s.e.)
        assert own["delta_alr"] > 2 * own["delta_alr_stderr"], own
        assert -own["delta_ll_gain"] > 5 * own["delta_ll_gain_stderr"], own
        # and it loses far more than the shared shard does
        margin = 3 * (own["delta_ll_gain_stderr"] + shared["delta_ll_gain_stderr"])
        assert shared["delta_ll_gain"] - own["delta_ll_gain"] > margin, (own, shared)
        assert own["kept_fraction"] < shared["kept_fraction"] - 0.25, (own, shared)

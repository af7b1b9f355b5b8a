"""Every shipped config parses: WARP configs into WarpConfig, their rl section through the run's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from warpkit._util.config import ConfigError
from warpkit.loop.config import load_config
from warpkit.loop.rl import parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WARP_CONFIGS = sorted(CONFIGS.glob("warp_*.yaml"))


def test_configs_exist():
    names = {p.name for p in WARP_CONFIGS}
    assert names == {
        "warp_tiny.yaml", "warp_default.yaml",  # CI and the demo
        "warp_qwen2.5-1.5b_full_zero3.yaml", "warp_qwen2.5-1.5b_lora.yaml",  # real-scale recipes
        "warp_qwen2.5-1.5b_slurm_2x8.yaml",  # the full ZeRO-3 recipe on a SLURM cluster, 2 nodes x 8 GPUs a run
    }  # fmt: skip


@pytest.mark.parametrize("path", WARP_CONFIGS, ids=lambda p: p.name)
def test_warp_config_parses(path, tmp_path):
    text = path.read_text()
    assert text.startswith("#"), "each config opens with its purpose, hardware and launch command"
    assert "Launch:" in text and "Hardware:" in text
    config = load_config(path)
    run = {**config.rl, "model_name_or_path": "m", "output_dir": str(tmp_path), "data_seed": 0}
    run["bf16"] = False  # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    rl_args, training_args, model_args = parse_args(["--config", str(tmp_path / "run.yaml")])
    assert training_args.beta > 0 and rl_args.anchor == "ema"
    assert model_args.use_peft == ("lora" in path.name)
    if config.accelerate_config:
        assert (CONFIGS.parent / config.accelerate_config).is_file()
    if "slurm" in path.name:
        slurm = config.slurm_config()
        assert (
            config.launcher == "slurm"
            and slurm.nodes
            * slurm.gpus_per_node
            * run["per_device_train_batch_size"]
            * run.get("gradient_accumulation_steps", 1)
            == 128
        )  # the paper's batch


def test_baselines_of_every_anchor_kind_get_a_frontier_label(tmp_path):
    """A baseline per `rl.anchor` kind is labelled in the frontier config the driver writes."""
    from warpkit.loop.config import WarpConfig
    from warpkit.loop.evaluate import frontier_document

    kinds = {"sft": {}, "ema": {}, "bema": {}, "elastic_reset": {"reset_every": 2}}
    config = WarpConfig(
        model_name_or_path="sft", output_dir=str(tmp_path), rl={"max_steps": 2, "beta": 0.1},
        baselines=[{"name": kind, "rl": {"anchor": kind, **extra}} for kind, extra in kinds.items()],
    )  # fmt: skip
    doc = frontier_document(config, tmp_path / "sft", tmp_path)
    baselines = [p for p in doc["policies"] if p["name"] in kinds]
    assert [p["method"] for p in baselines] == [f"{kind}_anchor" for kind in kinds]
    assert all(doc["method_labels"][p["method"]] for p in baselines)
    assert baselines[-1]["params"] == {"beta": 0.1, "reset_every": 2}


def test_a_baseline_method_groups_it_on_the_frontier(tmp_path):
    """SFT-anchor runs of a beta grid share one front by default; `method` draws one as a method of its own."""
    from warpkit.loop.config import WarpConfig
    from warpkit.loop.evaluate import frontier_document

    config = WarpConfig(
        model_name_or_path="sft", output_dir=str(tmp_path), rl={"max_steps": 2, "beta": 0.1},
        baselines=[
            {"name": "sft_b0_1", "rl": {"anchor": "sft"}},
            {"name": "sft_b0_01", "rl": {"anchor": "sft", "beta": 0.01}},
            {"name": "sft_b1", "rl": {"anchor": "sft", "beta": 1.0}, "method": "sft_beta1"},
        ],
    )  # fmt: skip
    doc = frontier_document(config, tmp_path / "sft", tmp_path)
    methods = {p["name"]: p["method"] for p in doc["policies"] if p["name"].startswith("sft_")}
    assert methods == {"sft_b0_1": "sft_anchor", "sft_b0_01": "sft_anchor", "sft_b1": "sft_beta1"}
    assert doc["method_labels"]["sft_beta1"] == "RL, SFT anchor (sft_b1)"
    with pytest.raises(ConfigError, match="method='a b' must be an identifier"):
        WarpConfig(model_name_or_path="sft", baselines=[{"name": "x", "rl": {}, "method": "a b"}])


def test_baselines_with_an_averaged_policy_are_drawn_as_that_policy(tmp_path):
    """`final_policy: swa | lawa` baselines: one point, their averaged policy/, under a method of its own."""
    from warpkit.loop.config import WarpConfig
    from warpkit.loop.evaluate import frontier_document

    rl = {"anchor": "ema", "save_steps": 1}
    config = WarpConfig(
        model_name_or_path="sft", output_dir=str(tmp_path), rl={"max_steps": 4, "beta": 0.1},
        baselines=[
            {"name": "lawa", "rl": {**rl, "final_policy": "lawa", "lawa_k": 3}},
            {"name": "swa", "rl": {**rl, "anchor": "bema", "final_policy": "swa", "swa_start": 2}},
        ],
    )  # fmt: skip
    doc = frontier_document(config, tmp_path / "sft", tmp_path)
    lawa, swa = (p for p in doc["policies"] if p["name"] in ("lawa", "swa"))
    assert lawa["method"] == "ema_anchor_lawa" and lawa["path"] == str(tmp_path / "baselines/lawa/policy")
    assert swa["method"] == "bema_anchor_swa" and "trajectory" not in swa
    assert (
        doc["method_labels"]["ema_anchor_lawa"] == "RL, EMA anchor, no merge, LAWA of the last 3 checkpoints"
    )
    assert doc["method_labels"]["bema_anchor_swa"].endswith("SWA of checkpoints from step 2")
    assert lawa["params"] == {"beta": 0.1, "final_policy": "lawa", "lawa_k": 3}


def test_the_anchors_tiny_config_runs_every_kind(tmp_path):
    """configs/anchors_tiny.yaml: a baseline per anchor kind and a LAWA one, each valid as its run parses it,
    all on the frontier plot."""
    from warpkit.loop.evaluate import baseline_specs, frontier_document
    from warpkit.loop.rl import check_settings

    path = CONFIGS / "anchors_tiny.yaml"
    text = path.read_text()
    assert text.startswith("#") and "Launch:" in text and "Hardware:" in text
    config = load_config(path)
    specs = baseline_specs(config, tmp_path / "sft", tmp_path)
    for spec in specs:
        check_settings({**spec.run_config(), "data_seed": 0})
    assert {s.rl["anchor"] for s in specs} == {"sft", "ema", "bema", "elastic_reset"}
    assert [s.rl.get("final_policy") for s in specs].count("lawa") == 1
    methods = {p["method"] for p in frontier_document(config, tmp_path / "sft", tmp_path)["policies"]}
    assert methods == {
        "warp_iter1", "sft_anchor", "ema_anchor", "bema_anchor", "elastic_reset_anchor", "ema_anchor_lawa"
    }  # fmt: skip

"""Every shipped config parses: WARP configs into WarpConfig, their rl section through the run's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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

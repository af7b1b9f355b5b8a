"""One RL run resumed after a crash ends bitwise where an uninterrupted run ends: a checkpoint at the last
step is the finished run (no extra step), a damaged checkpoint is skipped for the one before it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from warpkit.loop.checkpoints import RECORD_NAME, resume_point, verify_checkpoint
from warpkit.loop.rl import main

pytestmark = pytest.mark.slow

RUN = {
    "algorithm": "rloo", "reward_funcs": ["warpkit.workloads.default:vader_reward"],
    "dataset": "warpkit.workloads.default:review_prompts", "anchor": "ema", "ema_rate": 0.1, "beta": 0.1,
    "learning_rate": 1.0e-3, "lr_scheduler_type": "constant", "max_steps": 3, "per_device_train_batch_size": 4,
    "num_generations": 2, "max_completion_length": 8, "save_strategy": "steps", "save_steps": 1,
    "logging_steps": 1, "report_to": "none", "use_cpu": True, "bf16": False, "seed": 0, "data_seed": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_model_factory, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run with a checkpoint at every step (the reference)."""
    out = tmp_path_factory.mktemp("run") / "run"
    config = out.parent / "run.yaml"
    config.write_text(
        yaml.safe_dump({**RUN, "model_name_or_path": str(tiny_model_factory()), "output_dir": str(out)})
    )
    main(["--config", str(config)])
    return out


def _rerun(finished_run: Path, tmp_path: Path, damage) -> tuple[Path, dict]:
    """A copy of the finished run, its policy gone (killed before the driver recorded it), damaged, rerun."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "policy")
    (out / "run_info.json").unlink()
    damage(out)
    config = tmp_path / "run.yaml"
    run = yaml.safe_load((finished_run.parent / "run.yaml").read_text())
    config.write_text(yaml.safe_dump({**run, "output_dir": str(out)}))
    main(["--config", str(config)])
    return out, json.loads((out / "run_info.json").read_text())


def _same_policy(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "config.json"):
        assert (a / "policy" / name).read_bytes() == (b / "policy" / name).read_bytes(), name


def test_every_checkpoint_is_recorded(finished_run):
    for step in (1, 2, 3):
        folder = finished_run / f"checkpoint-{step}"
        files = json.loads((folder / RECORD_NAME).read_text())["files"]
        assert files == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != RECORD_NAME}
        assert verify_checkpoint(folder, with_anchor=True) is None


def test_resuming_a_finished_run_trains_no_extra_step(finished_run, tmp_path):
    out, info = _rerun(finished_run, tmp_path, lambda out: None)
    assert info["global_step"] == 3 and info["resumed_from"] == str(out / "checkpoint-3")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    _same_policy(out, finished_run)


def test_a_policy_save_killed_midway_leaves_nothing_after_the_rerun(finished_run, tmp_path):
    """Killed while saving the policy: the rerun publishes the finished checkpoint (never reaching
    save_policy) and still removes the half-written `.policy.tmp-save` (the chaos test found it left)."""

    def half_saved(out: Path) -> None:
        tmp = out / ".policy.tmp-save"
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"\0" * 100)

    out, info = _rerun(finished_run, tmp_path, half_saved)
    assert info["global_step"] == 3 and not (out / ".policy.tmp-save").exists()
    _same_policy(out, finished_run)


@pytest.mark.parametrize("damage", ["truncated weights", "optimizer size", "no trainer_state"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(finished_run, tmp_path, caplog, damage):
    def cut(out: Path) -> None:
        last = out / "checkpoint-3"
        if damage == "truncated weights":
            weights = last / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-1000])
        elif damage == "optimizer size":
            (last / "optimizer.pt").write_bytes((last / "optimizer.pt").read_bytes() + b"\0")
        else:
            (last / "trainer_state.json").unlink()

    with caplog.at_level(logging.WARNING, logger="warpkit"):
        out, info = _rerun(finished_run, tmp_path, cut)
    assert "checkpoint-3 is " in caplog.text and "trying the one before" in caplog.text
    assert info["resumed_from"] == str(out / "checkpoint-2") and info["global_step"] == 3
    _same_policy(out, finished_run)  # step 3 trained again from checkpoint-2: the same bits


def test_resume_point_skips_what_does_not_verify(tmp_path):
    assert resume_point(tmp_path / "missing") is None
    (tmp_path / "checkpoint-5").mkdir()  # cut short before trainer_state.json
    (tmp_path / "checkpoint-x").mkdir()
    assert resume_point(tmp_path) is None
    assert (
        verify_checkpoint(tmp_path / "checkpoint-5", with_anchor=False)
        == "incomplete (no trainer_state.json)"
    )


@pytest.mark.parametrize(
    ("anchor", "settings", "layout"),
    [
        ("elastic_reset", {"reset_every": 2, "ema_rate": 0.3}, "elastic_reset_full"),
        ("bema", {"bema_update_freq": 2, "bema_lag": 1.0}, "bema_full"),
    ],
)
def test_a_relative_of_the_ema_resumed_between_two_of_its_events_ends_bitwise(
    anchor, settings, layout, tiny_model_factory, tmp_path
):
    """Elastic Reset resets after steps 2 and 4, BEMA updates after steps 2 and 4: a run killed before
    checkpoint-4 was written resumes from checkpoint-3 (its anchor state restored) and ends bitwise as the
    uninterrupted run, step 4's reset or update included."""
    run = {
        **RUN,
        "anchor": anchor,
        **settings,
        "max_steps": 4,
        "model_name_or_path": str(tiny_model_factory()),
    }
    out = tmp_path / "full" / "run"
    config = tmp_path / "full.yaml"
    config.write_text(yaml.safe_dump({**run, "output_dir": str(out)}))
    main(["--config", str(config)])
    info = json.loads((out / "run_info.json").read_text())
    assert info["anchor"] == anchor and info["anchor_settings"] == {**info["anchor_settings"], **settings}
    with safe_open(str(out / "checkpoint-3" / "warpkit_anchor.safetensors"), "pt") as f:
        assert f.metadata()["layout"] == layout

    again = tmp_path / "again" / "run"
    shutil.copytree(out, again)
    for gone in ("policy", "checkpoint-4"):
        shutil.rmtree(again / gone)
    (again / "run_info.json").unlink()
    config.write_text(yaml.safe_dump({**run, "output_dir": str(again)}))
    main(["--config", str(config)])
    info = json.loads((again / "run_info.json").read_text())
    assert info["resumed_from"] == str(again / "checkpoint-3") and info["global_step"] == 4
    _same_policy(again, out)

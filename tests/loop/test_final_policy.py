"""`rl.final_policy`: SWA and LAWA publish the uniform mean of the run's checkpoints (recomputed here in float64
from the checkpoint files), bad windows are refused before any model is loaded, and a run killed while
averaging averages again to the same bits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from warpkit.loop.final_policy import saved_steps
from warpkit.loop.rl import check_settings, main

from .test_resume import RUN

SWA = {**RUN, "max_steps": 4, "final_policy": "swa", "swa_start": 2}


def _run(config: dict, out: Path) -> dict:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
    main(["--config", str(path)])
    return json.loads((out / "run_info.json").read_text())


@pytest.fixture(scope="module")
def swa_run(tiny_model_factory, tmp_path_factory) -> tuple[Path, dict]:
    """A 4-step run, a checkpoint every step, its policy the SWA mean of checkpoints 2, 3 and 4."""
    out = tmp_path_factory.mktemp("swa") / "run"
    return out, _run({**SWA, "model_name_or_path": str(tiny_model_factory())}, out)


def _assert_uniform_mean(policy: Path, checkpoints: list[Path]) -> None:
    """policy == (1/k) sum_i theta_i, computed in float64 and rounded once to the checkpoints' dtype."""
    states = [load_file(c / "model.safetensors") for c in checkpoints]
    got = load_file(policy / "model.safetensors")
    assert set(got) == set(states[0])
    for name, value in got.items():
        mean = sum(s[name].double() for s in states) / len(states)
        assert value.dtype == states[0][name].dtype
        torch.testing.assert_close(value.double(), mean, rtol=2**-23, atol=0, msg=name)
    assert any(not torch.equal(got[n], states[-1][n]) for n in got)  # not simply the last weights


@pytest.mark.slow
def test_swa_policy_is_the_float64_mean_of_the_checkpoints_from_swa_start(swa_run):
    out, info = swa_run
    steps = [c["step"] for c in info["final_policy"]["checkpoints"]]
    assert info["final_policy"]["method"] == "swa" and info["final_policy"]["swa_start"] == 2
    assert steps == [2, 3, 4] and info["global_step"] == 4  # the checkpoint at max_steps is included
    paths = [Path(c["path"]) for c in info["final_policy"]["checkpoints"]]
    assert paths == [out / f"checkpoint-{s}" for s in steps]
    _assert_uniform_mean(out / "policy", paths)
    assert not list(out.glob(".policy.tmp*"))
    assert not (out / "policy" / "trainer_state.json").exists()
    assert (out / "policy" / "config.json").is_file()


@pytest.mark.slow
def test_lawa_policy_is_the_mean_of_the_last_k_checkpoints(swa_run, tmp_path):
    """The same trained run with final_policy: lawa (a finished run: nothing trained, only averaged)."""
    out = tmp_path / "run"
    shutil.copytree(swa_run[0], out)
    config = yaml.safe_load((swa_run[0].parent / "run.yaml").read_text())
    config = {k: v for k, v in config.items() if k != "swa_start"}
    info = _run({**config, "final_policy": "lawa", "lawa_k": 2}, out)
    assert info["final_policy"]["method"] == "lawa" and info["final_policy"]["lawa_k"] == 2
    assert [c["step"] for c in info["final_policy"]["checkpoints"]] == [3, 4]
    _assert_uniform_mean(out / "policy", [out / "checkpoint-3", out / "checkpoint-4"])


@pytest.mark.slow
def test_a_run_killed_while_averaging_averages_again_to_the_same_bits(swa_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(swa_run[0], out)
    shutil.rmtree(out / "policy")
    (out / "run_info.json").unlink()
    half = out / ".policy.tmp-average"  # the soup's temp folder, cut short
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    config = yaml.safe_load((swa_run[0].parent / "run.yaml").read_text())
    info = _run(config, out)
    assert info["resumed_from"] == str(out / "checkpoint-4") and info["global_step"] == 4
    assert not half.exists()
    for name in ("model.safetensors", "config.json"):
        assert (out / "policy" / name).read_bytes() == (swa_run[0] / "policy" / name).read_bytes(), name


def test_saved_steps_follow_transformers():
    class Args:
        max_steps, save_steps = 10, 3

    assert saved_steps(Args) == [3, 6, 9, 10]
    Args.save_steps = 0.5  # a fraction of max_steps, rounded up
    assert saved_steps(Args) == [5, 10]


BASE = {**RUN, "model_name_or_path": "unused", "output_dir": "unused"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"final_policy": "ema"}, r"final_policy='ema': choose 'last'"),
        ({"final_policy": "swa"}, r"swa_start=None: final_policy='swa' needs swa_start >= 1"),
        ({"final_policy": "swa", "swa_start": 0}, r"swa_start=0: final_policy='swa' needs swa_start >= 1"),
        ({"final_policy": "lawa", "lawa_k": 0}, r"lawa_k=0: final_policy='lawa' needs lawa_k >= 1"),
        ({"lawa_k": 2}, r"lawa_k=2 is set but final_policy='last'"),
        (
            {"final_policy": "swa", "swa_start": 4},
            r"swa_start=4 is after the run's last step \(max_steps=3\)",
        ),
        ({"final_policy": "lawa", "lawa_k": 4}, r"lawa_k=4 is more checkpoints than the run saves \(3: "),
        (
            {"final_policy": "lawa", "lawa_k": 3, "save_steps": 2},
            r"lawa_k=3 is more checkpoints than the run saves \(2: steps \[2, 3\]",
        ),
        (
            {"final_policy": "swa", "swa_start": 1, "save_total_limit": 2},
            r"save_total_limit=2 would delete checkpoints .* needs the last 3\)\. Set save_total_limit >= 3",
        ),
        ({"final_policy": "lawa", "lawa_k": 2, "max_steps": -1}, r"max_steps=-1 with final_policy='lawa'"),
        ({"final_policy": "lawa", "lawa_k": 1, "save_strategy": "no"}, r"save_strategy=.* set save_strategy"),
        ({"final_policy": "swa", "swa_start": 1, "use_peft": True}, r"use_peft is true: the mean of LoRA"),
    ],
)
def test_bad_windows_are_refused_when_the_settings_are_parsed(fields, message):
    with pytest.raises(ValueError, match=message):
        check_settings({**BASE, **fields})


def test_good_windows_pass():
    assert check_settings({**BASE, "final_policy": "lawa", "lawa_k": 3, "save_total_limit": 3}).lawa_k == 3
    assert check_settings({**BASE, "final_policy": "swa", "swa_start": 3}).swa_start == 3

"""The WARP loop: artefacts, hand-checked merge and LITI, resumability, crashes, bad input, GPU placement."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.loop.conftest import warpkit_cli
from tests.loop.fakes import fake_policy_state, fake_train, tiny_config
from warpkit.loop import driver
from warpkit.loop.config import WarpConfig, load_config
from warpkit.loop.driver import run_warp
from warpkit.loop.launch import gpu_slots
from warpkit.loop.manifest import MANIFEST_NAME, Manifest

REPO = Path(__file__).resolve().parents[2]


def slerp2_reference(init: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """WARP's SLERP of two task vectors in float64 (WARP.md, stage 2), per tensor."""
    d1, d2 = (a.double() - init.double()).flatten(), (b.double() - init.double()).flatten()
    cos = (d1 @ d2 / (d1.norm() * d2.norm())).clamp(-1, 1)
    omega = torch.arccos(cos)
    c1, c2 = torch.sin((1 - lam) * omega) / torch.sin(omega), torch.sin(lam * omega) / torch.sin(omega)
    return init.double() + (c1 * d1 + c2 * d2).reshape(init.shape)


@pytest.fixture
def sft(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", True)


def test_loop_artefacts_merge_and_liti_by_hand(sft, tmp_path, caplog):
    calls = []

    def train(spec, env):
        calls.append((spec.key, spec.init, spec.data_seed))
        fake_train(spec, env)

    final = run_warp(tiny_config(tmp_path / "out", sft), train_fn=train)
    out = (tmp_path / "out").resolve()

    # M runs per iteration, each from that iteration's init, with distinct data seeds.
    assert calls == [
        ("iter_1/run_1", sft, 0),
        ("iter_1/run_2", sft, 1),
        ("iter_2/run_1", out / "iter_1" / "next_init", 2),
        ("iter_2/run_2", out / "iter_1" / "next_init", 3),
    ]
    assert final == out / "iter_2" / "next_init"

    # Iteration 1 by hand: SLERP (lambda = 1/2, per tensor) of the two policies, then LITI with eta = 0.3.
    init = load_file(str(sft / "model.safetensors"))
    p1, p2 = fake_policy_state(sft, 0), fake_policy_state(sft, 1)
    merged = load_file(str(out / "iter_1" / "merged" / "model.safetensors"))
    next_init = load_file(str(out / "iter_1" / "next_init" / "model.safetensors"))
    for name, w in init.items():
        expected_merge = slerp2_reference(w, p1[name], p2[name])
        torch.testing.assert_close(merged[name].double(), expected_merge, rtol=0, atol=2e-6)
        expected_liti = 0.7 * w.double() + 0.3 * merged[name].double()
        torch.testing.assert_close(next_init[name].double(), expected_liti, rtol=0, atol=2e-6)
        if w.numel() > 100_000:  # the embedding: noise task vectors of equal norm, ~90 degrees apart
            d, d1 = merged[name].double() - w.double(), p1[name].double() - w.double()
            assert d.norm() == pytest.approx(d1.norm().item(), rel=0.01)  # SLERP keeps it; LERP: x 0.71

    # The next iteration's init is a complete save_pretrained folder with the init's config and tokenizer.
    assert {"config.json", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in (out / "iter_1" / "next_init").iterdir()
    }
    # The geometry the merge logged: one angle per tensor (granularity "tensor"), each the angle of the two
    # task vectors, ~90 degrees for independent noise; the manifest keeps the means.
    stats = json.loads((out / "iter_1" / "merge_stats.json").read_text())
    floating = [n for n, w in init.items() if w.is_floating_point() and n != "lm_head.weight"]
    assert {k.rsplit("/", 1)[0] for k in stats if k.endswith("/angle_deg")} == {
        f"merge/{n}" for n in floating
    }
    for n in floating:
        d1, d2 = (p1[n].double() - init[n].double()).flatten(), (p2[n].double() - init[n].double()).flatten()
        angle = math.degrees(math.acos(float(d1 @ d2 / (d1.norm() * d2.norm()))))
        assert stats[f"merge/{n}/angle_deg"] == pytest.approx(angle, abs=1e-3), n
    manifest = Manifest(out / MANIFEST_NAME)
    assert set(manifest.steps) == {
        "iter_1/run_1", "iter_1/run_2", "iter_1/merge", "iter_2/run_1", "iter_2/run_2", "iter_2/merge",
        "final_init",
    }  # fmt: skip

    # Running the same command again does no work and says so.
    caplog.set_level(logging.INFO, logger="warpkit")
    caplog.clear()
    calls.clear()
    assert run_warp(tiny_config(tmp_path / "out", sft), train_fn=train) == final
    assert calls == []
    assert "nothing to do" in caplog.text


def test_tampered_output_is_redone_and_downstream_kept(sft, tmp_path):
    run_warp(tiny_config(tmp_path / "out", sft), train_fn=fake_train)
    out = tmp_path / "out"
    final = out / "iter_2" / "next_init" / "model.safetensors"
    before = final.read_bytes()
    # Corrupt iteration 2's first policy: that run is retrained; the rest is verified and kept.
    policy = out / "iter_2" / "run_1" / "policy" / "model.safetensors"
    policy.write_bytes(policy.read_bytes()[:-8] + b"\0" * 8)
    retrained = []
    run_warp(tiny_config(out, sft), train_fn=lambda s, e: retrained.append(s.key) or fake_train(s, e))
    assert retrained == ["iter_2/run_1"]
    assert final.read_bytes() == before  # merges are bitwise reproducible from the same run outputs


def test_changed_eta_redoes_merges_and_later_runs(sft, tmp_path):
    run_warp(tiny_config(tmp_path / "out", sft), train_fn=fake_train)
    retrained = []
    cfg = tiny_config(tmp_path / "out", sft)
    cfg.liti_eta = 0.5
    run_warp(cfg, train_fn=lambda s, e: retrained.append(s.key) or fake_train(s, e))
    assert retrained == ["iter_2/run_1", "iter_2/run_2"]  # iteration 2 starts from a different init


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["run", "merge", "between"])
def test_killed_driver_resumes_to_the_same_final_init(sft, tmp_path, crash):
    """kill -9 at a point of the loop, rerun the same command, compare with an uninterrupted run bitwise."""
    script = str(REPO / "tests" / "loop" / "fakes.py")
    env_cmd = [sys.executable, script]
    clean = subprocess.run([*env_cmd, str(tmp_path / "clean"), str(sft)], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    crashed = subprocess.run(
        [*env_cmd, str(tmp_path / "crash"), str(sft), crash], capture_output=True, text=True
    )
    assert crashed.returncode == -9, f"expected a SIGKILL at {crash}: {crashed.stderr[-2000:]}"
    assert not (tmp_path / "crash" / "iter_2" / "next_init").exists()
    resumed = subprocess.run([*env_cmd, str(tmp_path / "crash"), str(sft)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ["iter_1/merged", "iter_1/next_init", "iter_2/next_init"]:
        a = load_file(str(tmp_path / "clean" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "crash" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        ("model_name_or_path: m\nnum_polices: 2\n", [], r"unknown field\(s\) \['num_polices'\]"),
        ("model_name_or_path: m\nnum_policies: 0\n", [], "M must be at least 1"),
        ("model_name_or_path: m\nliti_eta: 1.5\n", [], "outside \\[0, 1\\]"),
        ("model_name_or_path: m\n", ["--liti_eta", "-0.1"], "outside \\[0, 1\\]"),
        ("model_name_or_path: m\niterations: 0\n", [], "at least one iteration"),
        ("model_name_or_path: m\nrl: {output_dir: x}\n", [], "set by the driver"),
        ("iterations: 2\n", [], "model_name_or_path is required"),
    ],
)
def test_bad_config_is_refused(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        load_config(path, overrides)


def test_overrides_reach_nested_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nrl: {beta: 0.1}\n")
    cfg = load_config(
        path, ["--iterations", "3", "--rl.beta=0.05", "--rl.max_steps", "7", "--front_etas", "[0, 0.5]"]
    )
    assert (cfg.iterations, cfg.rl, cfg.front_etas) == (3, {"beta": 0.05, "max_steps": 7}, [0, 0.5])
    assert load_config(path, ["--liti_eta", "1.5", "--allow_extrapolation", "true"]).liti_eta == 1.5


def _never(spec, env):
    pytest.fail("training started despite bad input")


def test_missing_model_is_refused_before_any_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        run_warp(tiny_config(tmp_path / "o", tmp_path / "missing"), train_fn=_never)


@pytest.mark.parametrize(
    ("rl", "message"),
    [
        ({"beta": 0.0}, "beta=0 with anchor='ema'"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"algorithm": "ppo"}, "algorithm='ppo'"),
        ({"ema_rate": 1.5}, "ema_rate=1.5"),
    ],
)
def test_bad_rl_fields_are_refused_before_any_training(sft, tmp_path, rl, message):
    cfg = tiny_config(tmp_path / "o", sft, rl={"use_cpu": True, **rl})
    with pytest.raises(ValueError, match=message):
        run_warp(cfg, train_fn=_never, validate=driver.validate_rl_section)


# ----------------------------------------------------------------------------- GPU placement


def test_gpu_slots():
    assert gpu_slots(0, 1) == [[]]
    assert gpu_slots(1, 2) == [[]]
    assert gpu_slots(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert gpu_slots(3, 1) == [[0], [1], [2]]
    assert gpu_slots(5, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        gpu_slots(4, 0)


def test_runs_go_side_by_side_on_disjoint_gpus(sft, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "visible_gpus", lambda: 4)
    seen, lock, active, peak = [], threading.Lock(), [0], [0]

    def train(spec, env):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            seen.append((spec.key, env["CUDA_VISIBLE_DEVICES"], env["WARPKIT_PORT"]))
        time.sleep(0.3)
        fake_train(spec, env)
        with lock:
            active[0] -= 1

    cfg = tiny_config(tmp_path / "o", sft, gpus_per_run=2)
    cfg.iterations, cfg.num_policies = 1, 3
    run_warp(cfg, train_fn=train)
    assert peak[0] == 2  # two slots of two GPUs; the third run waits for a free slot
    assert {gpus for _, gpus, _ in seen} == {"0,1", "2,3"}
    for _key, gpus, port in seen:
        assert port == {"0,1": "29500", "2,3": "29501"}[gpus]


def test_config_docstring_covers_every_field():
    import dataclasses

    for f in dataclasses.fields(WarpConfig):
        assert f"{f.name}:" in WarpConfig.__doc__, f.name
    assert math.isclose(WarpConfig(model_name_or_path="m").liti_eta, 0.3)


# ----------------------------------------------------------------------------- real runs through accelerate


@pytest.mark.slow
def test_warp_tiny_end_to_end_through_accelerate(warp_tiny_run):
    """`warpkit train configs/warp_tiny.yaml`: I=2, M=2 real RLOO runs, each an `accelerate launch` subprocess."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, first, hermetic_env = warp_tiny_run
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = json.loads((out / "warp_manifest.json").read_text())["steps"]
    assert {f"iter_{i}/run_{m}" for i in (1, 2) for m in (1, 2)} <= set(manifest)
    for i in (1, 2):
        for m in (1, 2):
            info = json.loads((out / f"iter_{i}" / f"run_{m}" / "run_info.json").read_text())
            assert (info["global_step"], info["anchor"], info["data_seed"]) == (3, "ema", (i - 1) * 2 + m - 1)
            # one run at a time on CPU: each gets every core (accelerate alone would give it one thread)
            assert info["cpu_threads_per_process"] == len(os.sched_getaffinity(0)), info
            assert (out / f"iter_{i}" / f"run_{m}" / "checkpoint-3" / "trainer_state.json").is_file()
    # The baseline trained I * T steps from the SFT init, with a checkpoint every T steps.
    baseline = out / "baselines" / "sft_anchor_beta0_1"
    info = json.loads((baseline / "run_info.json").read_text())
    assert (info["global_step"], info["anchor"]) == (6, "sft")
    assert {p.name for p in baseline.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    # The frontier of the run's own artefacts: both WARP iterations' LITI fronts and the baseline trajectory.
    frontier = json.loads((out / "frontier" / "frontier.json").read_text())
    names = {p["name"] for p in frontier["points"]}
    assert {"warp-iter1/eta=0.5", "warp-iter2/eta=1", "sft_anchor_beta0_1/step=6"} <= names, names
    assert (out / "frontier" / "frontier.png").stat().st_size > 10_000
    # The final init is a real model: it loads and generates.
    final = out / "iter_2" / "next_init"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = model.generate(**tokenizer(["the film is"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert ids.shape[1] == len(tokenizer("the film is").input_ids) + 4
    logs = {p: p.stat().st_size for p in out.rglob("train.log")}

    again = warpkit_cli("train", "configs/warp_tiny.yaml", "--output_dir", str(out), env=hermetic_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr and "frontier: done (manifest)" in again.stderr
    assert {p: p.stat().st_size for p in out.rglob("train.log")} == logs  # no run was launched


@pytest.mark.slow
def test_run_with_two_cpu_processes(tmp_path, hermetic_env):
    """One WARP iteration whose run uses the CPU multi-process accelerate config (2 processes, gloo)."""
    import json

    out = tmp_path / "warp2"
    result = warpkit_cli(
        "train", "configs/warp_tiny.yaml", "--output_dir", str(out), "--iterations", "1", "--num_policies", "1",
        "--accelerate_config", "accelerate_configs/cpu_multi_process.yaml", "--num_processes", "2",
        "--rl.per_device_train_batch_size", "2", "--rl.max_steps", "2",
        env=hermetic_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    info = json.loads((out / "iter_1" / "run_1" / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["global_step"] == 2
    assert (out / "iter_1" / "next_init" / "config.json").is_file()


def test_baselines_train_from_sft_with_equal_sequential_budget(sft, tmp_path):
    seen = {}

    def train(spec, env):
        seen[spec.key] = (spec.init, spec.run_config())
        fake_train(spec, env)

    cfg = tiny_config(
        tmp_path / "o",
        sft,
        rl={"beta": 0.1, "max_steps": 5},
        baselines=[
            {"name": "sft_beta0_1", "rl": {"anchor": "sft"}},
            {"name": "ema_long", "rl": {"max_steps": 7}},
        ],
    )
    run_warp(cfg, train_fn=train)
    assert set(seen) == {f"iter_{i}/run_{m}" for i in (1, 2) for m in (1, 2)} | {
        "baselines/sft_beta0_1", "baselines/ema_long",
    }  # fmt: skip
    init, run = seen["baselines/sft_beta0_1"]
    assert init == sft and run["anchor"] == "sft" and run["beta"] == 0.1
    assert (run["max_steps"], run["save_steps"], run["save_total_limit"]) == (10, 5, None)  # I * T, every T
    assert run["save_strategy"] == "steps"
    assert seen["baselines/ema_long"][1]["max_steps"] == 7  # an explicit budget is kept
    assert seen["iter_1/run_1"][1]["max_steps"] == 5
    assert (tmp_path / "o" / "baselines" / "ema_long" / "policy" / "model.safetensors").is_file()
    seen.clear()
    run_warp(cfg, train_fn=train)
    assert seen == {}  # resumable like the WARP runs


def test_bad_baselines_are_refused(sft, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        tiny_config(tmp_path, sft, baselines=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="name: <identifier>"):
        tiny_config(tmp_path, sft, baselines=[{"name": "a", "beta": 0.1}])
    cfg = tiny_config(tmp_path, sft, rl={"use_cpu": True}, baselines=[{"name": "b", "rl": {"beta": 0.0}}])
    with pytest.raises(ValueError, match=r"invalid baselines\[b\].rl: beta=0"):
        driver.validate_rl_section(cfg)


def test_other_merge_methods_and_their_settings_reach_the_engine(sft, tmp_path):
    import json

    from warpkit.merge.writer import RECIPE_NAME

    cfg = tiny_config(tmp_path / "o", sft, merge_method="ties", merge_kwargs={"density": 0.5})
    cfg.iterations = 1
    run_warp(cfg, train_fn=fake_train)
    recipe = json.loads((tmp_path / "o" / "iter_1" / "merged" / RECIPE_NAME).read_text())
    assert (recipe["method"], recipe["density"], recipe["trim_scope"]) == ("ties", 0.5, "tensor")
    with pytest.raises(ValueError, match="merge_kwargs"):
        tiny_config(tmp_path, sft, merge_kwargs={"denisty": 0.5})
    with pytest.raises(ValueError, match="merge_method='sum'"):
        tiny_config(tmp_path, sft, merge_method="sum")

"""The driver never loses work and never trusts what it should not: one driver per output_dir, stale
temporaries cleaned, fail fast with the cause, everything a config names checked before the first run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.loop.fakes import fake_train, tiny_config
from warpkit._util.config import ConfigError
from warpkit._util.files import OutputLocked, temp_prefix
from warpkit.loop.driver import run_warp, validate_rl_section
from warpkit.loop.launch import RunFailedError, failure_message
from warpkit.loop.manifest import MANIFEST_NAME, Manifest
from warpkit.loop.preflight import LOCK_NAME


@pytest.fixture
def sft(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", True)


def _read_only_folder(tmp_path: Path) -> Path:
    """A read-only folder that stays read-only for root too: a read-only tmpfs (skip where mount is denied)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    return folder


def _never(spec, env):
    pytest.fail("training started despite bad input")


def test_a_second_driver_is_refused_at_once_naming_the_holder(sft, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "from warpkit._util.files import hold_lock\nimport sys, time\n"
         f"with hold_lock({str(out / LOCK_NAME)!r}, 'x'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=rf"output_dir {out} is in use by pid {holder.pid} on "):
            run_warp(tiny_config(out, sft), train_fn=_never)
    finally:
        holder.kill()
        holder.wait()
    # Killed (kill -9): the OS released its lock; the next driver runs.
    assert run_warp(tiny_config(out, sft), train_fn=fake_train) == (out / "iter_2" / "next_init").resolve()


def test_stale_temporaries_of_a_killed_run_are_removed(sft, tmp_path, caplog):
    out = tmp_path / "out"
    run_warp(tiny_config(out, sft), train_fn=fake_train)
    dead = subprocess.run(
        [sys.executable, "-c", "from warpkit._util.files import temp_prefix; print(temp_prefix('merged'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (out / "iter_1" / f"{dead}x").mkdir()
    (out / "iter_1" / f"{dead}x" / "model.safetensors").write_bytes(b"a model-sized temporary")
    live = out / "iter_1" / f"{temp_prefix('merged')}mine"  # this process: kept
    live.mkdir()
    with caplog.at_level(logging.INFO, logger="warpkit"):
        run_warp(tiny_config(out, sft), train_fn=_never)  # nothing to redo
    assert not (out / "iter_1" / f"{dead}x").exists() and live.exists()
    assert "left by an interrupted run" in caplog.text


@pytest.mark.parametrize("kind", ["file", "read-only", "foreign"])
def test_output_dirs_warpkit_cannot_own_are_refused(sft, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
        message = r"output_dir=.*out is a file"
    elif kind == "read-only":
        out = _read_only_folder(tmp_path) / "out"
        message = r"output_dir=.*out cannot be written \(.* is read-only\)"
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("not warpkit's")
        message = r"exists and is not a warpkit train output"
    try:
        with pytest.raises(ConfigError, match=message):
            run_warp(tiny_config(out, sft), train_fn=_never)
    finally:
        if kind == "read-only":
            subprocess.run(["umount", str(out.parent)], check=False, capture_output=True)
            out.parent.chmod(0o755)
    if kind == "foreign":
        assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_failed_run_stops_its_iteration_with_the_cause(sft, tmp_path):
    started = []

    def train(spec, env):
        started.append(spec.key)
        if spec.key == "iter_1/run_1":
            log = spec.output_dir / "train.log"
            log.write_text(
                "step 1\nTraceback (most recent call last):\n  File x\nValueError: reward exploded\n"
            )
            raise RunFailedError(failure_message(spec.key, 1, log))
        fake_train(spec, env)

    with pytest.raises(
        RunFailedError, match=r"^iter_1/run_1 failed \(exit 1\): ValueError: reward exploded\nlog: "
    ):
        run_warp(tiny_config(tmp_path / "out", sft), train_fn=train)
    assert started == ["iter_1/run_1"]  # run_2 never launched
    assert set(Manifest(tmp_path / "out" / MANIFEST_NAME).steps) == set()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rl": {"use_cpu": True, "reward_funcs": ["tests.no_such_module:f"]}}, r"invalid rl: reward .* cannot be imported"),
        ({"rl": {"use_cpu": True, "dataset": "nowhere/prompts.jsonl"}}, r"invalid rl: dataset 'nowhere/prompts\.jsonl' is neither"),
        ({"rl": {"use_cpu": True, "max_steps": 0}}, r"invalid rl: max_steps=0 trains nothing"),
        ({"rl": {"use_cpu": True}, "accelerate_config": "no/such.yaml"}, r"accelerate_config file no/such\.yaml does not exist"),
        ({"rl": {"use_cpu": True}, "frontier": {"num_prompts": "all"}}, r"frontier\.num_prompts: 'all' matches none of"),
        ({"rl": {"use_cpu": True}, "frontier": {"reward": "tests.nope:f"}}, r"frontier: reward 'tests\.nope:f' cannot be imported"),
        (
            {"rl": {"use_cpu": True}, "frontier_policies": [{"name": "m1", "method": "warp_m1", "path": "no/such"}]},
            r"frontier_policies: policy 'm1' 'no/such' is not a folder",
        ),
        (
            {"rl": {"use_cpu": True}, "frontier": {"compare": [["warp_iter1", "nope"]]}},
            r"compare entry \['warp_iter1', 'nope'\] must be two of the methods \['sft', 'warp_iter1'",
        ),
    ],
)  # fmt: skip
def test_what_a_config_names_is_checked_before_the_first_run(sft, tmp_path, change, message):
    config = tiny_config(tmp_path / "out", sft, **change)
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        run_warp(config, train_fn=_never, validate=validate_rl_section)
    assert not (tmp_path / "out").exists()


def test_compare_may_name_the_drivers_own_methods(sft, tmp_path):
    """`frontier.compare` names WARP's iterations and the baselines, which exist only once trained: the
    preflight checks it against the methods the driver will add (the demo's config compares those)."""
    baselines = [{"name": "sft_b", "rl": {"anchor": "sft"}}, {"name": "ema_b"}]
    compare = [["warp_iter1", "sft_anchor"], ["warp_iter1", "ema_anchor"], ["warp_iter1", "sft"]]
    config = tiny_config(
        tmp_path / "out", sft, rl={"use_cpu": True}, baselines=baselines, frontier={"compare": compare}
    )
    validate_rl_section(config)  # raises on a method it does not know


def test_a_pickled_init_is_refused_before_the_first_run(sft, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(sft, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model_name_or_path=.*pickled.* holds only pickled weights"):
        run_warp(tiny_config(tmp_path / "out", pickled), train_fn=_never)
    assert not (tmp_path / "out").exists()


def test_failure_message_names_the_last_error_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "\n".join(["noise"] * 30 + ["RuntimeError: first", "more noise", "KeyError: 'prompt'", "end"])
    )
    message = failure_message("iter_2/run_1", 3, log, lines=2)
    assert (
        message
        == f"iter_2/run_1 failed (exit 3): KeyError: 'prompt'\nlog: {log}, last lines:\nKeyError: 'prompt'\nend"
    )
    assert failure_message("r", 1, tmp_path / "none.log").startswith(
        "r failed (exit 1): no error line in the log"
    )

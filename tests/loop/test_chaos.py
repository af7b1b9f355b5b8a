"""Chaos: `warpkit train configs/warp_tiny.yaml` killed with SIGKILL of its whole process group at moments
spread over training, checkpoint writes, policy saves, merges, LITI, baselines and the frontier, rerun
after each kill; the final init is bitwise the uninterrupted run's, no temporary remains, and the manifest
vouches for every output.

Each kill waits for its phase to be visible on disk (a run's log growing, a checkpoint folder without its
trainer_state.json, a merge's temporary folder, ...) and then a seeded random delay, so the moments are
random but spread over the whole run. Replay a failure with WARPKIT_CHAOS_SEED=<seed printed>.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.loop.conftest import REPO
from warpkit._util.files import TMP_MARK, tree_digest
from warpkit.loop.manifest import MANIFEST_NAME, Manifest
from warpkit.testing import load_state

pytestmark = pytest.mark.slow

Phase = Callable[[Path], bool]


def _any(out: Path, pattern: str) -> bool:
    return any(True for _ in out.glob(pattern))


def _log_started(run: str) -> Phase:
    return lambda out: (out / run / "train.log").is_file() and (out / run / "train.log").stat().st_size > 2000


def _checkpoint_being_written(out: Path) -> bool:
    return any(not (c / "trainer_state.json").exists() for c in out.glob("*/*/checkpoint-*"))


# (name, what must be visible on disk, the longest random delay after it in seconds), in the run's order.
PHASES: list[tuple[str, Phase, float]] = [
    ("training iter_1/run_1", _log_started("iter_1/run_1"), 6.0),
    ("a checkpoint being written", _checkpoint_being_written, 0.02),
    ("a policy being saved", lambda out: _any(out, "iter_1/run_*/.policy.tmp-*"), 0.05),
    ("training iter_1/run_2", _log_started("iter_1/run_2"), 4.0),
    ("merging iteration 1", lambda out: _any(out, "iter_1/.merged.tmp-*"), 0.05),
    ("LITI of iteration 1", lambda out: _any(out, "iter_1/.next_init.tmp-*"), 0.05),
    ("training iter_2/run_1", _log_started("iter_2/run_1"), 6.0),
    ("a checkpoint being written", _checkpoint_being_written, 0.02),
    ("merging iteration 2", lambda out: _any(out, "iter_2/.merged.tmp-*"), 0.05),
    ("training the baseline", _log_started("baselines/sft_anchor_beta0_1"), 6.0),
    ("the frontier", lambda out: (out / "frontier.yaml").is_file(), 3.0),
]


def _start(out: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "warpkit.cli", "train", "configs/warp_tiny.yaml", "--output_dir", str(out)]
    log = open(out.parent / "chaos.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)


def _wait_for(phase: Phase, out: Path, proc: subprocess.Popen, timeout: float = 600) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if out.is_dir() and phase(out):
            return True
        time.sleep(0.005)
    return False


def _vouched(out: Path) -> None:
    """Every output the manifest records exists and hashes as recorded."""
    steps = Manifest(out / MANIFEST_NAME).steps
    for key, record in steps.items():
        for name, digest in record["outputs"].items():
            folder = out / key / name if (out / key / name).is_dir() else out / Path(key).parent / name
            assert tree_digest(folder) == digest, f"{key}: {folder} is not what the manifest recorded"


def test_killed_at_random_moments_the_loop_ends_bitwise_where_it_would_have(warp_tiny_run, tmp_path):
    reference, finished, env = warp_tiny_run
    assert finished.returncode == 0, finished.stderr[-3000:]
    seed = int(os.environ.get("WARPKIT_CHAOS_SEED", "0"))
    rng = random.Random(seed)
    out = tmp_path / "warp"
    kills: list[str] = []
    proc = _start(out, env)
    for name, phase, delay in PHASES:
        if not _wait_for(phase, out, proc):
            break  # the run finished before this phase could be caught
        time.sleep(rng.uniform(0, delay))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(name)
        proc = _start(out, env)
    assert proc.wait(timeout=1200) == 0, (tmp_path / "chaos.log").read_text()[-3000:]
    print(f"seed {seed}: killed during {kills}")
    assert len(kills) >= 8, f"seed {seed}: only {len(kills)} kills landed: {kills}"

    for name in ("iter_1/next_init", "iter_2/next_init"):
        got, want = load_state(out / name), load_state(reference / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    leftovers = [p for p in out.rglob("*") if TMP_MARK in p.name or p.name.startswith(".tmp")]
    assert leftovers == [], f"seed {seed}: temporaries left: {leftovers}"
    _vouched(out)

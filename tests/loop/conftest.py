"""The uninterrupted `warpkit train configs/warp_tiny.yaml` run, shared by the end-to-end test and the chaos
test (which compares its killed-and-resumed runs with it bit for bit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def warpkit_cli(*args: str, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    """`python -m warpkit.cli ARGS` from the repository root, output captured."""
    cmd = [sys.executable, "-m", "warpkit.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def hermetic(cache: Path) -> dict[str, str]:
    """This checkout first on the path, a private model cache, offline, one thread per process."""
    return {
        **os.environ,
        "WARPKIT_CACHE": str(cache),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def hermetic_env(tmp_path) -> dict[str, str]:
    return hermetic(tmp_path / "cache")


@pytest.fixture(scope="session")
def warp_tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict[str, str]]:
    """(output_dir, the finished process, its env) of one uninterrupted `warpkit train configs/warp_tiny.yaml`."""
    root = tmp_path_factory.mktemp("warp_tiny")
    env = hermetic(root / "cache")
    out = root / "warp"
    return out, warpkit_cli("train", "configs/warp_tiny.yaml", "--output_dir", str(out), env=env), env

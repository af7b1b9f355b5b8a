"""Every shipped Fuse-to-Forget config parses and opens with its purpose, hardware and launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from warpkit.forget.config import load_forget_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [*sorted(REPO.glob("configs/forget_*.yaml")), REPO / "experiments" / "fuse_to_forget.yaml"]


def test_configs_exist():
    assert [p.name for p in CONFIGS] == ["forget_warp_tiny.yaml", "fuse_to_forget.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_forget_config_parses(path, monkeypatch, tmp_path):
    text = path.read_text()
    assert text.startswith("#") and "Launch" in text and "Hardware:" in text
    monkeypatch.setenv("WARP_DIR", str(tmp_path))
    monkeypatch.setenv("FUSE_TO_FORGET_MODELS", str(tmp_path))
    config = load_forget_config(path)
    assert str(tmp_path) in next(iter(config.models.values())) and config.fusions and config.fisher

"""A LoRA adapter is merged only onto the base it was trained on (`warpkit.merge.lora_base`): the rules on
`base_model_name_or_path`, a real peft adapter of another same-shaped model refused with both bases named,
and the explicit opt-out (`lora_base_ok`, `--lora-base-ok`) recorded in the recipe."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from warpkit.cli import main
from warpkit.merge.folders import merge_folders
from warpkit.merge.lora_base import same_base
from warpkit.testing import load_state


def test_same_base_rules(tmp_path, monkeypatch):
    init = tmp_path / "runs" / "sft"
    init.mkdir(parents=True)
    (tmp_path / "copy").mkdir()
    (tmp_path / "link").symlink_to(init, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    # 1. nothing recorded: nothing to compare
    assert same_base(None, init, {}) and same_base("", init, {})
    # 2. an existing folder: the init's folder, however spelled; any other folder is another model
    for spelled in (str(init), "runs/sft", "runs/../runs/sft/", "link", str(tmp_path / "link")):
        assert same_base(spelled, init, {}), spelled
    assert not same_base("copy", init, {}) and not same_base(str(tmp_path / "copy"), init, {})
    # 3. a Hub id or another machine's path: the init's _name_or_path, its HF cache id, else its folder name
    assert same_base("Qwen/Qwen2.5-1.5B", init, {"_name_or_path": "Qwen/Qwen2.5-1.5B"})
    assert not same_base("Qwen/Qwen2.5-0.5B", init, {"_name_or_path": "Qwen/Qwen2.5-1.5B"})
    cache = tmp_path / "hub" / "models--Qwen--Qwen2.5-1.5B" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    assert same_base("Qwen/Qwen2.5-1.5B", cache, {}) and not same_base("Qwen/Qwen2.5-7B", cache, {})
    assert same_base("/home/someone/runs/sft", init, {})  # last resort: the same folder name
    assert not same_base("/home/someone/runs/other", init, {})
    assert not same_base("meta-llama/Llama-3.2-1B", init, {})


def _peft_adapter(base: Path, folder: Path) -> Path:
    """A trained-looking LoRA adapter (B != 0) of `base`, saved by peft (it records base's path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


def test_an_adapter_of_another_base_is_refused_unless_said_to_be_the_same(tiny_model_factory, tmp_path):
    init, other, b = (tiny_model_factory("llama", True, s) for s in (0, 1, 2))  # same shapes, other weights
    adapter = _peft_adapter(other, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(other)
    with pytest.raises(ValueError, match=rf"^model 0 \({adapter}\) is a LoRA adapter of '{other}' "
                       rf"\(base_model_name_or_path in its adapter_config\.json\), but the init is {init}: .*"
                       r"Pass its base as the init, or, if .* is the same model .*, pass lora_base_ok=True "
                       r"\(CLI: --lora-base-ok\)\.$"):  # fmt: skip
        merge_folders("slerp", init, [adapter, b], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    args = ["merge", "--init", str(init), "--models", str(adapter), str(b), "--no-progress"]
    with pytest.raises(SystemExit, match="--lora-base-ok"):
        main([*args, "--out", str(tmp_path / "cli")])

    # The user says it is the same model: merged, and the recipe says so.
    assert main([*args, "--out", str(tmp_path / "cli"), "--lora-base-ok"]) == 0
    recipe = json.loads((tmp_path / "cli" / "warpkit_merge.json").read_text())
    assert recipe["lora_base_ok"] is True
    assert recipe["models"][0]["kind"] == "lora" and recipe["models"][0]["base_model_name_or_path"] == str(
        other
    )
    # ... and onto its own base it merges without being asked.
    own = merge_folders("slerp", other, [adapter, b], tmp_path / "own", progress=False)
    assert own.recipe["lora_base_ok"] is False
    assert any(s.norms[0] > 1e-3 for s in own.stats.values())  # the adapter moved the weights


def test_a_copy_of_the_base_needs_the_opt_out_and_merges_identically(tiny_model_factory, tmp_path):
    base, b = tiny_model_factory("llama", True, 0), tiny_model_factory("llama", True, 2)
    adapter = _peft_adapter(base, tmp_path / "adapter")
    copy = Path(shutil.copytree(base, tmp_path / "copy-of-base"))
    with pytest.raises(ValueError, match="is a LoRA adapter of"):
        merge_folders("lerp", copy, [adapter, b], tmp_path / "x", progress=False)
    on_copy = merge_folders("lerp", copy, [adapter, b], tmp_path / "x", lora_base_ok=True, progress=False)
    on_base = merge_folders("lerp", base, [adapter, b], tmp_path / "y", progress=False)
    got, want = load_state(on_copy.out), load_state(on_base.out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_relative_base_resolves_from_the_working_folder(tiny_model_factory, tmp_path, monkeypatch):
    """The WARP loop trains on a relative init path and merges from the same working folder."""
    init, b = Path(shutil.copytree(tiny_model_factory("llama", True, 0), tmp_path / "sft")), tmp_path / "b"
    shutil.copytree(tiny_model_factory("llama", True, 2), b)
    adapter = _peft_adapter(init, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "sft"}))
    monkeypatch.chdir(tmp_path)
    merge_folders("slerp", os.path.join("..", tmp_path.name, "sft"), [adapter, b], "merged", progress=False)
    assert (tmp_path / "merged" / "model.safetensors").is_file()

"""`merge_folders` and `warpkit merge` on real save_pretrained folders and peft LoRA adapters.

Expected tensors come from the in-memory `warpkit.merge.slerp` (itself checked against a float64
reference in test_merge.py) on the same weights loaded whole, so these tests pin the streaming,
chunking, sharding, densification and file handling.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from warpkit.cli import build_parser, main, merge_plan
from warpkit.merge import liti, slerp
from warpkit.merge.folders import merge_folders
from warpkit.testing import load_state

REPO = Path(__file__).resolve().parents[2]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a model folder, letting `edit(state)` change its weights (saved as one safetensors file)."""
    shutil.copytree(src, dst)
    state = load_state(dst)
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture
def trio(tiny_model_factory):
    return lambda arch="llama", tied=True: [tiny_model_factory(arch, tied, seed) for seed in (0, 1, 2)]


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("llama", False), ("gpt2", True)])
def test_streamed_folder_merge_equals_in_memory_slerp(trio, tmp_path, arch, tied):
    init, a, b = trio(arch, tied)
    report = merge_folders(
        "slerp",
        init,
        [a, b],
        tmp_path / "out",
        chunk_numel=50_000,
        max_shard_size="2MB",
        cache_size="3MB",
        progress=False,
    )
    out = report.out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded by bytes, with an index
    merged = load_state(out)
    expected, stats = slerp(load_state(init), [load_state(a), load_state(b)])
    names = set(expected) - ({"lm_head.weight"} if tied else set())
    assert set(merged) == names == set(index["weight_map"])
    assert tied == ("lm_head.weight" not in merged)  # tied head merged once, as the embedding
    for n in names:
        torch.testing.assert_close(merged[n], expected[n], rtol=1e-5, atol=1e-6)
    for g, s in report.stats.items():
        assert s.angles_deg == pytest.approx(stats[g].angles_deg, abs=1e-5, nan_ok=True), g


def test_merged_folder_loads_generates_and_carries_files(trio, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init, a, b = trio("llama", True)
    out = merge_folders(
        "slerp", init, [a, b], tmp_path / "out", liti_eta=0.3, dtype="bfloat16", progress=False
    ).out
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    for name in ("generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (init / name).read_bytes()
    recipe = json.loads((out / "warpkit_merge.json").read_text())
    assert recipe["method"] == "slerp" and recipe["liti_eta"] == 0.3 and recipe["granularity"] == "block"
    assert (
        recipe["models"][1]["sha256"]["model.safetensors"]
        == hashlib.sha256((b / "model.safetensors").read_bytes()).hexdigest()
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    merged, _ = slerp(load_state(init), [load_state(a), load_state(b)])
    expected = liti(load_state(init), merged, 0.3)
    got = load_state(out)
    for n, t in got.items():
        torch.testing.assert_close(t.float(), expected[n].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("granularity", ["tensor", "model"])
def test_liti_eta_endpoints_in_the_same_pass(trio, tmp_path, granularity):
    init, a, b = trio("gpt2", True)
    at0 = merge_folders(
        "slerp", init, [a, b], tmp_path / "e0", liti_eta=0.0, granularity=granularity, progress=False
    )
    at1 = merge_folders(
        "slerp", init, [a, b], tmp_path / "e1", liti_eta=1.0, granularity=granularity, progress=False
    )
    base, merged = load_state(init), load_state(at1.out)
    expected, _ = slerp(base, [load_state(a), load_state(b)], granularity=granularity)
    for n, t in load_state(at0.out).items():
        assert torch.equal(t, base[n]), n  # η = 0 is the init, bit for bit
        torch.testing.assert_close(merged[n], expected[n], rtol=1e-5, atol=1e-6)
    assert len(at1.stats) == (1 if granularity == "model" else len(expected))  # tied gpt2 saves no head


def test_bf16_folders_integer_buffers_and_lerp(trio, tmp_path):
    init, a, b = trio("llama", False)

    def to_bf16_with_buffers(seed):
        def edit(state):
            for n in list(state):
                state[n] = state[n].to(torch.bfloat16)
            state["model.step_ids"] = torch.arange(6, dtype=torch.int64) * seed
            state["model.mask"] = torch.tensor([True, False, bool(seed)])

        return edit

    paths = [_rewrite(p, tmp_path / f"m{i}", to_bf16_with_buffers(i + 1)) for i, p in enumerate((init, a, b))]
    out = merge_folders("lerp", paths[0], paths[1:], tmp_path / "out", weights=[3, 1], progress=False).out
    merged, base = load_state(out), load_state(paths[0])
    assert torch.equal(merged["model.step_ids"], base["model.step_ids"])
    assert torch.equal(merged["model.mask"], base["model.mask"])
    n = "model.layers.0.mlp.up_proj.weight"
    assert merged[n].dtype == torch.bfloat16
    d = [load_state(p)[n].double() - base[n].double() for p in paths[1:]]
    expected = (base[n].double() + 0.75 * d[0] + 0.25 * d[1]).to(torch.bfloat16)  # fp32 math, one cast
    assert (merged[n] == expected).double().mean() > 0.99


@pytest.mark.parametrize(
    ("arch", "lora_kwargs"),
    [
        ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
        ("llama", {"target_modules": ["up_proj"], "use_rslora": True, "alpha_pattern": {"up_proj": 5}}),
        ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}),
    ],
)
def test_lora_adapter_merges_like_its_densified_weights(tiny_model_factory, tmp_path, arch, lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    init, other = tiny_model_factory(arch, False, 0), tiny_model_factory(arch, False, 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(init)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # trained-looking adapter: B != 0 (random), saved tensors and biases moved
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ("lora_" not in name):
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "dense")
    for f in init.iterdir():  # the dense copy needs no tokenizer; keep the folders comparable
        if f.suffix != ".safetensors" and not (tmp_path / "dense" / f.name).exists():
            shutil.copy(f, tmp_path / "dense" / f.name)

    lora = merge_folders("slerp", init, [tmp_path / "adapter", other], tmp_path / "o1", progress=False)
    dense = merge_folders("slerp", init, [tmp_path / "dense", other], tmp_path / "o2", progress=False)
    assert lora.recipe["models"][0]["kind"] == "lora"
    got, want = load_state(lora.out), load_state(dense.out)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    # and the adapter did change something: its task vector is not zero
    assert any(s.norms[0] > 1e-3 for s in lora.stats.values())


def test_lora_refusals(tiny_model_factory, tmp_path):
    init = tiny_model_factory("llama", True, 0)
    (tmp_path / "dora").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "dora" / "adapter_model.safetensors")
    (tmp_path / "dora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True})
    )
    with pytest.raises(ValueError, match="use_dora"):
        merge_folders("slerp", init, [tmp_path / "dora", init], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="init must be"):
        merge_folders("slerp", tmp_path / "dora", [init, init], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


BAD_INPUTS = {  # case -> (how to build the models from (init, a, tmp, factory), merge kwargs, message)
    "missing path": (lambda i, a, t, f: [i, t / "nope"], {}, "does not exist"),
    "pickle": (lambda i, a, t, f: [i, _pickled(i, a, t)], {}, "pickled weights"),
    "architecture": (lambda i, a, t, f: [i, f("gpt2", True, 1)], {}, "different architectures"),
    "shapes": (lambda i, a, t, f: [i, f("llama", True, 1, hidden_size=64)], {}, "differ in shape"),
    "missing tensor": (lambda i, a, t, f: [i, _rewrite(a, t / "miss", lambda s: s.pop(K_PROJ))], {}, "missing tensors"),
    "extra tensor": (
        lambda i, a, t, f: [i, _rewrite(a, t / "extra", lambda s: s.update(x=s[K_PROJ].clone()))], {},
        r"extra tensors \['x'\]",
    ),
    "nan": (lambda i, a, t, f: [i, _rewrite(a, t / "nan", _set("model.norm.weight", 3, float("nan")))], {}, "NaN or Inf"),
    "inf": (
        lambda i, a, t, f: [_rewrite(a, t / "inf", _set("model.layers.1.mlp.down_proj.weight", (0, 0), float("inf"))), i],
        {}, "NaN or Inf",
    ),
    "weights count": (lambda i, a, t, f: [i, a], {"weights": [1.0, 1.0, 1.0]}, "3 weights for 2 models"),
    "negative weight": (lambda i, a, t, f: [i, a], {"weights": [1.5, -0.5]}, "allow_extrapolation"),
    "eta": (lambda i, a, t, f: [i, a], {"liti_eta": 1.3}, "allow_extrapolation"),
    "granularity": (lambda i, a, t, f: [i, a], {"granularity": "layer"}, "granularity"),
    "dtype": (lambda i, a, t, f: [i, a], {"dtype": "int8"}, "floating"),
}  # fmt: skip
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


def _pickled(init: Path, a: Path, tmp: Path) -> Path:
    pickled = tmp / "pickled"
    pickled.mkdir()
    shutil.copy(init / "config.json", pickled / "config.json")
    torch.save(load_state(a), pickled / "pytorch_model.bin")
    return pickled


def _set(name: str, index, value: float):
    def edit(state):
        state[name][index] = value

    return edit


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_refused_before_anything_is_written(tiny_model_factory, tmp_path, case):
    build, kwargs, message = BAD_INPUTS[case]
    init, a = tiny_model_factory("llama", True, 0), tiny_model_factory("llama", True, 1)
    (tmp_path / "inputs").mkdir()
    models = build(init, a, tmp_path / "inputs", tiny_model_factory)
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / "merged"
    with pytest.raises(ValueError, match=message):
        merge_folders("slerp", init, models, out, progress=False, **kwargs)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_existing_output_is_refused(tiny_model_factory, tmp_path):
    init = tiny_model_factory("llama", True, 0)
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        merge_folders("slerp", init, [init, init], existing, progress=False)


def test_cli_flags_and_yaml_recipe(trio, tmp_path, capsys):
    init, a, b = trio("llama", True)
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        f"method: slerp\ninit: {init}\nmodels: [{a}, {b}]\ngranularity: tensor\nliti_eta: 0.5\n"
    )
    assert main(["merge", "--config", str(recipe), "--out", str(tmp_path / "y"), "--no-progress"]) == 0
    assert "mean angle" in capsys.readouterr().out
    written = json.loads((tmp_path / "y" / "warpkit_merge.json").read_text())
    assert written["granularity"] == "tensor" and written["liti_eta"] == 0.5
    args = [
        "merge",
        "--method",
        "lerp",
        "--init",
        str(init),
        "--models",
        str(a),
        str(b),
        "--weights",
        "1",
        "3",
    ]
    assert main([*args, "--out", str(tmp_path / "f"), "--dtype", "float16", "--no-progress"]) == 0
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["dtype"] == "float16"
    with pytest.raises(SystemExit, match=r"liti_eta=2\.0 is outside"):
        main([*args, "--out", str(tmp_path / "g"), "--liti-eta", "2", "--no-progress"])
    assert (
        main(
            [*args, "--out", str(tmp_path / "g"), "--liti-eta", "2", "--allow-extrapolation", "--no-progress"]
        )
        == 0
    )
    with pytest.raises(SystemExit, match="missing --out"):
        main(["merge", "--init", str(init), "--models", str(a), str(b)])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("merge_*.yaml")), ids=lambda p: p.name)
def test_shipped_merge_configs_pass_the_cli_checks(path):
    """Each shipped recipe goes through every check `warpkit merge --config` makes before reading a model."""
    method, params, options = merge_plan(build_parser().parse_args(["merge", "--config", str(path)]))
    assert path.read_text().startswith("#") and "Launch:" in path.read_text()
    raw = yaml.safe_load(path.read_text())
    assert method.name == raw["method"] and params == {k: raw[k] for k in method.param_names if k in raw}
    assert {**options, "method": method.name, **params} == raw

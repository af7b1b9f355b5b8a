"""`warpkit frontier`: every bad input refused before the first sample, with one line (the frontier rows of
the table)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.bad_inputs import BadInput, check_bad_input
from warpkit.testing import make_tiny_model, save_tiny_model

SETTINGS = {
    "prompts": ["The movie was", "I think the ending"],
    "num_prompts": None,
    "samples_per_prompt": 2,
    "max_new_tokens": 3,
    "device": "cpu",
}


def _config(workdir: Path, **fields) -> Path:
    """A small valid frontier config in `workdir` (a tiny reference `sft` and a policy `p` built there), with
    `fields` replaced."""
    sft = save_tiny_model(workdir / "sft", "gpt2", tie_word_embeddings=False)
    shutil.copytree(sft, workdir / "p")
    base = {
        "reference": str(sft),
        "policies": [{"name": "p", "method": "m", "path": str(workdir / "p")}],
        "output_dir": str(workdir / "out"),
        **SETTINGS,
    }
    path = workdir / "frontier.yaml"
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path


def frontier(*extra: str, text: str | None = None, **fields):
    """argv builder: `warpkit frontier <config> *extra`, the config from `fields` (or the raw YAML `text`)."""

    def argv(workdir: Path) -> list[str]:
        path = _config(workdir, **fields)
        if text is not None:
            path.write_text(text)
        return ["frontier", str(path), *extra]

    return argv


def policies(*entries: dict):
    """argv builder: the config with these policy entries; `{w}` in a string value is the workdir."""

    def argv(workdir: Path) -> list[str]:
        return frontier(policies=[_fill(e, workdir) for e in entries])(workdir)

    return argv


def _fill(value, workdir: Path):
    if isinstance(value, str):
        return value.format(w=workdir)
    if isinstance(value, dict):
        return {k: _fill(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, workdir) for v in value]
    return value


def _truncated_policy(workdir: Path) -> list[str]:
    argv = frontier()(workdir)
    weights = workdir / "p" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    return argv


def _pickled_policy(workdir: Path) -> list[str]:
    argv = frontier()(workdir)
    policy = workdir / "p"
    torch.save(load_file(policy / "model.safetensors"), policy / "pytorch_model.bin")
    (policy / "model.safetensors").unlink()
    return argv


def _liti_of_other_shapes(workdir: Path) -> list[str]:
    wider = save_tiny_model(workdir / "wider", "gpt2", tie_word_embeddings=False, hidden_size=64)
    liti = {"init": str(workdir / "sft"), "merged": str(wider)}
    return frontier(policies=[{"name": "l", "method": "warp", "liti": liti}])(workdir)


def _other_vocabulary(workdir: Path) -> list[str]:
    argv = frontier()(workdir)
    shutil.rmtree(workdir / "p")
    make_tiny_model("gpt2", tie_word_embeddings=False, vocab_size=1000).save_pretrained(workdir / "p")
    return argv


def _output_dir_is_a_file(workdir: Path) -> list[str]:
    (workdir / "out").write_text("a file")
    return frontier()(workdir)


def _output_dir_under_a_file(workdir: Path) -> list[str]:
    (workdir / "notes").write_text("a file")
    return frontier(output_dir=str(workdir / "notes" / "out"))(workdir)


P = {"name": "p", "method": "m", "path": "{w}/p"}

CASES = [
    BadInput("config file missing", lambda w: ["frontier", str(w / "nope.yaml")], r"frontier config file .*nope\.yaml does not exist"),
    BadInput("config is not YAML", frontier(text="policies: [unclosed\n"), r"frontier config file .* is not valid YAML"),
    BadInput("config is a list", frontier(text="- 1\n"), r"frontier config file .* must hold a mapping of fields, got list"),
    BadInput("unknown field `num_sample`", frontier(num_sample=2), r"unknown field\(s\) \['num_sample'\]\. Valid fields of FrontierConfig: .*samples_per_prompt"),
    BadInput("`reference` missing", frontier(text="policies: []\n"), r"missing required field\(s\) \['reference'\]"),
    BadInput("`samples_per_prompt: two`", frontier(samples_per_prompt="two"), r"\.samples_per_prompt must be int, got 'two'"),
    BadInput("`samples_per_prompt: true`", frontier(samples_per_prompt=True), r"\.samples_per_prompt must be int, got True"),
    BadInput("`temperature: hot`", frontier(temperature="hot"), r"\.temperature must be float, got 'hot'"),
    BadInput("`samples_per_prompt: 0`", frontier(samples_per_prompt=0), r"samples_per_prompt must be >= 1, got 0"),
    BadInput("`max_new_tokens: -1`", frontier(max_new_tokens=-1), r"max_new_tokens must be >= 1, got -1"),
    BadInput("`num_prompts: 0`", frontier(num_prompts=0), r"num_prompts must be >= 1 or null, got 0"),
    BadInput("`temperature: 0`", frontier(temperature=0), r"temperature must be > 0, got 0"),
    BadInput("`dtype: float8`", frontier(dtype="float8"), r"dtype must be float32, float64, bfloat16 or float16, got 'float8'"),
    BadInput("`on_long_prompt: truncate`", frontier(on_long_prompt="truncate"), r"\.on_long_prompt must be one of \('error', 'skip'\), got 'truncate'"),
    BadInput("`device: gpu`", frontier(device="gpu"), r"device 'gpu' is not a device"),
    BadInput("`device: cuda:99`", frontier(device="cuda:99"), r"device 'cuda:99' is not available"),
    BadInput("reference folder missing", frontier(reference="no/such/model"), r"reference 'no/such/model' is not a model folder \(no config\.json\)"),
    BadInput("policy folder missing", policies({**P, "path": "no/such"}), r"policy 'p' 'no/such' is not a model folder"),
    BadInput("policy weights truncated", _truncated_policy, r"policy 'p' .*model\.safetensors is truncated: .*write it again or restore it"),
    BadInput("policy with pickled weights only", _pickled_policy, r"policy 'p' .* has no \.safetensors weights \(found \['pytorch_model\.bin'\]\).*allow_pickle: true"),
    BadInput("policy with another vocabulary", _other_vocabulary, r"policy 'p' .* has vocab_size 1000 but the reference has 50257"),
    BadInput("two policies with one name", policies(P, P), r"policy names must be unique; repeated: \['p'\]"),
    BadInput("a policy named `sft`", policies({**P, "name": "sft"}), r"'sft' names the reference point"),
    BadInput("policy with both `path` and `liti`", policies({**P, "liti": {"init": "{w}/sft", "merged": "{w}/p"}}), r"policy 'p' must set exactly one of path, trajectory, liti, soup; it sets \['path', 'liti'\]"),
    BadInput("trajectory glob matches nothing", policies({"name": "t", "method": "m", "trajectory": "{w}/run/checkpoint-*"}), r"trajectory glob .*checkpoint-\*' matches no folder"),
    BadInput("LITI `etas: [1.5]`", policies({"name": "l", "method": "m", "liti": {"init": "{w}/sft", "merged": "{w}/p", "etas": [1.5]}}), r"policy 'l': liti\.etas .*1\.5.* outside \[0, 1\].*allow_extrapolation"),
    BadInput("LITI ends of other shapes", _liti_of_other_shapes, r"policy 'l': liti\.merged .* and liti\.init .* differ in shape"),
    BadInput("soup weights off the simplex", policies({"name": "s", "method": "m", "soup": {"models": ["{w}/sft", "{w}/p"], "weights": [[0.7, 0.7]]}}), r"policy 's': soup weight vector \[0\.7, 0\.7\] sums to 1\.4"),
    BadInput("reward function cannot be imported", frontier(reward="mypkg.rewards:score"), r"reward 'mypkg\.rewards:score' cannot be imported"),
    BadInput("reward neither function nor folder", frontier(reward="no/such/reward"), r"reward 'no/such/reward' is neither 'module:function' nor an existing reward-model folder"),
    BadInput("extra reward name not an identifier", frontier(extra_rewards={"my-reward": "tests.frontier.helpers:char_count"}), r"extra_rewards name 'my-reward' is not usable"),
    BadInput("prompts file missing", frontier(prompts="data/prompts.jsonl"), r"dataset 'data/prompts\.jsonl' is neither 'module:function' nor an existing file or folder"),
    BadInput("`compare` names an unknown method", frontier(compare=[["m", "ppo"]]), r"compare entry \['m', 'ppo'\] must be two of the methods \['m', 'sft'\]"),
    BadInput("`hypervolume_reference: [1]`", frontier(hypervolume_reference=[1.0]), r"hypervolume_reference must be \[kl, reward\], got \[1\.0\]"),
    BadInput("output_dir is a file", _output_dir_is_a_file, r"output_dir=.*out is a file"),
    BadInput("output_dir under a file", _output_dir_under_a_file, r"output_dir=.*notes/out cannot be created: .*notes is a file"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    check_bad_input(case, tmp_path, capsys)

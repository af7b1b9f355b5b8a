"""Bad input refused up front, with the fix: in the config (names, alphas, merges) when it loads, in the
folders and texts before any model loads (`prepare_inputs`), and by `warpkit forget` as one line, exit 2,
with nothing written (`tests.bad_inputs.check_bad_input`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.bad_inputs import BadInput, check_bad_input
from warpkit._util.config import ConfigError, build_dataclass
from warpkit.forget.config import ForgetConfig, load_forget_config
from warpkit.forget.inputs import prepare_inputs
from warpkit.forget.output import check_output_dir
from warpkit.testing import save_tiny_model

BASE = {
    "reference": "ref",
    "models": {"a": "a", "b": "b"},
    "probe_sets": [{"name": "s", "texts": ["the cat sat", "a dog ran"], "seen_by": ["a", "b"]}],
}


def _build(**fields) -> ForgetConfig:
    return build_dataclass(ForgetConfig, {**BASE, **fields}, "forget.yaml")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fusions": [{"name": "p", "path": {"models": ["a", "b"], "alphas": [0.5, 1.5]}}]},
         r"path.alphas \[1.5\] are outside \[0, 1\].*set path.allow_extrapolation: true"),
        ({"fusions": [{"name": "p", "path": {"models": ["a", "b"], "alphas": [-0.1]}}]},
         r"path.alphas \[-0.1\] are outside \[0, 1\]"),
        ({"fusions": [{"name": "p", "path": {"models": ["a", "b"], "alphas": []}}]}, "path.alphas is empty"),
        ({"probe_sets": [{"name": "s", "texts": ["x y"], "seen_by": ["c"]}]},
         r"marked seen_by \['c'\], which are not models of this config \(models: \['a', 'b'\]\)"),
        ({"probe_sets": [{"name": "s", "texts": []}]}, r"has no texts \(texts: \[\]\)"),
        ({"probe_sets": []}, "probe_sets is empty"),
        ({"probe_sets": [{"name": "s", "texts": ["x y"]}, {"name": "s", "texts": ["z w"]}]},
         r"probe set names must be unique; repeated: \['s'\]"),
        ({"probe_sets": [{"name": "s", "texts": ["x y"], "rows": [3, 1]}]}, r"rows must be \[start, stop\]"),
        ({"models": {}}, "models is empty"),
        ({"models": {"reference": "x"}}, "model name 'reference' is not usable"),
        ({"fusions": [{"name": "m", "merge": {"method": "tiez", "models": ["a", "b"]}}]}, "did you mean 'ties'"),
        ({"fusions": [{"name": "m", "merge": {"method": "slerp", "models": ["a", "b"], "params": {"density": 0.5}}}]},
         "density applies to ties, dare_linear, dare_ties, not slerp"),
        ({"fusions": [{"name": "m", "merge": {"method": "soup", "models": ["a", "b"], "init": "reference"}}]},
         "takes no init"),
        ({"fusions": [{"name": "m", "merge": {"method": "slerp", "models": ["a", "c"]}}]},
         r"names \['c'\], which are not models"),
        ({"fusions": [{"name": "m", "path": {"models": ["a", "b"]}, "merge": {"method": "soup", "models": ["a", "b"]}}]},
         "exactly one of path or merge"),
        ({"fusions": [{"name": "a", "path": {"models": ["a", "b"]}}]}, "differ from the model names"),
        ({"fisher": [{"models": ["a", "a"]}]}, "two different models"),
        ({"fisher": [{"models": ["a", "b"], "probe_sets": ["t"]}]}, r"names \['t'\], not probe sets"),
        ({"kept_threshold": 1.0}, r"kept_threshold must be in \(0, 1\)"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)  # fmt: skip
def test_config_refuses(fields, message):
    with pytest.raises(ValueError, match=message):
        _build(**fields)


def test_extrapolation_is_allowed_when_asked():
    config = _build(
        fusions=[
            {"name": "p", "path": {"models": ["a", "b"], "alphas": [-0.5, 1.5], "allow_extrapolation": True}}
        ]
    )
    assert config.fusions[0].path.alphas == [-0.5, 1.5]


def test_yaml_typo_is_refused(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(
        yaml.safe_dump({**BASE, "fusions": [{"name": "p", "path": {"models": ["a", "b"], "alpha": [0.5]}}]})
    )
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['alpha'\]"):
        load_forget_config(path)


# ----------------------------------------------------------------------------- folders and texts


@pytest.fixture
def folders(tiny_model_factory, tmp_path) -> dict[str, Path]:
    """A private copy of a tiny GPT-2 as reference and model a (tests may break them)."""
    src = tiny_model_factory("gpt2", False)
    return {n: Path(shutil.copytree(src, tmp_path / n)) for n in ("ref", "a")}


def _prepare(folders, **fields):
    doc = {
        "reference": str(folders["ref"]),
        "models": {"a": str(folders["a"])},
        "probe_sets": [{"name": "s", "texts": ["the cat sat on the mat"], "seen_by": ["a"]}],
        **fields,
    }
    return prepare_inputs(build_dataclass(ForgetConfig, doc, "forget.yaml"))


def test_valid_inputs_encode(folders):
    inputs = _prepare(folders)
    assert [len(e.ids) for e in inputs.probes["s"]] == [6] and inputs.folders["a"] == str(folders["a"])


def _pickle(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickled_checkpoint_refused(folders):
    _pickle(folders["a"])
    with pytest.raises(
        ValueError, match=r"model 'a' .* no .safetensors weights \(found \['pytorch_model.bin'\]\).*runs code"
    ):
        _prepare(folders)


def test_other_architecture_refused(folders, tiny_model_factory):
    with pytest.raises(ValueError, match=r"model 'a' .* has model_type='llama' but the reference has 'gpt2'"):
        _prepare(folders, models={"a": str(tiny_model_factory("llama", False))})


def test_other_shapes_refused(folders, tiny_model_factory):
    wider = tiny_model_factory("gpt2", False, hidden_size=64)
    with pytest.raises(ValueError, match=r"differ in shape.*fine-tuned from it"):
        _prepare(folders, models={"a": str(wider)})


def test_other_tokenizer_refused(folders):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["a"])
    tokenizer.add_tokens(["<zebra>"])
    tokenizer.save_pretrained(folders["a"])
    with pytest.raises(ValueError, match="different tokenizer vocabulary from the reference"):
        _prepare(folders)


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ({"texts": ["the cat sat"], "rows": [5, 9]}, r"probe set 's' is empty: .* in rows \[5, 9\]"),
        ({"texts": ["cat"]}, r"row 0 \('cat'\) has 1 token\(s\): nothing to predict"),
        ({"texts": [" word" * 600]}, "has 600 tokens, more than the context of 512: set max_tokens"),
        ({"texts": [{"text": "x y"}], "column": "prompt"}, r"has no column \['prompt'\]"),
        ({"texts": ["a b c"], "target_column": "target"}, "plain strings, which have no 'target' column"),
    ],
)  # fmt: skip
def test_probe_texts_refused(folders, probe, message):
    with pytest.raises(ValueError, match=message):
        _prepare(folders, probe_sets=[{"name": "s", **probe}])


def test_empty_text_file_refused(folders, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="probe set 's' is empty"):
        _prepare(folders, probe_sets=[{"name": "s", "texts": str(tmp_path / "empty.txt")}])


def test_output_dir_that_is_a_file_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "out")


# ----------------------------------------------------------------------------- the command: one line, exit 2


def _forget(broken=None, **fields):
    """argv builder: a valid config over tiny models built in the workdir, with `fields` and `broken(workdir)`."""

    def argv(workdir: Path) -> list[str]:
        for name in ("ref", "a", "b"):
            save_tiny_model(workdir / name, "gpt2", tie_word_embeddings=False)
        if broken is not None:
            broken(workdir)
        doc = {
            "reference": str(workdir / "ref"),
            "models": {"a": str(workdir / "a"), "b": str(workdir / "b")},
            "probe_sets": [{"name": "s", "texts": ["the cat sat on the mat"], "seen_by": ["a"]}],
            "output_dir": str(workdir / "out"),
            **fields,
        }
        (workdir / "forget.yaml").write_text(yaml.safe_dump(doc))
        return ["forget", str(workdir / "forget.yaml"), "--no-progress"]

    return argv


CLI_CASES = [
    BadInput("alpha grid outside [0, 1]", _forget(fusions=[{"name": "p", "path": {"models": ["a", "b"], "alphas": [2.0]}}]),
             r"^warpkit: error: .*path.alphas \[2.0\] are outside \[0, 1\]"),
    BadInput("probe set seen by an unknown model", _forget(probe_sets=[{"name": "s", "texts": ["x y"], "seen_by": ["z"]}]),
             r"^warpkit: error: probe set 's' is marked seen_by \['z'\]"),
    BadInput("pickled checkpoint", _forget(lambda w: _pickle(w / "b")), r"^warpkit: error: model 'b' .*no .safetensors"),
    BadInput("empty probe set", _forget(probe_sets=[{"name": "s", "texts": ["x y"], "rows": [4, 8]}]),
             r"^warpkit: error: probe set 's' is empty"),
]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.what)
def test_command_answers_in_one_line(case, tmp_path, capsys):
    check_bad_input(case, tmp_path, capsys)

"""`warpkit train`: every bad input refused before any run, with one line (the train rows of the table)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.bad_inputs import BadInput, check_bad_input
from warpkit.testing import save_tiny_model

RL = {"use_cpu": True, "max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "beta": 0.1}


def _config(workdir: Path, **fields) -> Path:
    """A small valid WARP config in `workdir` (a tiny model built there), with `fields` replaced."""
    model = save_tiny_model(workdir / "sft", "llama")
    base = {"model_name_or_path": str(model), "output_dir": str(workdir / "out"), "rl": dict(RL)}
    path = workdir / "warp.yaml"
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path


def train(*extra: str, text: str | None = None, **fields):
    """argv builder: `warpkit train <config> *extra`, the config from `fields` (or the raw YAML `text`)."""

    def argv(workdir: Path) -> list[str]:
        path = _config(workdir, **fields)
        if text is not None:
            path.write_text(text)
        return ["train", str(path), *extra]

    return argv


def _pickled_init(workdir: Path) -> list[str]:
    path = _config(workdir)
    sft = workdir / "sft"
    torch.save(load_file(sft / "model.safetensors"), sft / "pytorch_model.bin")
    (sft / "model.safetensors").unlink()
    return ["train", str(path)]


def _output_dir_is_a_file(workdir: Path) -> list[str]:
    (workdir / "out").write_text("a file")
    return ["train", str(_config(workdir))]


def _foreign_output_dir(workdir: Path) -> list[str]:
    (workdir / "out").mkdir()
    (workdir / "out" / "notes.txt").write_text("mine")
    return ["train", str(_config(workdir))]


def _truncated_init(workdir: Path) -> list[str]:
    path = _config(workdir)
    weights = workdir / "sft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    return ["train", str(path)]


CASES = [
    BadInput("config file missing", lambda w: ["train", str(w / "nope.yaml")], r"WARP config file .*nope\.yaml does not exist"),
    BadInput("config is not YAML", train(text="rl: [unclosed\n"), r"WARP config file .* is not valid YAML"),
    BadInput("config is a list", train(text="- 1\n"), r"must hold a mapping of fields, got list"),
    BadInput("unknown field `num_polices`", train(num_polices=2), r"unknown field\(s\) \['num_polices'\]\. Valid fields"),
    BadInput("`iterations: two`", train(iterations="two"), r"\.iterations must be int, got 'two'"),
    BadInput("`iterations: 2.5`", train(iterations=2.5), r"\.iterations must be int, got 2\.5"),
    BadInput("`iterations: true`", train(iterations=True), r"\.iterations must be int, got True"),
    BadInput("`iterations: 0`", train(iterations=0), r"iterations=0: WARP needs at least one iteration"),
    BadInput("`num_policies: 0`", train(num_policies=0), r"num_policies=0: M must be at least 1"),
    BadInput("`liti_eta: 1.5`", train(liti_eta=1.5), r"liti_eta=1\.5 is outside \[0, 1\]\. .*allow_extrapolation"),
    BadInput("`front_etas: [-0.1]`", train(front_etas=[-0.1]), r"front_etas \[-0\.1\] are outside \[0, 1\]"),
    BadInput("`rl` as a list", train(rl=[1]), r"\.rl must be a mapping, got list"),
    BadInput("`rl.output_dir` set", train(rl={**RL, "output_dir": "x"}), r"rl\.output_dir is set by the driver per run"),
    BadInput("`merge_method: sum`", train(merge_method="sum"), r"merge_method='sum' is not one of \['slerp'"),
    BadInput("`merge_method: soup`", train(merge_method="soup"), r"merge_method='soup' averages models without an init"),
    BadInput(
        "`merge_kwargs: {density: 0.5}` with slerp", train(merge_kwargs={"density": 0.5}),
        r"merge_kwargs / merge_weights for merge_method='slerp': density applies to ties, dare_linear, dare_ties",
    ),
    BadInput("`merge_weights` of the wrong length", train(merge_weights=[1.0]), r"got 1 weights for 2 models"),
    BadInput("`merge_granularity: layer`", train(merge_granularity="layer"), r"merge_granularity='layer': choose one of"),
    BadInput("`model_name_or_path` missing", train(text="iterations: 2\n"), r"model_name_or_path is required"),
    BadInput("init folder does not exist", train(model_name_or_path="no/such/model"), r"model 'no/such/model' is not a model folder"),
    BadInput("init with pickled weights only", _pickled_init, r"model_name_or_path=.* holds only pickled weights .*Convert it once"),
    BadInput("init weights truncated", _truncated_init, r"model_name_or_path=.*model\.safetensors is truncated"),
    BadInput("output_dir is a file", _output_dir_is_a_file, r"output_dir=.*out is a file"),
    BadInput("output_dir holds other files", _foreign_output_dir, r"output_dir=.*out exists and is not a warpkit train output"),
    BadInput("`rl.beta: 0` with the EMA anchor", train(rl={**RL, "beta": 0.0}), r"invalid rl: beta=0 with anchor='ema'"),
    BadInput("unknown rl field", train(rl={**RL, "no_such_field": 1}), r"invalid rl: .*no_such_field"),
    BadInput("`rl.algorithm: ppo`", train(rl={**RL, "algorithm": "ppo"}), r"invalid rl: algorithm='ppo': choose one of"),
    BadInput("`rl.ema_rate: 1.5`", train(rl={**RL, "ema_rate": 1.5}), r"invalid rl: ema_rate=1\.5 must be in \(0, 1\]"),
    BadInput(
        "`rl.anchor: elastic_reset` without `reset_every`", train(rl={**RL, "anchor": "elastic_reset"}),
        r"invalid rl: reset_every=None: anchor='elastic_reset' needs reset_every = n >= 1",
    ),
    BadInput(
        "`rl.bema_update_freq: 0` with `rl.anchor: bema`", train(rl={**RL, "anchor": "bema", "bema_update_freq": 0}),
        r"invalid rl: bema_update_freq must be an integer >= 1 \(optimizer steps\), got 0",
    ),
    BadInput("`rl.max_steps: 0`", train(rl={**RL, "max_steps": 0}), r"invalid rl: max_steps=0 trains nothing"),
    BadInput(
        "`rl.swa_start` after the run's last step", train(rl={**RL, "final_policy": "swa", "swa_start": 3}),
        r"invalid rl: swa_start=3 is after the run's last step \(max_steps=2\)",
    ),
    BadInput(
        "`rl.lawa_k` above the checkpoints saved", train(rl={**RL, "final_policy": "lawa", "lawa_k": 2}),
        r"invalid rl: lawa_k=2 is more checkpoints than the run saves \(1: steps \[2\], save_steps=500, max_steps=2\)",
    ),
    BadInput("`rl.lawa_k: 0`", train(rl={**RL, "final_policy": "lawa", "lawa_k": 0}),
             r"invalid rl: lawa_k=0: final_policy='lawa' needs lawa_k >= 1"),
    BadInput(
        "`rl.save_total_limit` below the SWA window",
        train(rl={**RL, "final_policy": "swa", "swa_start": 1, "save_steps": 1, "save_total_limit": 1}),
        r"invalid rl: save_total_limit=1 would delete checkpoints that final_policy='swa' averages",
    ),
    BadInput(
        "reward function cannot be imported", train(rl={**RL, "reward_funcs": ["mypkg.rewards:score"]}),
        r"invalid rl: reward 'mypkg\.rewards:score' cannot be imported",
    ),
    BadInput(
        "dataset file missing", train(rl={**RL, "dataset": "data/prompts.jsonl"}),
        r"invalid rl: dataset 'data/prompts\.jsonl' is neither 'module:function' nor an existing file",
    ),
    BadInput(
        "a baseline's rl field invalid", train(baselines=[{"name": "b", "rl": {"beta": 0.0}}]),
        r"invalid baselines\[b\]\.rl: beta=0",
    ),
    BadInput("two baselines with one name", train(baselines=[{"name": "a"}, {"name": "a"}]), r"baseline names must be unique"),
    BadInput(
        "accelerate config missing", train(accelerate_config="accelerate_configs/nope.yaml"),
        r"accelerate_config file accelerate_configs/nope\.yaml does not exist",
    ),
    BadInput("`frontier.reference` set", train(frontier={"reference": "x"}), r"frontier\.reference and frontier\.policies are filled"),
    BadInput("frontier field of the wrong type", train(frontier={"samples_per_prompt": "two"}), r"frontier\.samples_per_prompt must be int"),
    BadInput(
        "frontier policy folder missing", train(frontier_policies=[{"name": "m1", "method": "m1", "path": "no/such"}]),
        r"frontier_policies: policy 'm1' 'no/such' is not a folder",
    ),
    BadInput("override without a value", train("--iterations"), r"override --iterations has no value"),
    BadInput("`launcher: pbs`", train(launcher="pbs"), r"launcher='pbs': choose one of \['local', 'slurm'\]"),
    BadInput("`slurm.nodes: 0`", train("--launcher", "slurm", "--slurm.nodes", "0"),
             r"slurm\.nodes=0: a run needs at least one node \(nodes >= 1\)"),
    BadInput("`slurm.time: soon`", train("--launcher", "slurm", "--slurm.time", "soon"),
             r"slurm\.time='soon' is not a SLURM time limit; write minutes \(90\), H:MM:SS"),
    BadInput("unknown slurm field", train("--launcher", "slurm", "--slurm.partiton", "gpu"),
             r"slurm: unknown field\(s\) \['partiton'\]"),
    BadInput("a slurm section with the local launcher", train(slurm={"partition": "gpu"}),
             r"a slurm section is set but launcher is local; set launcher: slurm"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    check_bad_input(case, tmp_path, capsys)

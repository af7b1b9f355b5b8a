"""`warpkit merge`: every bad input refused before anything is written, with one line (the merge rows of
the table)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.bad_inputs import BadInput, check_bad_input
from warpkit.testing import save_tiny_model

SEEDS = {"sft": 0, "a": 1, "b": 2, "other": 3}


def _model(workdir: Path, name: str, **kwargs) -> Path:
    """A tiny llama saved in `workdir/name` (the init "sft", fine-tunes "a" and "b", an unrelated "other")."""
    return save_tiny_model(workdir / name, "llama", seed=SEEDS.get(Path(name).name, 0), **kwargs)


def merge(*extra: str, init: str | None = "sft", models: tuple[str, ...] = ("a", "b"), out: str = "merged"):
    """argv builder: `warpkit merge [--init W/init] --models W/m... --out W/out *extra` with the models built
    in the fresh folder W (names of SEEDS only: any other path is left as it is); "{w}" in `extra` is W."""

    def argv(workdir: Path) -> list[str]:
        for name in (*([init] if init else []), *models):
            if name in SEEDS and not (workdir / name).exists():
                _model(workdir, name)
        where = ["--init", str(workdir / init)] if init else []
        paths = [str(workdir / m) for m in models]
        rest = [x.format(w=workdir) for x in extra]
        return ["merge", *where, "--models", *paths, "--out", str(workdir / out), "--no-progress", *rest]

    return argv


def prepared(prepare, *extra: str, **kwargs):
    """argv builder: `merge(*extra, **kwargs)` after `prepare(workdir)` changed the folder."""
    build = merge(*extra, **kwargs)

    def argv(workdir: Path) -> list[str]:
        prepare(workdir)
        return build(workdir)

    return argv


class _Trap:
    """Unpickling this creates `path`: the table then fails with "written despite the error"."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _pickled_model(workdir: Path) -> None:
    a = _model(workdir, "a")
    state = load_file(a / "model.safetensors")
    torch.save({**state, "trap": _Trap(workdir / "unpickled")}, a / "pytorch_model.bin")
    (a / "model.safetensors").unlink()


def _truncated_model(workdir: Path) -> None:
    weights = _model(workdir, "a") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])


def _nan_model(workdir: Path) -> None:
    weights = _model(workdir, "b") / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.down_proj.weight"][0, 3] = math.nan
    save_file(state, weights, metadata={"format": "pt"})


def _wider_model(workdir: Path) -> None:
    _model(workdir, "a", hidden_size=64)


def _gpt2_model(workdir: Path) -> None:
    save_tiny_model(workdir / "a", "gpt2", seed=1)


def _lora_of_other(workdir: Path) -> None:
    """A LoRA adapter (peft's file layout) of "other", a model of the init's shapes but not the init."""
    other, adapter = _model(workdir, "other"), workdir / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(other)})
    )
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    lora = {f"{module}.lora_A.weight": torch.randn(4, 32), f"{module}.lora_B.weight": torch.randn(32, 4)}
    save_file(lora, adapter / "adapter_model.safetensors")


def _earlier_merge(workdir: Path) -> None:
    (workdir / "merged").mkdir()
    (workdir / "merged" / "warpkit_merge.json").write_text("{}")


def _foreign_out(workdir: Path) -> None:
    (workdir / "merged").mkdir()
    (workdir / "merged" / "notes.txt").write_text("mine")


def _out_is_a_file(workdir: Path) -> None:
    (workdir / "merged").write_text("a file")


def _recipe(text: str):
    def prepare(workdir: Path) -> None:
        (workdir / "merge.yaml").write_text(text)

    return prepare


def _models_not_a_list(workdir: Path) -> list[str]:
    for name in ("sft", "a"):
        _model(workdir, name)
    recipe = workdir / "merge.yaml"
    recipe.write_text(f"init: {workdir / 'sft'}\nmodels: {workdir / 'a'}\nout: {workdir / 'merged'}\n")
    return ["merge", "--config", str(recipe), "--no-progress"]


CASES = [
    BadInput(
        "`--method slurp`", merge("--method", "slurp"),
        r"argument --method: invalid choice: 'slurp' \(choose from .*slerp.*\); did you mean 'slerp'\?",
        "argument --method: invalid choice: 'slurp' (choose from 'slerp', 'lerp', ...); did you mean 'slerp'?",
    ),
    BadInput(
        "`method: slurp` in a --config recipe", prepared(_recipe("method: slurp\n"), "--config", "{w}/merge.yaml"),
        r"method='slurp' is not one of \['slerp'.*\]; did you mean 'slerp'\?",
        "method='slurp' is not one of ['slerp', 'lerp', ...]; did you mean 'slerp'?",
    ),
    BadInput(
        "unknown key in a --config recipe", prepared(_recipe("metod: ties\n"), "--config", "{w}/merge.yaml"),
        r"unknown keys \['metod'\] in .*merge\.yaml; known: \['method'", "unknown keys ['metod'] in merge.yaml; known: ['method', ...]",
    ),
    BadInput(
        "`models: a` (not a list) in a --config recipe", _models_not_a_list,
        r"--models='.*/a' must be a list of folders \(in a YAML recipe: models: \[a, b\]\)",
        "--models='a' must be a list of folders (in a YAML recipe: models: [a, b])",
    ),
    BadInput(
        "`liti_eta: half` in a --config recipe", prepared(_recipe("liti_eta: half\n"), "--config", "{w}/merge.yaml"),
        r"--liti-eta='half' must be a number", "--liti-eta='half' must be a number",
    ),
    BadInput(
        "--config file missing", merge("--config", "{w}/merge.yaml"), r"merge recipe file .*merge\.yaml does not exist",
        "merge recipe file merge.yaml does not exist",
    ),
    BadInput(
        "model_stock of one model", merge("--method", "model_stock", models=("a",)),
        r"model_stock needs at least 2 models, got 1", "model_stock needs at least 2 models, got 1",
    ),
    BadInput(
        "soup of one model", merge("--method", "soup", init=None, models=("a",)),
        r"soup needs at least 2 models, got 1", "soup needs at least 2 models, got 1",
    ),
    BadInput(
        "three --weights for two models", merge("--weights", "1", "2", "3"),
        r"got 3 weights for 2 models; give one weight per model", "got 3 weights for 2 models; give one weight per model",
    ),
    BadInput(
        "negative lerp weight", merge("--method", "lerp", "--weights", "1.5", "-0.5"),
        r"negative merge weights \[1\.5, -0\.5\] put λ outside \[0, 1\] .*--allow-extrapolation",
        "negative merge weights [1.5, -0.5] put λ outside [0, 1] (extrapolation); pass ... --allow-extrapolation if that is intended",
    ),
    BadInput(
        "negative soup weight", merge("--method", "soup", "--weights", "1.5", "-0.5", init=None),
        r"soup weights \[1\.5, -0\.5\] include negative values.* Use weights >= 0, or pass --allow-extrapolation",
        "soup weights [1.5, -0.5] include negative values ... Use weights >= 0, or pass --allow-extrapolation if that is intended",
    ),
    BadInput(
        "`--weights` with model_stock", merge("--method", "model_stock", "--weights", "1", "2"),
        r"model_stock takes no --weights \(got \[1\.0, 2\.0\]\); drop --weights",
        "model_stock takes no --weights (got [1.0, 2.0]); drop --weights",
    ),
    BadInput(
        "`--liti-eta 1.5`", merge("--liti-eta", "1.5"), r"liti_eta=1\.5 is outside \[0, 1\]\. .*--allow-extrapolation",
        "liti_eta=1.5 is outside [0, 1]. eta > 1 extrapolates past the merge ...; pass ... --allow-extrapolation if that is what you want",
    ),
    BadInput(
        "`--liti-eta -0.5`", merge("--liti-eta", "-0.5"),
        r"^(?!.*extrapolation).*liti_eta=-0\.5 is outside \[0, 1\]: eta < 0 .*; use a value in \[0, 1\]",
        "liti_eta=-0.5 is outside [0, 1]: eta < 0 moves away from the merge ...; use a value in [0, 1]",
    ),
    BadInput(
        "`--density 0`", merge("--method", "ties", "--density", "0"),
        r"--density=0\.0 is outside \(0, 1\] .*density 0 would keep nothing .*pass a value in \(0, 1\]",
        "--density=0.0 is outside (0, 1] ...; density 0 would keep nothing ...; pass a value in (0, 1], e.g. 0.2",
    ),
    BadInput(
        "`--density 1.5`", merge("--method", "dare_linear", "--density", "1.5"),
        r"--density=1\.5 is outside \(0, 1\] .*pass a value in \(0, 1\]", "--density=1.5 is outside (0, 1] ...; pass a value in (0, 1], e.g. 0.2",
    ),
    BadInput(
        "`--trim-scope` with dare_ties", merge("--method", "dare_ties", "--trim-scope", "model"),
        r"--trim-scope only apply to --method ties, not dare_ties; drop them or use ties",
        "--trim-scope only apply to --method ties, not dare_ties; drop them or use ties",
    ),
    BadInput(
        "`--scale` with slerp", merge("--scale", "2"), r"--scale only apply to --method task_arithmetic, .*, not slerp; drop them",
        "--scale only apply to --method task_arithmetic, ties, ..., not slerp; drop them or use task_arithmetic",
    ),
    BadInput(
        "`--granularity layer`", merge("--granularity", "layer"),
        r"argument --granularity: invalid choice: 'layer' \(choose from .*block", "argument --granularity: invalid choice: 'layer' (choose from 'block', 'tensor', 'model')",
    ),
    BadInput(
        "`--init` with soup", merge("--method", "soup"), r"--method soup takes no --init \(.*sft\): .*Drop --init",
        "--method soup takes no --init (sft): it averages the models themselves ... Drop --init",
    ),
    BadInput(
        "`--liti-eta` with soup", merge("--method", "soup", "--liti-eta", "0.5", init=None),
        r"--liti-eta do not apply to --method soup .*; drop them", "--liti-eta do not apply to --method soup (... no init to interpolate towards); drop them",
    ),
    BadInput(
        "--init missing for ties", merge("--method", "ties", init=None),
        r"warpkit merge: missing --init \(flags or --config\)", "missing --init (flags or --config)",
    ),
    BadInput(
        "init folder does not exist", merge(init="no/such/sft"),
        r"--init=.*no/such/sft does not exist; pass the save_pretrained folder the models were fine-tuned from",
        "--init=no/such/sft does not exist; pass the save_pretrained folder the models were fine-tuned from",
    ),
    BadInput(
        "model folder does not exist", merge(models=("a", "runs/b")),
        r"--models: .*runs/b does not exist; pass save_pretrained folders or peft LoRA adapter folders",
        "--models: runs/b does not exist; pass save_pretrained folders or peft LoRA adapter folders",
    ),
    BadInput(
        "model with pickled weights only", prepared(_pickled_model),
        r"a holds only pickled weights \(\['pytorch_model\.bin'\]\); warpkit reads safetensors only.* Convert it once",
        "a holds only pickled weights (['pytorch_model.bin']); warpkit reads safetensors only ... Convert it once with ...",
    ),
    BadInput(
        "model weights truncated", prepared(_truncated_model), r"a/model\.safetensors is truncated: .*write it again or restore it",
        "a/model.safetensors is truncated: its header describes ... bytes but the file has ...; write it again or restore it",
    ),
    BadInput(
        "model of another size than the init", prepared(_wider_model),
        r"model 0 \(.*/a\) and the init .*/sft differ in shape .*'model\.embed_tokens\.weight \(50257, 64\) vs \(50257, 32\)'.* "
        r"Merge only fine-tunes of the init",
        "model 0 (a) and the init sft differ in shape ... Merge only fine-tunes of the init ..., or pass the init they share",
    ),
    BadInput(
        "model of another architecture than the init", prepared(_gpt2_model),
        r"model 0 \(.*/a\) has model_type='gpt2', the init .*/sft has 'llama': different architectures\. Merge only",
        "model 0 (a) has model_type='gpt2', the init sft has 'llama': different architectures. Merge only fine-tunes of the init ...",
    ),
    BadInput(
        "NaN in a model's weights", prepared(_nan_model),
        r"down_proj\.weight has NaN or Inf weights in \[.*/b'\]; refusing to merge\. Drop that model or use an earlier checkpoint",
        "...down_proj.weight has NaN or Inf weights in ['b']; refusing to merge. Drop that model or use an earlier checkpoint of it",
    ),
    BadInput(
        "`--out` is an input", merge(out="a"), r"--out=.*/a is the input .*/a: .*Write it to a new folder, e\.g\. --out .*a-merged",
        "--out=a is the input a: the merge would replace a model it reads. Write it to a new folder, e.g. --out a-merged",
    ),
    BadInput(
        "`--out` is inside an input folder", merge(out="sft/merged"),
        r"--out=.*sft/merged is inside the input .*sft: .*Choose an --out outside every input folder",
        "--out=sft/merged is inside the input sft: ... Choose an --out outside every input folder, e.g. --out sft-merged",
    ),
    BadInput(
        "`--out` holds an input, with --overwrite", merge("--overwrite", out="."),
        r"--out=.* contains the input .*sft: replacing it would delete that model\. Choose an --out that holds no input",
        "--out=. contains the input sft: replacing it would delete that model. Choose an --out that holds no input",
    ),
    BadInput(
        "`--out` is another folder, with --overwrite", prepared(_foreign_out, "--overwrite"),
        r"--out=.*merged already exists and is not a warpkit merge output .*Remove the folder yourself or choose a new --out",
        "--out=merged already exists and is not a warpkit merge output ... Remove the folder yourself or choose a new --out",
    ),
    BadInput(
        "`--out` is a file", prepared(_out_is_a_file), r"--out=.*merged is a file, not a merge output folder; .*choose another --out",
        "--out=merged is a file, not a merge output folder; ... Remove the file yourself or choose another --out",
    ),
    BadInput(
        "`--out` is an earlier merge, no --overwrite", prepared(_earlier_merge),
        r"--out=.*merged already exists; remove it or pass --overwrite", "--out=merged already exists; remove it or pass --overwrite",
    ),
    BadInput(
        "LoRA adapter of another model than the init", prepared(_lora_of_other, models=("adapter", "b")),
        r"model 0 \(.*adapter\) is a LoRA adapter of '.*other' .*but the init is .*sft.* pass .*--lora-base-ok",
        "model 0 (adapter) is a LoRA adapter of 'other' ..., but the init is sft ... Pass its base as the init, or ... --lora-base-ok",
    ),
    BadInput(
        "`--dtype fp16`", merge("--dtype", "fp16"), r"--dtype='fp16' is not a torch dtype; use float32, bfloat16, float16 or float64",
        "--dtype='fp16' is not a torch dtype; use float32, bfloat16, float16 or float64",
    ),
    BadInput(
        "`--max-shard-size 2 gigs`", merge("--max-shard-size", "2 gigs"),
        r"cannot parse --max-shard-size '2 gigs'; use e\.g\. 5GB, 500MB", "cannot parse --max-shard-size '2 gigs'; use e.g. 5GB, 500MB or a number of bytes",
    ),
    BadInput(
        "`--device gpu`", merge("--device", "gpu"), r"--device='gpu' is not a torch device; use cpu, cuda or cuda:N",
        "--device='gpu' is not a torch device; use cpu, cuda or cuda:N",
    ),
    BadInput(
        "`--device cuda:99` (no such GPU here)", merge("--device", "cuda:99"), r"--device='cuda:99': this machine has .*; drop --device",
        "--device='cuda:99': this machine has no cuda device torch can use; drop --device ... or name a device it has",
    ),
    BadInput(
        "greedy_soup without a scorer", merge("--method", "greedy_soup", init=None),
        r"greedy_soup needs exactly one of --scorer MODULE:FUNCTION .* or --score-config FRONTIER_YAML .*got neither",
        "greedy_soup needs exactly one of --scorer MODULE:FUNCTION (...) or --score-config FRONTIER_YAML (...); got neither",
    ),
    BadInput(
        "--scorer that does not import", merge("--method", "greedy_soup", "--scorer", "mypkg.scores:accuracy", init=None),
        r"--scorer 'mypkg\.scores:accuracy' cannot be imported: No module named 'mypkg'\. Check .*PYTHONPATH",
        "--scorer 'mypkg.scores:accuracy' cannot be imported: No module named 'mypkg'. Check the spelling ... (installed, or on PYTHONPATH)",
    ),
    BadInput(
        "WARM of policies (causal LMs)", merge("--method", "warm", init=None),
        r"reward model .*a has architectures=\['LlamaForCausalLM'\], not a \*ForSequenceClassification .* use `warpkit merge --method soup`",
        "reward model a has architectures=['LlamaForCausalLM'], not a *ForSequenceClassification model ... use `warpkit merge --method soup`",
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    check_bad_input(case, tmp_path, capsys)

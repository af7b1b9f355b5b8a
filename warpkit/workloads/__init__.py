"""What a run trains and is evaluated on: models by name, prompt sets, rewards. One loader for each.

- `resolve_model_path("warpkit:default")` is the embedded SmolLM2-135M-Instruct (`workloads.default`),
  `"warpkit:tiny"` a tiny local llama (`warpkit.testing`); anything else must be a model folder on disk.
  (Frontier configs also accept the bare name `default`, their historical spelling.)
- `load_prompt_dataset(spec, ...)`: a `datasets.Dataset` with a `prompt` column from any prompt spec
  (a function, a data file, a `save_to_disk` folder, a `.txt` file, an inline list); `read_dataset(spec,
  ...)` reads the same specs without asking for a column (the probe texts of `warpkit.forget`).
- `reward_spec(spec)`: a reward function (TRL's `reward_funcs` signature) or a reward-model folder.

The embedded workload is imported only when its name is used, so nothing here downloads or converts
anything unless asked. This package sits just above `warpkit._util`: the loop and the frontier use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from warpkit._util.imports import import_object, is_object_spec

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "check_same_tokenizer",
    "load_prompt_dataset",
    "read_dataset",
    "resolve_model_path",
    "reward_spec",
]

DEFAULT_MODEL = "warpkit:default"  # the embedded SmolLM2-135M-Instruct
TINY_MODEL = "warpkit:tiny"  # a tiny random llama with GPT-2's tokenizer, built once in the cache
_DATA_FILES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_model_path(name: str, *, aliases: Sequence[str] = ()) -> str:
    """The folder of model `name`: `warpkit:default`, `warpkit:tiny` (or one of `aliases` of the default),
    else an existing folder with config.json or adapter_config.json (made absolute).

    Hub names are refused on purpose: nothing downloads at run time, and TRL reloads the reference from the
    model's path, so the init must be a folder on disk.
    """
    if name == DEFAULT_MODEL or name in aliases:
        from warpkit.workloads.default import prepare_default_model

        return str(prepare_default_model())
    if name == TINY_MODEL:
        from warpkit.testing import save_tiny_model
        from warpkit.workloads.default import cache_dir

        path = cache_dir() / "tiny-llama-h32-l2-s0"
        if not (path / "config.json").is_file():
            save_tiny_model(path, "llama", seed=0)
        return str(path)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is not a model folder (no config.json): pass a save_pretrained folder, "
            f"'{DEFAULT_MODEL}' (embedded SmolLM2-135M-Instruct) or '{TINY_MODEL}'."
        )
    return str(path.resolve())


def load_prompt_dataset(
    spec: str | Sequence[Any], *, split: str = "train", kwargs: Mapping[str, Any] | None = None
):
    """A `datasets.Dataset` with a `prompt` column (plain text or chat messages) named by `spec`:

    - `package.module:function`: called as `function(**kwargs)`, or `function(split)` without kwargs; it
      returns a Dataset (or DatasetDict, indexed by `split`) or a list of prompts;
    - a `.json` / `.jsonl` / `.parquet` / `.csv` file, or a `.txt` file with one prompt per line;
    - a `save_to_disk` folder, or a downloaded dataset repository folder (read locally, `split`);
    - an inline list of prompts.
    """
    import datasets

    dataset = read_dataset(spec, split=split, kwargs=kwargs)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_dict({"prompt": dataset})
    what = spec if isinstance(spec, str) else "inline prompts"
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset {what!r} has no 'prompt' column (columns: {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError(f"prompts {what!r} gave no prompt.")
    return dataset


def read_dataset(
    spec: str | Sequence[Any], *, split: str = "train", kwargs: Mapping[str, Any] | None = None
) -> Any:
    """What a dataset spec names, as read: a `datasets.Dataset` or `DatasetDict`, or a list (an inline list,
    the lines of a `.txt` file, or what a function returned). The specs of `load_prompt_dataset`."""
    import datasets

    if not isinstance(spec, str):
        return list(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")):
        return datasets.load_from_disk(str(path))
    if path.is_dir():  # a downloaded dataset repository (parquet/json files): read locally, no hub access
        return datasets.load_dataset(str(path), split=split)
    if path.is_file() and path.suffix == ".txt":
        return [line for line in path.read_text().splitlines() if line.strip()]
    if path.is_file():
        kind = _DATA_FILES.get(path.suffix)
        if kind is None:
            raise ValueError(f"dataset file {spec!r}: use .json, .jsonl, .parquet, .csv or .txt.")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    if is_object_spec(spec):
        function = import_object(spec, "prompts", callable_=True)
        return function(**kwargs) if kwargs is not None else function(split)
    raise FileNotFoundError(f"dataset {spec!r} is neither 'module:function' nor an existing file or folder.")


def reward_spec(spec: str) -> Callable[..., Any] | Path:
    """A reward: the function named `package.module:function` (TRL's `reward_funcs` signature), or the
    absolute path of a reward-model folder (which TRL, or the frontier, loads as a scorer)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"reward model folder {spec!r} has no config.json.")
        return path.resolve()
    if is_object_spec(spec):
        return import_object(spec, "reward", callable_=True)
    raise ValueError(f"reward {spec!r} is neither 'module:function' nor an existing reward-model folder.")


def check_same_tokenizer(reference_tokenizer: Any, path: str | Path, what: str, why: str) -> Any:
    """Refuse a model folder whose tokenizer (when it has one) maps tokens to other ids than the reference's:
    its token ids would not mean the same text. `what` names the folder's role, `why` says what breaks.
    Returns the folder's tokenizer, or None for a bare checkpoint."""
    from transformers import AutoTokenizer

    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None  # a bare checkpoint: the caller's vocabulary size check is all there is
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    a, b = reference_tokenizer.get_vocab(), tokenizer.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"{what} {str(path)!r} has a different tokenizer vocabulary from the reference ({len(b)} vs {len(a)} "
            f"tokens; first differences {diff}): its token ids do not mean the same text. {why}"
        )
    return tokenizer

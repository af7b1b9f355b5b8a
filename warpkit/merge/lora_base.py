"""Is a LoRA adapter's base the init it is merged with? A peft adapter is a low-rank ΔW = B·A learned on
top of one set of weights; added to another model of the same shapes it is still "valid" tensor-wise but
means nothing, so the mismatch must be caught from the names alone.

peft records the base in `adapter_config.json` as `base_model_name_or_path`: what the base was loaded from
when the adapter was trained, a local folder (as typed then, absolute or relative) or a Hub id. It is
compared with the init as follows, first rule that applies:

1. nothing recorded (missing, null or empty): nothing to compare; accepted.
2. it names a folder that exists here: the same model only if it is the init's folder (resolved paths,
   so a symlink or `..` does not matter). A copy elsewhere is another path: refused unless the user says
   it is the same model.
3. otherwise (a Hub id, or a path of another machine): the same model if it equals the init as given,
   the init's `config.json` `_name_or_path` (older transformers save it), or the Hub id of a Hugging Face
   cache folder (`models--org--name/snapshots/<sha>` is `org/name`); as a last resort, if its last path
   component is the init folder's name (`Qwen/Qwen2.5-1.5B` and `/data/Qwen2.5-1.5B`).

The opt-out is `lora_base_ok` (CLI `--lora-base-ok`), recorded in the recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_lora_base", "same_base"]


def _hub_id(folder: Path) -> str | None:
    """`org/name` of a Hugging Face cache snapshot folder (…/models--org--name/snapshots/<sha>)."""
    for part in folder.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return None


def same_base(base: str | None, init: str | Path, init_config: Mapping[str, Any]) -> bool:
    """Whether an adapter trained on `base` (its `base_model_name_or_path`) belongs on `init`."""
    if not base:
        return True
    init = Path(init)
    recorded = Path(base).expanduser()
    if recorded.exists():
        return recorded.resolve() == init.resolve()
    resolved = init.resolve()
    names = {str(init), str(resolved), init_config.get("_name_or_path") or "", _hub_id(resolved) or ""}
    if base.rstrip("/") in {n.rstrip("/") for n in names if n}:
        return True
    last = {resolved.name, (_hub_id(resolved) or "").rsplit("/", 1)[-1]} - {""}
    return Path(base.rstrip("/")).name in last


def check_lora_base(base: str | None, init: str | Path, init_config: Mapping[str, Any], where: str) -> None:
    """ValueError naming both bases unless `same_base`; `where` names the adapter ("model 1 (path)")."""
    if same_base(base, init, init_config):
        return
    known = init_config.get("_name_or_path")
    init_names = f"{init}" + (f" (its config's _name_or_path: {known!r})" if known else "")
    raise ValueError(
        f"{where} is a LoRA adapter of {base!r} (base_model_name_or_path in its adapter_config.json), but the "
        f"init is {init_names}: its B·A was trained on other weights and means nothing on these. Pass its "
        f"base as the init, or, if {init} is the same model (a copy, a renamed folder), pass lora_base_ok=True "
        "(CLI: --lora-base-ok)."
    )

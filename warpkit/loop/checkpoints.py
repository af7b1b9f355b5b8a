"""A run's Trainer checkpoints, trusted only when verified: the record, the choice to resume, the finished case.

- `CheckpointRecord` (a TrainerCallback): after each save, `warpkit_checkpoint.json` lists every file of the
  checkpoint with its size, written atomically last, so a checkpoint cut short or damaged later is seen.
- `verify_checkpoint`: complete (`trainer_state.json`, the Trainer's last file), the anchor's state when the
  run needs it, sizes as recorded, and every safetensors file's header and length.
- `resume_point`: the newest checkpoint that verifies; the ones skipped are logged with the reason.
- `publish_finished`: a checkpoint at the run's last step is the finished run. Resuming from it would train
  one step more (transformers checks `max_steps` only after a step), so its model files become the policy
  directly: the bytes `save_model` wrote into the checkpoint are the bytes it writes at the end of a run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from warpkit._util.files import publish_dir, temp_prefix, write_atomic
from warpkit.merge.checkpoint import Checkpoint

__all__ = [
    "RECORD_NAME",
    "CheckpointRecord",
    "finished_step",
    "publish_finished",
    "resume_point",
    "verify_checkpoint",
]

RECORD_NAME = "warpkit_checkpoint.json"
log = logging.getLogger(__name__)
# Files of a checkpoint that are the Trainer's state, not the model `save_model` wrote.
_TRAINER_FILES = re.compile(
    r"^(optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|trainer_state\.json|training_args\.bin|rng_state.*\.pth|"
    r"warpkit_anchor.*\.safetensors|latest|zero_to_fp32\.py|global_step\d+|" + re.escape(RECORD_NAME) + r")$"
)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


class CheckpointRecord(TrainerCallback):
    """After every save, record each file of `checkpoint-N` with its size (main process; written last)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            files = {
                p.relative_to(folder).as_posix(): p.stat().st_size
                for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != RECORD_NAME
            }
            write_atomic(folder / RECORD_NAME, json.dumps({"files": files}, indent=1))


def verify_checkpoint(folder: Path, *, with_anchor: bool) -> str | None:
    """None when `folder` can be resumed from, else why not."""
    if not (folder / "trainer_state.json").is_file():
        return "incomplete (no trainer_state.json)"
    if with_anchor and not any(folder.glob("warpkit_anchor*.safetensors")):
        return "without the EMA anchor's state"
    record = folder / RECORD_NAME
    if record.is_file():
        try:
            files = json.loads(record.read_text())["files"]
        except (ValueError, KeyError) as e:
            return f"with an unreadable {RECORD_NAME} ({e})"
        for name, size in files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                return f"damaged ({name} is {'missing' if not path.is_file() else 'not the size recorded'})"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            Checkpoint(folder, [path]).close()
        except (ValueError, OSError) as e:
            return f"damaged ({e})"
    return None


def resume_point(output_dir: str | Path, *, with_anchor: bool = False) -> Path | None:
    """The newest `checkpoint-N` of `output_dir` that verifies, or None; the ones skipped are logged."""
    output_dir = Path(output_dir)
    steps = sorted(
        (int(p.name.removeprefix("checkpoint-")), p)
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()
    )
    for _, folder in reversed(steps):
        why = verify_checkpoint(folder, with_anchor=with_anchor)
        if why is None:
            return folder
        log.warning("%s is %s: not resuming from it, trying the one before.", folder, why)
    return None


def finished_step(checkpoint: Path) -> bool:
    """True when the checkpoint was saved at the run's last step (its `global_step` reached `max_steps`)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)


def publish_finished(checkpoint: Path, policy: Path) -> bool:
    """Publish the model files of a finished checkpoint as the run's policy; False when it holds no full
    weights (e.g. ZeRO-3 without 16-bit gathering), in which case the caller must produce them."""
    if not any((checkpoint / name).is_file() for name in _WEIGHTS):
        return False
    tmp = policy.parent / f"{temp_prefix(policy.name)}{os.urandom(4).hex()}"
    try:
        tmp.mkdir()
        for p in sorted(checkpoint.iterdir()):
            if p.is_file() and not _TRAINER_FILES.match(p.name):
                shutil.copy2(p, tmp / p.name)
        publish_dir(tmp, policy, overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True

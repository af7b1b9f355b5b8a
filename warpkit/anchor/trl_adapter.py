"""The one module of warpkit's anchor that touches TRL / transformers `Trainer` internals.

Written against TRL 1.16.0 (on transformers 5.24.0), by reading their source. `TrainerAdapter(trainer)` checks
every internal it relies on when an anchor callback (`EMAAnchorCallback`, `BEMAAnchorCallback`,
`ElasticResetCallback`) is constructed and raises `TrlInternalsError`, naming
these versions and this file, when one is missing: a TRL upgrade breaks here, loudly and before training,
not by silently losing the anchor's metrics or resuming with the SFT reference.

Private touch points (each is needed because callbacks are given neither the trainer nor the checkpoint):

1. `trainer._metrics` (TRL, `GRPOTrainer.__init__` / `RLOOTrainer.__init__`):
   `{"train": defaultdict(list), "eval": defaultdict(list)}`. Their `log()` averages each list into the next
   log line and clears it, so anything appended to `_metrics["train"]` reaches every `report_to` backend and
   `trainer.state.log_history` next to TRL's own `kl` and `reward`. A callback cannot add keys to a log line
   any other way (`on_log` receives the dict after it was reported).
2. `trainer._load_optimizer_and_scheduler(checkpoint)` (transformers `Trainer`, called by
   `_inner_training_loop` with the resolved `resume_from_checkpoint`, after the model is loaded and before
   `on_train_begin`, in every setup: plain, DDP, DeepSpeed). Wrapping it on the trainer instance is the only
   way to learn which checkpoint a resumed `train()` loads: callbacks are not told, and the folder may lie
   outside `output_dir`.

The trainers the anchor supports are TRL's `GRPOTrainer` and `RLOOTrainer` and their subclasses
(`check_trainer`): what they do with `ref_model`, the `"ref"` adapter and `beta` was read for 1.16. Every
other `transformers.Trainer` is refused by its class name: `DPOTrainer` (offline; with `precompute_ref_log_probs`
or PEFT it never runs a reference model the anchor could move), `OnlineDPOTrainer` (with LoRA it computes its
reference with the adapters disabled, so the anchor would be silently ignored), and the rest (SFT, reward,
KTO, distillation... trainers have no KL reference the anchor knows how to move). Objects that are not a
`Trainer` at all pass when they carry `args` and `beta`: the stand-ins of warpkit's tests and benchmarks.

Conventions read from TRL 1.16 that are public but TRL-specific:

- `REF_ADAPTER = "ref"`: with a `PeftModel` and beta > 0, TRL computes the reference log-probs under the
  adapter named `"ref"` whenever `"ref" in model.peft_config` (else under the bare base model).
- `trainer.beta`, `trainer.args`, `trainer.model` and `trainer.ref_model` (None when beta == 0 or with
  PEFT; a `DeepSpeedEngine` under DeepSpeed) are public attributes, read directly by the callback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

__all__ = [
    "ADAPTER_FILE",
    "REF_ADAPTER",
    "SUPPORTED_TRAINERS",
    "TRL_VERSION",
    "TrainerAdapter",
    "TrlInternalsError",
    "check_trainer",
]

TRL_VERSION = "1.16.0"  # the TRL release these touch points were read from
TRANSFORMERS_VERSION = "5.24.0"  # the transformers release `_load_optimizer_and_scheduler` was read from
ADAPTER_FILE = "warpkit/anchor/trl_adapter.py"  # the one file to update when TRL changes these internals
REF_ADAPTER = "ref"  # TRL's name for the PEFT adapter its reference forward runs under
SUPPORTED_TRAINERS = ("GRPOTrainer", "RLOOTrainer")  # TRL's classes (and subclasses) the anchor supports
# Why a trainer of TRL's is refused, by class name; others get the generic reason.
_WHY_NOT = {
    "DPOTrainer": "it is offline preference optimisation, and with precompute_ref_log_probs or a PeftModel it "
    "runs no reference model the anchor could move",
    "OnlineDPOTrainer": "with LoRA (a peft_config) it computes its reference with the adapters disabled "
    "(`model.disable_adapter()`), so the anchor would be silently ignored",
}
_WHY_NOT_OTHERS = "warpkit knows how the KL reference of those two trainers is computed, and of no other"


class TrlInternalsError(RuntimeError):
    """The trainer lacks a TRL/Trainer internal that `EMAAnchorCallback` relies on (a TRL version change)."""


def check_trainer(trainer: Any, who: str = "EMAAnchorCallback") -> None:
    """Refuse a trainer the anchor does not support, naming its class and why (TypeError).

    Accepted: TRL's `GRPOTrainer` and `RLOOTrainer` and their subclasses, and objects that are no
    `transformers.Trainer` at all but carry `args` and `beta` (stand-ins of tests and benchmarks). `who` names
    the callback in the message.
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        if getattr(trainer, "args", None) is None or not hasattr(trainer, "beta"):
            raise TypeError(
                f"{who} needs a TRL GRPOTrainer or RLOOTrainer instance, got {type(trainer).__name__}."
            )
        return
    from trl import GRPOTrainer, RLOOTrainer

    if isinstance(trainer, (GRPOTrainer, RLOOTrainer)):
        return
    names = [c.__name__ for c in type(trainer).__mro__]
    why = next((_WHY_NOT[n] for n in names if n in _WHY_NOT), _WHY_NOT_OTHERS)
    raise TypeError(
        f"{who} supports TRL's GRPOTrainer and RLOOTrainer (and their subclasses), not "
        f"{type(trainer).__name__}: {why}. Train with RLOOTrainer or GRPOTrainer (as `warpkit train` and "
        "`warpkit.loop.rl` do), or leave the callback out."
    )


class TrainerAdapter:
    """The anchor's access to a TRL `GRPOTrainer` / `RLOOTrainer`'s private internals, checked on construction.

    Raises TypeError for a trainer the anchor does not support (`check_trainer`), and `TrlInternalsError` when
    `trainer._metrics` is not a dict with a `"train"` dict of metric lists, or
    `trainer._load_optimizer_and_scheduler` is not a method.
    """

    def __init__(self, trainer: Any, who: str = "EMAAnchorCallback") -> None:
        check_trainer(trainer, who)
        store = getattr(trainer, "_metrics", None)
        if not isinstance(store, dict) or not isinstance(store.get("train"), dict):
            raise TrlInternalsError(
                _incompatible(
                    trainer,
                    who,
                    f"`trainer._metrics` should be a dict with a 'train' dict of metric lists, got "
                    f"{_describe(store)}",
                )
            )
        if not callable(getattr(trainer, "_load_optimizer_and_scheduler", None)):
            raise TrlInternalsError(
                _incompatible(
                    trainer, who, "`trainer._load_optimizer_and_scheduler(checkpoint)` does not exist"
                )
            )
        self.trainer = trainer

    def log_train_metrics(self, metrics: Mapping[str, float]) -> None:
        """Append each value to `trainer._metrics["train"][key]`; TRL's `log()` averages them into its next
        log line (touch point 1)."""
        store = self.trainer._metrics["train"]
        for key, value in metrics.items():
            store.setdefault(key, []).append(value)

    def on_resume(self, record: Callable[[str], None]) -> None:
        """Call `record(checkpoint)` when `trainer.train(resume_from_checkpoint=...)` loads `checkpoint`, before
        the trainer loads its optimizer and before `on_train_begin` (touch point 2)."""
        load = self.trainer._load_optimizer_and_scheduler

        def load_and_record(checkpoint, *args, **kwargs):
            record(checkpoint)
            return load(checkpoint, *args, **kwargs)

        self.trainer._load_optimizer_and_scheduler = load_and_record


def _incompatible(trainer: Any, who: str, what: str) -> str:
    return (
        f"{who} cannot attach to this {type(trainer).__name__}: {what}. warpkit's anchor was written "
        f"against TRL {TRL_VERSION} (transformers {TRANSFORMERS_VERSION}); installed: TRL "
        f"{_installed('trl')}, transformers {_installed('transformers')}. Every TRL internal the anchor uses is "
        f"in {ADAPTER_FILE}: update that one file for this TRL, or install trl=={TRL_VERSION}."
    )


def _describe(store: Any) -> str:
    if store is None:
        return "nothing"
    if not isinstance(store, dict):
        return f"a {type(store).__name__}"
    if "train" not in store:
        return f"a dict with keys {sorted(map(str, store))}"
    return f"a dict whose 'train' entry is a {type(store['train']).__name__}"


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"

"""The Trainer-facing side of the anchor (events, guards, logging, checkpoints): `AnchorCallback`, what every
anchor kind shares, and `EMAAnchorCallback`, WARP's stage 1.

What to average lives in the layouts (`warpkit.anchor.layouts`, `warpkit.anchor.lora`), the update rule in
`warpkit.anchor.ema`, and every TRL internal in `warpkit.anchor.trl_adapter`; this module decides when. The
relatives (`warpkit.anchor.bema`, `warpkit.anchor.elastic`) subclass `AnchorCallback`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from time import perf_counter
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from warpkit._util.files import atomic_file
from warpkit.anchor.layouts import Layout, full_layout, unwrap
from warpkit.anchor.lora import LoraMode, ensure_ref_adapter, lora_layers, lora_layout
from warpkit.anchor.trl_adapter import TrainerAdapter

__all__ = [
    "STATE_FORMAT",
    "AnchorCallback",
    "EMAAnchorCallback",
    "check_full_reference",
    "logging_every",
    "peft_model",
    "rank_world",
    "warn_if_anchor_is_stale",
]

STATE_FORMAT = "warpkit-anchor-v1"  # the state file's `format` metadata


class AnchorCallback(TrainerCallback):
    """What every anchor kind shares: the layout bound when training starts, the resume hook, the state file in
    every checkpoint, and the save order (the anchor's file before the Trainer's `trainer_state.json`).

    A subclass sets `description` (how messages name its state), implements `_bind` (its layout), `step` (what
    happens after an optimizer step), and `_state_metadata` / `_restore_metadata` (its counters in the state
    file), and calls `_attach(adapter)` last in its `__init__`, once its checks passed.
    """

    description: ClassVar[str] = "the anchor"  # "the EMA anchor": how refusals name the saved state

    def _attach(self, trainer: Any, adapter: TrainerAdapter) -> None:
        self.adapter = adapter
        self.trainer = trainer
        self.resume_dir: str | None = None  # the checkpoint `trainer.train(resume_from_checkpoint=...)` loads
        self._layout: Layout | None = None
        self._saved_step = -1
        adapter.on_resume(self._record_resume_dir)

    @property
    def layout(self) -> Layout:
        """Where the anchor lives (bound to the trainer's models on first use and at every train begin)."""
        if self._layout is None:
            self._layout = self._bind()
        return self._layout

    def _bind(self) -> Layout:
        raise NotImplementedError

    def _record_resume_dir(self, checkpoint: str) -> None:
        self.resume_dir = checkpoint

    # ---- Trainer events --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._layout = self._bind()
        if state.global_step > 0:
            self.load_state(
                self.resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            )
        else:
            self.reset_to_policy()

    def on_step_end(self, args, state, control, **kwargs):
        if self._layout is None:
            return
        self.step(args, state)
        if control.should_save:
            # Write the anchor into checkpoint-N *before* the Trainer writes the model and, last of all,
            # trainer_state.json, so a checkpoint whose trainer_state.json exists always holds its anchor (a crash
            # in between leaves no state file, and resume tools skip the checkpoint).
            self._save_for_step(args, state)

    def step(self, args, state) -> None:
        """What happens after optimizer step `state.global_step` (the update rule, logging)."""
        raise NotImplementedError

    def on_save(self, args, state, control, **kwargs):
        # saves the step-based path did not see (epoch strategy, an explicit `trainer._save_checkpoint`)
        self._save_for_step(args, state)

    def _save_for_step(self, args, state) -> None:
        if self._layout is not None and self._saved_step != state.global_step:
            self.save_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            self._saved_step = state.global_step

    def reset_to_policy(self) -> None:
        """The state at step 0: the anchor (and any tracker) equal to the policy, whatever TRL loaded."""
        self.layout.reset_to_policy()

    @torch.no_grad()
    def distance(self) -> float:
        """|anchor - policy| / |policy| over the averaged tensors (for LoRA exact: over the deltas D, s B A).

        Collective under ZeRO-3 (the sums are all-reduced): call it on every rank.
        """
        num, den = self.layout.squared_distance_parts()
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    def anchor_state(self) -> dict[str, Tensor]:
        """The anchor's fp32 state by name (this rank's slices under ZeRO-3; D per layer for LoRA exact)."""
        return self.layout.state_dict()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _state_metadata(self) -> dict[str, str]:
        """This kind's settings and counters, written into the state file's metadata."""
        raise NotImplementedError

    def _restore_metadata(self, meta: dict[str, str]) -> None:
        """Restore the counters `_state_metadata` wrote."""
        raise NotImplementedError

    def save_state(self, directory: str | os.PathLike) -> None:
        """Write this rank's anchor state into `directory` (a Trainer checkpoint), atomically.

        File `warpkit_anchor.safetensors` (rank 0), or `warpkit_anchor-rank<r>-of-<w>.safetensors` per rank
        under ZeRO-3; metadata: format, layout, the kind's settings and counters, world_size.
        """
        layout = self.layout
        rank, world = rank_world()
        meta = {
            "format": STATE_FORMAT,
            "layout": layout.kind,
            **self._state_metadata(),
            "world_size": str(world),
        }
        state = layout.state_dict()  # every rank takes part (cheap, local), only the writers save
        if not layout.writes_state(rank):
            return
        with atomic_file(Path(directory) / layout.state_file_name(rank, world)) as tmp:
            save_file(state, str(tmp), metadata=meta)

    @torch.no_grad()
    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore the anchor saved by `save_state` in `directory` and refresh the reference from it."""
        layout = self.layout
        path = Path(directory) / layout.state_file_name(*rank_world())
        if not path.is_file():
            raise FileNotFoundError(
                f"Resuming at a global step > 0 but {path} does not exist, so {self.description} cannot be "
                f"restored. Resume from a checkpoint written with {type(self).__name__} attached (with the same "
                "number of processes under ZeRO-3), or set `callback.resume_dir` to the checkpoint folder."
            )
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT or meta.get("layout") != layout.kind:
            raise ValueError(
                f"{path} holds layout {meta.get('layout')!r} (format {meta.get('format')!r}) but this run "
                f"needs {layout.kind!r} ({STATE_FORMAT}); was it written by another setup?"
            )
        layout.load_state_dict(load_file(str(path)), source=str(path))
        self._restore_metadata(meta)


class EMAAnchorCallback(AnchorCallback):
    """EMA anchor for TRL's `GRPOTrainer` / `RLOOTrainer` (WARP stage 1; TR-DPO with `update_every > 1`).

    ```python
    trainer = RLOOTrainer(...)          # or GRPOTrainer, with args.beta > 0
    trainer.add_callback(EMAAnchorCallback(trainer, ema_rate=0.01, update_every=1))
    trainer.train()
    ```

    Every tau = `update_every` optimizer steps, anchor <- (1 - mu) * anchor + mu * policy with mu = `ema_rate`,
    starting from anchor = policy when training starts (whatever TRL loaded as its reference).

    Args:
        trainer: the TRL trainer whose reference becomes the anchor (callbacks are not given the reference).
        ema_rate: mu in (0, 1]; the paper uses 0.01. mu = 1 makes the anchor the previous policy.
        update_every: tau >= 1, in optimizer steps.
        lora_mode: for a `PeftModel`, "exact" (EMA of W0 + s B A, dense D per layer) or "factors" (EMA of A and
            B separately: an approximation, see `warpkit.anchor.lora`).

    Logs through the trainer: `anchor/ema_rate`, `anchor/distance` (|anchor - policy| / |policy| over the
    averaged tensors) and `anchor/update_seconds`, at logging steps.

    Raises:
        TypeError: `trainer` is not a `GRPOTrainer` / `RLOOTrainer` (or subclass): other TRL trainers are
            refused by name (`trl_adapter.check_trainer`).
        ValueError: a bad argument, beta == 0, `sync_ref_model=True`, no reference, an unsupported adapter.
        TrlInternalsError: the installed TRL lacks an internal the anchor relies on (see `trl_adapter`).
    """

    description = "the EMA anchor"

    def __init__(
        self, trainer: Any, ema_rate: float = 0.01, update_every: int = 1, *, lora_mode: LoraMode = "exact"
    ) -> None:
        adapter = TrainerAdapter(trainer)  # refuses other trainers, and fails loudly if TRL's internals moved
        _check_arguments(trainer, ema_rate, update_every, lora_mode)
        warn_if_anchor_is_stale(trainer.args)
        self.ema_rate = float(ema_rate)
        self.update_every = update_every
        self.lora_mode: LoraMode = lora_mode
        self.num_updates = 0
        self._peft = peft_model(trainer)
        if self._peft is not None:
            lora_layers(self._peft)  # refuse unsupported adapters now rather than when training starts
            ensure_ref_adapter(self._peft)
        elif trainer.ref_model is None:
            raise ValueError(
                "trainer.ref_model is None although beta > 0 and the model is not a PeftModel; there is no "
                "reference to turn into an anchor."
            )
        self._attach(trainer, adapter)

    def _bind(self) -> Layout:
        if self._layout is not None:
            self._layout.release()
            self._layout = None
        if self._peft is not None:
            return lora_layout(self._peft, self.lora_mode)
        return full_layout(unwrap(self.trainer.model), unwrap(self.trainer.ref_model))

    def step(self, args, state) -> None:
        if state.global_step % self.update_every == 0:
            start = perf_counter()
            self.update()
            seconds = perf_counter() - start
            if args.logging_steps and state.global_step % logging_every(args, state) == 0:
                self.adapter.log_train_metrics(
                    {
                        "anchor/ema_rate": self.ema_rate,
                        "anchor/distance": self.distance(),
                        "anchor/update_seconds": seconds,
                    }
                )

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step, anchor <- (1 - mu) anchor + mu policy, on every rank (collective under ZeRO-3)."""
        self.layout.update(self.ema_rate)
        self.num_updates += 1

    def _state_metadata(self) -> dict[str, str]:
        return {
            "ema_rate": repr(self.ema_rate),
            "update_every": str(self.update_every),
            "num_updates": str(self.num_updates),
        }

    def _restore_metadata(self, meta: dict[str, str]) -> None:
        self.num_updates = int(meta.get("num_updates", 0))


def _check_arguments(trainer: Any, ema_rate: Any, update_every: Any, lora_mode: Any) -> None:
    """ValueError for values the anchor cannot work with, naming the value and the fix."""
    if isinstance(ema_rate, bool) or not isinstance(ema_rate, (int, float)) or not 0.0 < ema_rate <= 1.0:
        raise ValueError(
            f"ema_rate must be a number in (0, 1], got {ema_rate!r}; WARP uses 0.01 "
            "(0 would freeze the anchor: use a plain SFT reference instead)."
        )
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an integer >= 1 (optimizer steps), got {update_every!r}.")
    if lora_mode not in ("exact", "factors"):
        raise ValueError(f"lora_mode must be 'exact' or 'factors', got {lora_mode!r}.")
    if trainer.beta == 0.0:
        raise ValueError(
            "The trainer has beta == 0, so it keeps no reference model and there is no anchor to average. "
            "Set `beta > 0` in the GRPOConfig/RLOOConfig (WARP uses 0.1)."
        )
    if getattr(trainer.args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True installs TRL's own SyncRefModelCallback, which would update the same "
            "reference a second time. Set `sync_ref_model=False`; for TR-DPO's schedule pass "
            "`ema_rate=ref_model_mixup_alpha, update_every=ref_model_sync_steps` here instead."
        )


def check_full_reference(trainer: Any, who: str, needs: str) -> None:
    """The refusals the anchor's relatives share (ValueError naming the fix): no reference (beta == 0 or none
    loaded), TRL's own reference sync, and LoRA (they support full fine-tuning only). `needs` says what `who`
    keeps in the reference."""
    if trainer.beta == 0.0:
        raise ValueError(
            f"The trainer has beta == 0, so TRL keeps no reference model, and {who} needs one ({needs}). Set "
            "`beta > 0` in the GRPOConfig/RLOOConfig, or leave the callback out for a run without a KL term."
        )
    if getattr(trainer.args, "sync_ref_model", False):
        raise ValueError(
            f"sync_ref_model=True installs TRL's own SyncRefModelCallback, which would rewrite the reference "
            f"{who} keeps ({needs}). Set `sync_ref_model=False`."
        )
    if peft_model(trainer) is not None:
        raise ValueError(
            f"{who} supports full fine-tuning only, and this model is a PeftModel (LoRA). Train without "
            "peft_config / get_peft_model, or use EMAAnchorCallback (rl.anchor: ema), which supports LoRA."
        )
    if trainer.ref_model is None:
        raise ValueError(f"trainer.ref_model is None although beta > 0: {who} needs it ({needs}).")


def warn_if_anchor_is_stale(args: Any) -> None:
    """UserWarning when reference log-probs are reused over several optimizer steps (a stale anchor)."""
    steps_per_generation = getattr(args, "steps_per_generation", None) or args.gradient_accumulation_steps
    num_iterations = getattr(args, "num_iterations", 1)
    if steps_per_generation > args.gradient_accumulation_steps or num_iterations > 1:
        warnings.warn(
            f"steps_per_generation={steps_per_generation} > gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} or num_iterations={num_iterations} > 1: reference "
            "log-probs are computed once per generation batch, so the buffered steps use an anchor that is "
            "up to "
            f"{max(steps_per_generation // args.gradient_accumulation_steps, 1) * num_iterations - 1} "
            "updates stale. Set steps_per_generation = gradient_accumulation_steps and num_iterations = 1 "
            "for the exact WARP schedule.",
            UserWarning,
            stacklevel=3,
        )


def logging_every(args, state) -> int:
    steps = args.logging_steps
    if isinstance(steps, float) and steps < 1:  # a fraction of max_steps, as Trainer allows
        steps = math.ceil(state.max_steps * steps)
    return max(int(steps), 1)


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def peft_model(trainer) -> nn.Module | None:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a model without it is simply not a PeftModel
        return None
    model = unwrap(trainer.model)
    return model if isinstance(model, PeftModel) else None

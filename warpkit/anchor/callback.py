"""EMAAnchorCallback: the Trainer-facing side of the EMA anchor (events, guards, logging, checkpoints)."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import TrainerCallback

from warpkit.anchor.ema import ema_update_, squared_distance_and_norm
from warpkit.anchor.layouts import (
    Layout,
    LoraMode,
    ensure_ref_adapter,
    full_layout,
    lora_layers,
    lora_layout,
    unwrap,
)

__all__ = ["EMAAnchorCallback"]

STATE_FORMAT = "warpkit-anchor-v1"


class EMAAnchorCallback(TrainerCallback):
    """EMA anchor for TRL's `GRPOTrainer` / `RLOOTrainer` (WARP stage 1; TR-DPO with `update_every > 1`).

    ```python
    trainer = RLOOTrainer(...)          # or GRPOTrainer, with args.beta > 0
    trainer.add_callback(EMAAnchorCallback(trainer, ema_rate=0.01, update_every=1))
    trainer.train()
    ```

    Args:
        trainer: the TRL trainer whose reference becomes the anchor (callbacks are not given the reference).
        ema_rate: mu in (0, 1]; the paper uses 0.01. mu = 1 makes the anchor the previous policy.
        update_every: tau >= 1, in optimizer steps.
        lora_mode: for a `PeftModel`, "exact" (EMA of W0 + s B A, dense D per layer) or "factors" (EMA of A and
            B separately: an approximation, see the module docstring).

    Logs through the trainer: `anchor/ema_rate`, `anchor/distance` (|anchor - policy| / |policy| over the
    averaged tensors) and `anchor/update_seconds`, at logging steps.
    """

    def __init__(
        self, trainer: Any, ema_rate: float = 0.01, update_every: int = 1, *, lora_mode: LoraMode = "exact"
    ) -> None:
        args = getattr(trainer, "args", None)
        if args is None or not hasattr(trainer, "beta"):
            raise TypeError(
                f"EMAAnchorCallback needs a TRL GRPOTrainer or RLOOTrainer instance, got {type(trainer).__name__}."
            )
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
        if getattr(args, "sync_ref_model", False):
            raise ValueError(
                "sync_ref_model=True installs TRL's own SyncRefModelCallback, which would update the same "
                "reference a second time. Set `sync_ref_model=False`; for TR-DPO's schedule pass "
                "`ema_rate=ref_model_mixup_alpha, update_every=ref_model_sync_steps` here instead."
            )
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
                stacklevel=2,
            )
        self.trainer = trainer
        self.ema_rate = float(ema_rate)
        self.update_every = update_every
        self.lora_mode: LoraMode = lora_mode
        self.num_updates = 0
        self.resume_dir: str | None = None  # the checkpoint `trainer.train(resume_from_checkpoint=...)` loads
        _record_resume_dir(trainer, self)
        self._layout: Layout | None = None
        self._hooks: list[Any] = []
        self._saved_step = -1
        self._peft = _peft_model(trainer)
        if self._peft is not None:
            lora_layers(self._peft)  # refuse unsupported adapters now rather than when training starts
            ensure_ref_adapter(self._peft)
        elif trainer.ref_model is None:
            raise ValueError(
                "trainer.ref_model is None although beta > 0 and the model is not a PeftModel; there is no "
                "reference to turn into an anchor."
            )

    # ---- binding ---------------------------------------------------------------------------------------
    def _bind(self) -> Layout:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._peft is not None:
            return lora_layout(self._peft, self.lora_mode, self._hooks)
        policy = unwrap(self.trainer.model)
        ref = unwrap(self.trainer.ref_model)
        return full_layout(policy, ref)

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
        if state.global_step % self.update_every == 0:
            start = time.perf_counter()
            self.update()
            seconds = time.perf_counter() - start
            if args.logging_steps and state.global_step % _logging_every(args, state) == 0:
                self._log(
                    {
                        "anchor/ema_rate": self.ema_rate,
                        "anchor/distance": self.distance(),
                        "anchor/update_seconds": seconds,
                    }
                )
        if control.should_save:
            # Write the anchor into checkpoint-N *before* the Trainer writes the model and, last of all,
            # trainer_state.json, so a checkpoint whose trainer_state.json exists always holds its anchor (a crash
            # in between leaves no state file, and resume tools skip the checkpoint).
            self._save_for_step(args, state)

    def on_save(self, args, state, control, **kwargs):
        # saves the step-based path did not see (epoch strategy, an explicit `trainer._save_checkpoint`)
        self._save_for_step(args, state)

    def _save_for_step(self, args, state) -> None:
        if self._layout is not None and self._saved_step != state.global_step:
            self.save_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            self._saved_step = state.global_step

    # ---- the anchor ------------------------------------------------------------------------------------
    def reset_to_policy(self) -> None:
        """anchor <- policy (the start of an iteration: both equal the init)."""
        layout = self._require_layout()
        if layout.kind == "lora_exact":
            for d, (b, a, s) in zip(layout.state, layout.sources, strict=True):
                torch.mul(b.detach().float() @ a.detach().float(), s, out=d)
        else:
            torch._foreach_copy_(layout.state, [s.detach() for s in layout.sources])
        layout.write_targets()

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step, anchor <- (1 - mu) anchor + mu policy, on every rank (collective under ZeRO-3)."""
        layout = self._require_layout()
        if layout.kind == "lora_exact":
            # D <- (1 - mu) D + mu * s * B @ A: one addmm per adapted layer, no temporary of size out x in
            for d, (b, a, s) in zip(layout.state, layout.sources, strict=True):
                d.addmm_(b.float(), a.float(), beta=1.0 - self.ema_rate, alpha=self.ema_rate * s)
        else:
            ema_update_(layout.state, layout.sources, self.ema_rate, out=layout.targets)
        if layout.kind == "lora_exact":
            layout.write_targets()
        else:
            for fn in layout.after_write:
                fn()
        self.num_updates += 1

    @torch.no_grad()
    def distance(self) -> float:
        """|anchor - policy| / |policy| over the averaged tensors (for LoRA exact: over the deltas D, s B A)."""
        layout = self._require_layout()
        if layout.kind == "lora_exact":
            num = den = 0.0
            for d, (b, a, s) in zip(layout.state, layout.sources, strict=True):
                delta = b.float() @ a.float() * s
                num += float(torch.linalg.vector_norm(d - delta) ** 2)
                den += float(torch.linalg.vector_norm(delta) ** 2)
        else:
            num, den = squared_distance_and_norm(layout.state, layout.sources)
        if layout.kind == "zero3":  # each rank holds slices: sum the squares over ranks
            import torch.distributed as dist

            sums = torch.tensor([num, den], dtype=torch.float64)
            dist.all_reduce(sums)
            num, den = sums.tolist()
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    def anchor_state(self) -> dict[str, Tensor]:
        """The anchor's fp32 state by name (this rank's slices under ZeRO-3; D per layer for LoRA exact)."""
        layout = self._require_layout()
        return {
            n: s.detach().float().cpu().contiguous() for n, s in zip(layout.names, layout.state, strict=True)
        }

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _state_file(self, directory: str | os.PathLike) -> Path | None:
        layout = self._require_layout()
        rank, world = _rank_world()
        if layout.kind == "zero3":
            return Path(directory) / f"warpkit_anchor-rank{rank}-of-{world}.safetensors"
        return Path(directory) / "warpkit_anchor.safetensors" if rank == 0 else None

    def save_state(self, directory: str | os.PathLike) -> None:
        """Write this rank's anchor state into `directory` (a Trainer checkpoint), atomically."""
        path = self._state_file(directory)
        layout = self._require_layout()
        meta = {
            "format": STATE_FORMAT,
            "layout": layout.kind,
            "ema_rate": repr(self.ema_rate),
            "update_every": str(self.update_every),
            "num_updates": str(self.num_updates),
            "world_size": str(_rank_world()[1]),
        }
        state = self.anchor_state()  # every rank takes part (cheap, local), only the writer saves
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(state, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @torch.no_grad()
    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore the anchor saved by `save_state` in `directory` and refresh the reference from it."""
        layout = self._require_layout()
        if layout.kind != "zero3":
            path = Path(directory) / "warpkit_anchor.safetensors"
        else:
            rank, world = _rank_world()
            path = Path(directory) / f"warpkit_anchor-rank{rank}-of-{world}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"Resuming at a global step > 0 but {path} does not exist, so the EMA anchor cannot be restored. "
                "Resume from a checkpoint written with EMAAnchorCallback attached (with the same number of "
                "processes under ZeRO-3), or set `callback.resume_dir` to the checkpoint folder."
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT or meta.get("layout") != layout.kind:
            raise ValueError(
                f"{path} holds layout {meta.get('layout')!r} (format {meta.get('format')!r}) but this run "
                f"needs {layout.kind!r} ({STATE_FORMAT}); was it written by another setup?"
            )
        saved = load_file(str(path))
        if set(saved) != set(layout.names):
            missing, extra = set(layout.names) - set(saved), set(saved) - set(layout.names)
            raise ValueError(
                f"{path} does not match the model: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}."
            )
        for name, st in zip(layout.names, layout.state, strict=True):
            if saved[name].shape != st.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(saved[name].shape)}, the model {tuple(st.shape)}."
                )
            st.copy_(saved[name])
        self.num_updates = int(meta.get("num_updates", 0))
        layout.write_targets()

    # ---- helpers ---------------------------------------------------------------------------------------
    def _require_layout(self) -> Layout:
        if self._layout is None:
            self._layout = self._bind()
        return self._layout

    def _log(self, metrics: dict[str, float]) -> None:
        store = getattr(self.trainer, "_metrics", None)  # TRL averages these into its next log line
        if isinstance(store, dict) and "train" in store:
            for key, value in metrics.items():
                store["train"][key].append(value)


def _record_resume_dir(trainer, callback: EMAAnchorCallback) -> None:
    """Note which checkpoint a resumed `train()` loads: callbacks are not told, and it may lie outside output_dir.

    `Trainer` loads the optimizer from the resumed checkpoint before `on_train_begin` in every setup (plain,
    DDP, DeepSpeed), so the callback wraps that one method of this trainer instance.
    """
    load = trainer._load_optimizer_and_scheduler

    def load_and_record(checkpoint, *args, **kwargs):
        callback.resume_dir = checkpoint
        return load(checkpoint, *args, **kwargs)

    trainer._load_optimizer_and_scheduler = load_and_record


def _logging_every(args, state) -> int:
    steps = args.logging_steps
    if isinstance(steps, float) and steps < 1:  # a fraction of max_steps, as Trainer allows
        steps = math.ceil(state.max_steps * steps)
    return max(int(steps), 1)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _peft_model(trainer) -> nn.Module | None:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a model without it is simply not a PeftModel
        return None
    model = unwrap(trainer.model)
    return model if isinstance(model, PeftModel) else None


# ---- full fine-tuning ----------------------------------------------------------------------------------

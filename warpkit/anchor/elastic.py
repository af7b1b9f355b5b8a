"""Elastic Reset: the policy is periodically reset to an EMA of itself, and the EMA to the init.

Elastic Reset (Noukhovitch, Lavoie, Strub, Courville 2023, "Language Model Alignment with Elastic Reset",
arXiv 2312.07551) "periodically resets the online model to an exponentially moving average (EMA) of itself,
then resets the EMA model to the initial model". The KL reference stays the initial model. With mu the EMA
rate (the paper's decay 0.995 is mu = 0.005) and n = `reset_every`, after optimizer step t:

    EMA    <- (1 - mu) EMA + mu policy            every `update_every` steps (the paper: every step)
    if t % n == 0:  policy <- EMA ;  EMA <- init  (in this order, after the EMA update of step t)

with init = policy = EMA at the start of training (t = 0).

Choices made here:

- The KL reference is TRL's reference model, set to the policy when training starts (so it is the init even
  when the in-memory policy differs from what TRL re-loaded from disk) and never moved afterwards; it is also
  where the init is kept for the EMA's reset (no second copy). Held in the reference's dtype (normally the
  policy's), so the reset EMA <- init is exact.
- The EMA is an fp32 tracker of its own (bf16 cannot hold an update of size mu = 0.005).
- At a reset only the policy's weights change: the optimizer state (Adam's moments, its step count) and the
  learning-rate schedule carry on as they are (our choice: the paper speaks of resetting weights; not
  checked against its code).
- Full fine-tuning, single process, or DDP (every rank resets its replica identically). Refused: a
  `PeftModel` (the EMA of W0 + s B A is full rank and cannot be written back into rank-r factors), DeepSpeed
  and FSDP (their optimizers keep their own copy of the weights, fp32 and partitioned, which would undo the
  reset at the next step).

Checkpoints: `warpkit_anchor.safetensors`, layout `elastic_reset_full`, holds `ema.<name>` and `init.<name>`
and the counters `num_updates`, `num_resets`: a run resumed between two resets continues bitwise as one that
was never interrupted (the policy itself is in the Trainer's checkpoint).
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import torch

from warpkit.anchor.callback import AnchorCallback, check_full_reference, logging_every
from warpkit.anchor.ema import copy_distinct_, ema_update_
from warpkit.anchor.layouts import FullLayout, Layout, full_layout, unwrap
from warpkit.anchor.schedules import ElasticSchedule
from warpkit.anchor.trl_adapter import TrainerAdapter

__all__ = ["ElasticResetCallback", "ElasticResetLayout"]


class ElasticResetLayout(Layout):
    """The EMA (`ema.<n>`, fp32) and the init (`init.<n>`: the reference's own parameters, the KL anchor) over
    a `FullLayout` built with `shadow=False` (whose state is the reference itself)."""

    kind = "elastic_reset_full"  # the state file's `layout`: a file format, never change it

    def __init__(self, base: FullLayout) -> None:
        self.base = base
        self.ema = [s.detach().to(torch.float32, copy=True) for s in base.sources]  # the policy until a reset
        names = [f"{part}.{n}" for part in ("ema", "init") for n in base.names]
        super().__init__(names, self.ema + list(base.targets))

    def reset_to_policy(self) -> None:
        """init <- policy (the reference), EMA <- policy: the state at step 0."""
        self.base.reset_to_policy()
        torch._foreach_copy_(self.ema, [s.detach() for s in self.base.sources])

    @torch.no_grad()
    def update(self, ema_rate: float) -> None:
        """EMA <- (1 - mu) EMA + mu policy (mu = `ema_rate`); the reference is not touched."""
        ema_update_(self.ema, self.base.sources, ema_rate)

    @torch.no_grad()
    def reset(self) -> None:
        """policy <- EMA (cast to the policy's dtype), then EMA <- init."""
        copy_distinct_(self.base.sources, self.ema)
        torch._foreach_copy_(self.ema, self.base.targets)

    def squared_distance_parts(self) -> tuple[float, float]:
        return (
            self.base.squared_distance_parts()
        )  # |init - policy|^2, |policy|^2: the KL reference's distance

    def write_targets(self) -> None:
        self.base.after_targets_changed()  # the init is part of the state: loaded in place


class ElasticResetCallback(AnchorCallback):
    """Elastic Reset for TRL's `GRPOTrainer` / `RLOOTrainer` (full fine-tuning, single process or DDP, beta > 0).

    ```python
    trainer = RLOOTrainer(...)          # the KL reference stays the init
    trainer.add_callback(ElasticResetCallback(trainer, reset_every=50, ema_rate=0.005))
    trainer.train()
    ```

    Args:
        trainer: the TRL trainer (its reference holds the init, the KL anchor).
        reset_every: n >= 1, optimizer steps between resets (policy <- EMA, EMA <- init).
        ema_rate: mu in (0, 1], the EMA's rate; the paper's decay 0.995 is mu = 0.005.
        update_every: EMA update period >= 1 in optimizer steps (the paper: 1).

    Logs `anchor/ema_rate`, `anchor/distance` (|init - policy| / |policy|), `anchor/resets` and
    `anchor/update_seconds` at logging steps.

    Raises:
        TypeError: not a `GRPOTrainer` / `RLOOTrainer` (`trl_adapter.check_trainer`).
        ValueError: reset_every < 1, a rate outside (0, 1], update_every < 1, beta == 0, `sync_ref_model=True`,
            a `PeftModel`, DeepSpeed or FSDP, no reference.
        TrlInternalsError: the installed TRL lacks an internal the callback relies on (see `trl_adapter`).
    """

    description = "the Elastic Reset state (EMA and init)"

    def __init__(
        self, trainer: Any, reset_every: int, ema_rate: float = 0.005, update_every: int = 1
    ) -> None:
        adapter = TrainerAdapter(trainer, "ElasticResetCallback")
        self.schedule = ElasticSchedule(reset_every, ema_rate, update_every)
        check_full_reference(trainer, "ElasticResetCallback", "the init, the KL anchor the EMA is reset to")
        engines = [n for n in ("deepspeed", "fsdp") if getattr(trainer, f"is_{n}_enabled", False)]
        if engines:
            raise ValueError(
                f"ElasticResetCallback resets the policy's weights in place, but under {engines[0]} the "
                "optimizer keeps its own copy of them (fp32, partitioned) and would undo the reset at the next "
                "step. Run Elastic Reset in one process or with DDP (accelerate_configs/multi_gpu.yaml)."
            )
        self.num_updates = 0
        self.num_resets = 0
        self._attach(trainer, adapter)

    def _bind(self) -> Layout:
        base = full_layout(unwrap(self.trainer.model), unwrap(self.trainer.ref_model), shadow=False)
        if not isinstance(base, FullLayout):
            raise ValueError("ElasticResetCallback does not support DeepSpeed ZeRO-3 (see its docstring).")
        return ElasticResetLayout(base)

    @property
    def elastic(self) -> ElasticResetLayout:
        layout = self.layout
        assert isinstance(layout, ElasticResetLayout)
        return layout

    def step(self, args, state) -> None:
        t, schedule = state.global_step, self.schedule
        start = perf_counter()
        if schedule.updates_at(t):
            self.elastic.update(schedule.ema_rate)
            self.num_updates += 1
        if schedule.resets_at(t):
            self.elastic.reset()
            self.num_resets += 1
        seconds = perf_counter() - start
        if args.logging_steps and t % logging_every(args, state) == 0:
            self.adapter.log_train_metrics(
                {
                    "anchor/ema_rate": schedule.ema_rate,
                    "anchor/distance": self.distance(),
                    "anchor/resets": float(self.num_resets),
                    "anchor/update_seconds": seconds,
                }
            )

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA tracker (fp32, by parameter name)."""
        return {
            n: e.detach().cpu().clone()
            for n, e in zip(self.elastic.base.names, self.elastic.ema, strict=True)
        }

    def _state_metadata(self) -> dict[str, str]:
        return {
            "reset_every": str(self.schedule.reset_every),
            "ema_rate": repr(self.schedule.ema_rate),
            "update_every": str(self.schedule.update_every),
            "num_updates": str(self.num_updates),
            "num_resets": str(self.num_resets),
        }

    def _restore_metadata(self, meta: dict[str, str]) -> None:
        self.num_updates = int(meta.get("num_updates", 0))
        self.num_resets = int(meta.get("num_resets", 0))

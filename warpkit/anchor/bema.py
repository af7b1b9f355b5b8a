"""BEMA as the KL reference: the anchor is the bias-corrected EMA of the policy.

BEMA (Block et al. 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes", arXiv 2508.00180),
as TRL's `trl.trainer.callbacks.BEMACallback` computes it (TRL 1.16, same parameter names and schedule, see
`warpkit.anchor.schedules.BemaSchedule`). At an update step t, with theta_t the policy:

    EMA_t    = (1 - beta_t) EMA_{t-1} + beta_t theta_t
    anchor_t = EMA_t + alpha_t (theta_t - theta_0)

theta_0 is the policy at step tau (`update_after`); before the first update the anchor is the policy at the
start of training (the init), whatever TRL loaded as its reference. TRL's callback keeps that iterate in a
separate `running_model` for evaluation; here it is written into TRL's reference, so RLOO/GRPO's KL term is
taken against it.

Where the state lives (full fine-tuning only: plain module, DDP, DeepSpeed ZeRO-1/2, ZeRO-3 local slices, of
which one process, DDP and ZeRO-3 are tested; a `PeftModel` is refused): the EMA in fp32 (its own tensors: the reference holds the anchor, not the EMA),
theta_0 in the policy's dtype (a copy of the policy, exact), the anchor in the reference's parameters (cast
once from fp32). Memory: 4 bytes (EMA) plus one policy-sized copy (theta_0) per parameter.

Checkpoints: `warpkit_anchor[-rank<r>-of-<w>].safetensors`, layout `bema_full` / `bema_zero3`, holds
`ema.<name>`, `theta0.<name>` and `anchor.<name>` (the anchor is saved too: with update_freq > 1 it depends
on the policy at the last update, which a checkpoint does not keep), and the counter `num_updates`.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import torch
from torch import Tensor

from warpkit.anchor import fused
from warpkit.anchor.callback import (
    AnchorCallback,
    check_full_reference,
    logging_every,
    warn_if_anchor_is_stale,
)
from warpkit.anchor.layouts import Layout, TensorLayout, full_layout, unwrap
from warpkit.anchor.schedules import BemaSchedule
from warpkit.anchor.trl_adapter import TrainerAdapter

__all__ = ["BEMAAnchorCallback", "BemaLayout", "bema_update_"]

_CPU_CHUNK = 1 << 20  # 4 MB of fp32 scratch: stays in cache
_ACCELERATOR_CHUNK = 1 << 24  # 64 MB: fewer launches


@torch.no_grad()
def bema_update_(
    ema: list[Tensor],
    theta0: list[Tensor],
    policy: list[Tensor],
    out: list[Tensor],
    beta: float,
    alpha: float,
) -> None:
    """In place, per i: ema_i <- (1 - beta) ema_i + beta policy_i, then out_i <- ema_i + alpha (policy_i - theta0_i).

    `ema` is fp32 and contiguous; `theta0`, `policy` and `out` any float dtype (the arithmetic is fp32, `out`
    is written once, rounded to its dtype). All four have the same shape pairwise (any shape). On CPU one fused
    pass (`warpkit.anchor.fused`: 20 bytes per parameter in fp32, 14 in bf16, BEMA's minimum: read policy,
    theta0, ema, write ema, out); elsewhere, or when the kernel is unavailable, the bitwise-equal eager path:
    the policy is read into an fp32 scratch chunk by chunk, so nothing model-sized is allocated.
    """
    if not len(ema) == len(theta0) == len(policy) == len(out):
        raise ValueError(
            f"Got {len(ema)} ema, {len(theta0)} theta0, {len(policy)} policy, {len(out)} out tensors."
        )
    if not ema:
        return
    if ema[0].device.type == "cpu":  # one fused pass (`warpkit.anchor.fused`), bitwise the chunked path below
        left = fused.bema_(ema, theta0, policy, out, beta, alpha)
        ema, theta0, policy, out = ([t[i] for i in left] for t in (ema, theta0, policy, out))
        if not ema:
            return
    size = _CPU_CHUNK if ema[0].device.type == "cpu" else _ACCELERATOR_CHUNK
    scratch = torch.empty(size, dtype=torch.float32, device=ema[0].device)
    for e, t0, p, o in zip(ema, theta0, policy, out, strict=True):
        e, t0, p, o = e.view(-1), t0.reshape(-1), p.reshape(-1), o.view(-1)
        for start in range(0, e.numel(), size):
            stop = min(start + size, e.numel())
            chunk = scratch[: stop - start]
            chunk.copy_(p[start:stop])  # theta_t in fp32
            e[start:stop].lerp_(chunk, beta)  # EMA_t
            chunk.sub_(t0[start:stop]).mul_(alpha).add_(e[start:stop])  # EMA_t + alpha (theta_t - theta_0)
            o[start:stop].copy_(chunk)


class BemaLayout(Layout):
    """BEMA's state over the aligned tensors of a full fine-tuning layout (`FullLayout` or `Zero3Layout`, built
    with `shadow=False` so that their state is the reference itself): names `ema.<n>`, `theta0.<n>`,
    `anchor.<n>`. The base layout gives the setup: state file name per rank, ZeRO-3 re-gathers, all-reduces.
    """

    def __init__(self, base: TensorLayout) -> None:
        self.base = base
        self.kind = f"bema_{base.kind}"  # "bema_full" or "bema_zero3": a file format, never change them
        # the policy until `reset_to_policy` / `load_state_dict` (never uninitialised memory)
        self.ema = [s.detach().to(torch.float32, copy=True) for s in base.sources]
        self.theta0 = [s.detach().clone() for s in base.sources]
        names = [f"{part}.{n}" for part in ("ema", "theta0", "anchor") for n in base.names]
        super().__init__(names, self.ema + self.theta0 + list(base.targets))

    def snapshot(self) -> None:
        """theta_0 <- policy, EMA <- policy (the anchor is left as it is, as in TRL)."""
        torch._foreach_copy_(self.theta0, [s.detach() for s in self.base.sources])
        torch._foreach_copy_(self.ema, [s.detach() for s in self.base.sources])

    def reset_to_policy(self) -> None:
        self.snapshot()
        self.base.reset_to_policy()  # the base's state is the reference: anchor <- policy

    @torch.no_grad()
    def update(self, ema_rate: float, alpha: float = 0.0) -> None:
        """EMA <- (1 - beta) EMA + beta policy (beta = `ema_rate`), anchor <- EMA + alpha (policy - theta_0)."""
        bema_update_(self.ema, self.theta0, self.base.sources, self.base.targets, ema_rate, alpha)
        self.base.after_targets_changed()

    def squared_distance_parts(self) -> tuple[float, float]:
        return (
            self.base.squared_distance_parts()
        )  # |anchor - policy|^2, |policy|^2 (all-reduced under ZeRO-3)

    def write_targets(self) -> None:
        self.base.after_targets_changed()  # the anchor is part of the state: loaded in place

    def state_file_name(self, rank: int, world_size: int) -> str:
        return self.base.state_file_name(rank, world_size)

    def writes_state(self, rank: int) -> bool:
        return self.base.writes_state(rank)


class BEMAAnchorCallback(AnchorCallback):
    """BEMA anchor for TRL's `GRPOTrainer` / `RLOOTrainer` (full fine-tuning, `beta > 0`).

    ```python
    trainer = RLOOTrainer(...)
    trainer.add_callback(BEMAAnchorCallback(trainer, update_freq=1, ema_power=0.5, bias_power=0.2, lag=10))
    trainer.train()
    ```

    The reference becomes TRL's BEMA iterate EMA_t + alpha_t (theta_t - theta_0) (see the module docstring and
    `BemaSchedule` for the schedule and the symbols). Arguments are `BemaSchedule`'s, TRL's names; only the
    default `update_freq` differs (1 here, 400 in TRL, whose callback keeps a model for evaluation).

    Logs `anchor/bema_beta`, `anchor/bema_alpha`, `anchor/distance` (|anchor - policy| / |policy|) and
    `anchor/update_seconds` at logging steps that update.

    Raises:
        TypeError: not a `GRPOTrainer` / `RLOOTrainer` (`trl_adapter.check_trainer`).
        ValueError: a setting outside its range (`check_bema_settings`), beta == 0, `sync_ref_model=True`, a
            `PeftModel`, no reference.
        TrlInternalsError: the installed TRL lacks an internal the callback relies on (see `trl_adapter`).
    """

    description = "the BEMA anchor"

    def __init__(
        self,
        trainer: Any,
        update_freq: int = 1,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: float = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
    ) -> None:
        adapter = TrainerAdapter(trainer, "BEMAAnchorCallback")
        self.schedule = BemaSchedule(
            update_freq, ema_power, bias_power, lag, update_after, multiplier, min_ema_multiplier
        )
        check_full_reference(trainer, "BEMAAnchorCallback", "the BEMA iterate is written into it")
        warn_if_anchor_is_stale(trainer.args)
        self.num_updates = 0
        self._attach(trainer, adapter)

    def _bind(self) -> Layout:
        base = full_layout(unwrap(self.trainer.model), unwrap(self.trainer.ref_model), shadow=False)
        return BemaLayout(base)

    @property
    def bema(self) -> BemaLayout:
        layout = self.layout
        assert isinstance(layout, BemaLayout)
        return layout

    def step(self, args, state) -> None:
        t = state.global_step
        action = self.schedule.action(t)
        if action == "snapshot":
            self.bema.snapshot()
        if action != "update":
            return
        beta, alpha = self.schedule.ema_beta(t), self.schedule.bema_alpha(t)
        start = perf_counter()
        self.bema.update(beta, alpha)
        seconds = perf_counter() - start
        self.num_updates += 1
        if args.logging_steps and t % logging_every(args, state) == 0:
            self.adapter.log_train_metrics(
                {
                    "anchor/bema_beta": beta,
                    "anchor/bema_alpha": alpha,
                    "anchor/distance": self.distance(),
                    "anchor/update_seconds": seconds,
                }
            )

    def _state_metadata(self) -> dict[str, str]:
        settings = {name: repr(value) for name, value in self.schedule.__dict__.items()}
        return {**settings, "num_updates": str(self.num_updates)}

    def _restore_metadata(self, meta: dict[str, str]) -> None:
        self.num_updates = int(meta.get("num_updates", 0))

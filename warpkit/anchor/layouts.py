"""Where the anchor lives: one class per setup, each resetting, updating, measuring and restoring itself.

| class               | setup                                     | EMA state                             | `kind`         |
|---------------------|-------------------------------------------|---------------------------------------|----------------|
| `FullLayout`        | full fine-tuning: plain, DDP, ZeRO-1/2    | the reference's parameters (fp32      | "full"         |
|                     |                                           | shadow for bf16/fp16 ones)            |                |
| `Zero3Layout`       | DeepSpeed ZeRO-3                          | this rank's slices of the reference   | "zero3"        |
| `LoraFactorsLayout` | `PeftModel`, `lora_mode="factors"`        | the `"ref"` adapter's A and B         | "lora_factors" |
| `LoraExactLayout`   | `PeftModel`, `lora_mode="exact"`          | D = EMA of s B @ A per layer (dense)  | "lora_exact"   |

`kind` is the `layout` value written into the anchor's state file and checked when it is loaded: those four
strings are a file format, so old checkpoints keep loading; never change them. The callback only calls
methods (`reset_to_policy`, `update`, `squared_distance_parts`, `state_file_name`, `state_dict`,
`load_state_dict`); it never asks which layout it holds. The LoRA layouts are in `warpkit.anchor.lora`.
The anchor's relatives add their own kinds over `FullLayout` / `Zero3Layout` (built with `shadow=False`):
"bema_full", "bema_zero3" (`warpkit.anchor.bema`) and "elastic_reset_full" (`warpkit.anchor.elastic`).

Symbols as in the paper: mu = `ema_rate`; the anchor starts equal to the policy (`reset_to_policy`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from warpkit._util.tensors import check_same_tensors
from warpkit.anchor.ema import copy_distinct_, ema_update_, squared_distance_and_norm

__all__ = ["FullLayout", "Layout", "TensorLayout", "Zero3Layout", "fp32_state", "full_layout", "unwrap"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_FILE = "warpkit_anchor.safetensors"  # the replicated layouts' state file, in a Trainer checkpoint


class Layout(ABC):
    """One way of storing the anchor: `names[i]` labels `state[i]`, the fp32 (or fp64) EMA state.

    Subclasses say how the policy is read into the state and how the state reaches what the reference
    forward reads (the "targets").
    """

    kind: ClassVar[str]  # the state file's `layout` metadata: "full", "zero3", "lora_factors", "lora_exact"

    def __init__(self, names: list[str], state: list[Tensor]) -> None:
        if len(names) != len(state):
            raise ValueError(f"Got {len(names)} names for {len(state)} state tensors.")
        self.names = names
        self.state = state

    # ---- the anchor ------------------------------------------------------------------------------------
    @abstractmethod
    def reset_to_policy(self) -> None:
        """anchor <- policy (the start of an iteration: both equal the init), targets included."""

    @abstractmethod
    def update(self, ema_rate: float) -> None:
        """One EMA step on this rank, anchor <- (1 - mu) * anchor + mu * policy (mu = `ema_rate`), targets
        included."""

    @abstractmethod
    def squared_distance_parts(self) -> tuple[float, float]:
        """(|anchor - policy|^2, |policy|^2) over the whole model, summed over ranks where the state is split."""

    @abstractmethod
    def write_targets(self) -> None:
        """Make what the reference forward reads equal to the state (after a reset or a load)."""

    def release(self) -> None:
        """Undo what binding installed on the model (hooks); the layout is not used afterwards."""
        return None  # nothing to undo unless a layout installs something (LoRA exact: forward hooks)

    # ---- the state file --------------------------------------------------------------------------------
    def state_file_name(self, rank: int, world_size: int) -> str:
        """The file in a checkpoint folder that holds the state rank `rank` reads (the same on every rank)."""
        return STATE_FILE

    def writes_state(self, rank: int) -> bool:
        """Whether rank `rank` writes its state at a save (replicated state: rank 0 only)."""
        return rank == 0

    def state_dict(self) -> dict[str, Tensor]:
        """The anchor's fp32 state by name, on CPU and contiguous (what the state file holds)."""
        return {n: s.detach().float().cpu().contiguous() for n, s in zip(self.names, self.state, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, saved: Mapping[str, Tensor], source: str = "the saved anchor") -> None:
        """state <- `saved` (same names and shapes, checked first; `source` names it in errors), then targets."""
        check_same_tensors(
            {n: tuple(s.shape) for n, s in zip(self.names, self.state, strict=True)},
            {n: tuple(t.shape) for n, t in saved.items()},
            source,
            f"this run's {self.kind!r} anchor",
            fix="Was it written for another model, adapter or number of processes?",
        )
        for name, st in zip(self.names, self.state, strict=True):
            st.copy_(saved[name])
        self.write_targets()


class TensorLayout(Layout):
    """Aligned tensor lists: anchor_i <- (1 - mu) anchor_i + mu policy_i, elementwise.

    `sources[i]` is read from the policy, `state[i]` holds the EMA (fp32 shadow of a bf16/fp16 target, else the
    target itself) and `targets[i]` is what the reference forward reads; all three have the same shape.
    `shadow=False` makes the state the targets themselves whatever their dtype: the anchor's relatives
    (`warpkit.anchor.bema`, `warpkit.anchor.elastic`) keep their own state and use this layout only for its
    aligned tensors and its setup (file names, ZeRO-3 re-gathers and all-reduces).
    """

    def __init__(
        self, names: list[str], sources: list[Tensor], targets: list[Tensor], *, shadow: bool = True
    ) -> None:
        super().__init__(names, fp32_state(targets) if shadow else list(targets))
        if not len(sources) == len(targets) == len(names):
            raise ValueError(f"Got {len(names)} names, {len(sources)} sources and {len(targets)} targets.")
        self.sources = sources
        self.targets = targets

    def reset_to_policy(self) -> None:
        torch._foreach_copy_(self.state, [s.detach() for s in self.sources])
        self.write_targets()

    @torch.no_grad()
    def update(self, ema_rate: float) -> None:
        ema_update_(self.state, self.sources, ema_rate, out=self.targets)  # writes the targets too
        self.after_targets_changed()

    @torch.no_grad()
    def squared_distance_parts(self) -> tuple[float, float]:
        return squared_distance_and_norm(self.state, self.sources)

    def write_targets(self) -> None:
        copy_distinct_(self.targets, self.state)
        self.after_targets_changed()

    def after_targets_changed(self) -> None:
        """Run after the targets were written in place (ZeRO-3 refreshes its gathered copies)."""


class FullLayout(TensorLayout):
    """Full fine-tuning: the reference's parameters (plain module, DDP, ZeRO-1/2), replicated on every rank.

    Each rank updates its whole copy identically; rank 0 writes `warpkit_anchor.safetensors`.
    """

    kind = "full"

    def __init__(
        self,
        policy_params: Mapping[str, nn.Parameter],
        ref_params: Mapping[str, nn.Parameter],
        *,
        shadow: bool = True,
    ):
        names = list(policy_params)
        check_same_tensors(
            {n: tuple(p.shape) for n, p in policy_params.items()},
            {n: tuple(p.shape) for n, p in ref_params.items()},
            "trainer.ref_model",
            "the policy",
            fix="The EMA anchor needs the reference to share the policy's architecture.",
        )
        super().__init__(
            names, [policy_params[n].data for n in names], [ref_params[n].data for n in names], shadow=shadow
        )


class Zero3Layout(TensorLayout):
    """DeepSpeed ZeRO-3: the local slices (`param.ds_tensor`, 1-D, ceil(numel / world) elements) of both models.

    Policy and reference are partitioned with the same world size, so rank r holds elements [r * k, (r + 1) * k)
    of every flattened tensor in both: the EMA needs no communication and nothing is gathered whole. Each rank
    writes its own `warpkit_anchor-rank<r>-of-<w>.safetensors`; the distance's sums are all-reduced.
    """

    kind = "zero3"

    def __init__(
        self,
        policy_params: Mapping[str, nn.Parameter],
        ref_params: Mapping[str, nn.Parameter],
        *,
        shadow: bool = True,
    ):
        names = list(policy_params)
        check_same_tensors(
            {n: tuple(p.ds_shape) for n, p in policy_params.items()},
            {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in ref_params.items()},
            "trainer.ref_model",
            "the policy",
            fix="The EMA anchor needs the reference to share the policy's architecture.",
        )
        for n in names:
            p, r = policy_params[n], ref_params[n]
            if (
                not hasattr(r, "ds_tensor")
                or p.ds_tensor.numel() != r.ds_tensor.numel()
                or p.ds_numel != r.ds_numel
            ):
                raise ValueError(
                    f"{n}: the policy is ZeRO-3 partitioned but the reference is not partitioned the same way; "
                    "both must be prepared by the same DeepSpeed ZeRO-3 setup (TRL does this when beta > 0)."
                )
        self.ref_params = [ref_params[n] for n in names]
        super().__init__(
            names,
            [policy_params[n].ds_tensor.data for n in names],
            [r.ds_tensor.data for r in self.ref_params],
            shadow=shadow,
        )

    def after_targets_changed(self) -> None:
        # DeepSpeed keeps some parameters gathered (small "persistent" ones, and recently used ones): their full
        # copy no longer matches the updated slices, so release them and re-gather the persistent ones.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [r for r in self.ref_params if r.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered, has_been_updated=False)
        persistent = [r for r in self.ref_params if getattr(r, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(param_list=persistent)

    def squared_distance_parts(self) -> tuple[float, float]:
        import torch.distributed as dist

        num, den = super().squared_distance_parts()  # this rank's slices: sum the squares over ranks
        sums = torch.tensor([num, den], dtype=torch.float64)
        dist.all_reduce(sums)
        num, den = sums.tolist()
        return num, den

    def state_file_name(self, rank: int, world_size: int) -> str:
        return f"warpkit_anchor-rank{rank}-of-{world_size}.safetensors"

    def writes_state(self, rank: int) -> bool:
        return True


def fp32_state(targets: list[Tensor]) -> list[Tensor]:
    """The target itself when it is fp32/fp64, else an fp32 shadow of it (same shape and device).

    bf16 is too coarse for an in-place EMA: at mu = 0.01 an update mu * (policy - anchor) ~ 1e-5 of the
    weight is below bf16's relative resolution 2^-8 and would be lost.
    """
    return [t if t.dtype not in _LOW_PRECISION else t.detach().float() for t in targets]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DeepSpeedEngine / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def full_layout(policy: nn.Module, ref: nn.Module, *, shadow: bool = True) -> TensorLayout:
    """The layout for full fine-tuning of the bare `policy` against the bare reference `ref`.

    `Zero3Layout` when the policy is ZeRO-3 partitioned (its parameters carry `ds_tensor`), else `FullLayout`;
    `shadow` as in `TensorLayout`.
    """
    policy_params = dict(policy.named_parameters())
    ref_params = dict(ref.named_parameters())
    zero3 = any(hasattr(p, "ds_tensor") for p in policy_params.values())
    return (Zero3Layout if zero3 else FullLayout)(policy_params, ref_params, shadow=shadow)

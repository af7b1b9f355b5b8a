"""Where the anchor lives: aligned (policy source, EMA state, reference target) tensor lists per setup.

- `full_layout`: full fine-tuning, the reference's parameters (plain module, DDP, DeepSpeed ZeRO-1/2), with an
  fp32 shadow for bf16/fp16 tensors; under ZeRO-3 `zero3_layout`, the local slices of both models.
- `lora_layout`: a `PeftModel` read through its `"ref"` adapter, exact (dense D = EMA of s B A per layer, added
  by a forward hook) or factors (EMA of A and B separately: an approximation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Layout", "LoraMode", "ensure_ref_adapter", "full_layout", "lora_layers", "lora_layout", "unwrap"]

LoraMode = Literal["exact", "factors"]
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Layout:
    """Aligned tensor lists for one way of storing the anchor.

    `sources[i]` is read from the policy, `state[i]` (fp32 or the target itself) holds the EMA, and
    `targets[i]` is what the reference forward reads; `state[i] is targets[i]` when no shadow is needed.
    """

    kind: str
    names: list[str]
    sources: list[Tensor]
    targets: list[Tensor]
    state: list[Tensor]
    after_write: list[Any] = field(default_factory=list)  # callables run after targets change

    def write_targets(self) -> None:
        pairs = [(t, s) for t, s in zip(self.targets, self.state, strict=True) if t is not s]
        if pairs:
            torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])
        for fn in self.after_write:
            fn()


def fp32_state(targets: list[Tensor]) -> list[Tensor]:
    """The target itself when it is fp32/fp64, else an fp32 shadow of it (same device)."""
    return [t if t.dtype not in _LOW_PRECISION else t.detach().float() for t in targets]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DeepSpeedEngine / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def full_layout(policy: nn.Module, ref: nn.Module) -> Layout:
    policy_params = dict(policy.named_parameters())
    ref_params = dict(ref.named_parameters())
    if set(policy_params) != set(ref_params):
        diff = sorted(set(policy_params) ^ set(ref_params))[:5]
        raise ValueError(
            f"The policy and trainer.ref_model have different parameters (e.g. {diff}); the EMA anchor needs "
            "the reference to share the policy's architecture."
        )
    names = list(policy_params)
    zero3 = hasattr(policy_params[names[0]], "ds_tensor")
    if zero3:
        return zero3_layout(names, policy_params, ref_params)
    for n in names:
        if policy_params[n].shape != ref_params[n].shape:
            raise ValueError(
                f"{n}: policy shape {tuple(policy_params[n].shape)} != reference {tuple(ref_params[n].shape)}."
            )
    targets = [ref_params[n].data for n in names]
    return Layout("full", names, [policy_params[n].data for n in names], targets, fp32_state(targets))


def zero3_layout(names: list[str], policy_params: dict, ref_params: dict) -> Layout:
    """Local slices only: rank r holds elements [r * k, (r + 1) * k) of every flattened tensor in both models."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    ref_list = [ref_params[n] for n in names]
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
    targets = [r.ds_tensor.data for r in ref_list]

    def refresh_gathered() -> None:
        # DeepSpeed keeps some parameters gathered (small "persistent" ones, and recently used ones): their full
        # copy no longer matches the updated slices, so release them and re-gather the persistent ones.
        gathered = [r for r in ref_list if r.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered, has_been_updated=False)
        persistent = [r for r in ref_list if getattr(r, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(param_list=persistent)

    return Layout(
        "zero3",
        names,
        [policy_params[n].ds_tensor.data for n in names],
        targets,
        fp32_state(targets),
        after_write=[refresh_gathered],
    )


# ---- LoRA ----------------------------------------------------------------------------------------------
def ensure_ref_adapter(model) -> None:
    """TRL reads the reference through a `"ref"` adapter when one exists, else through the bare base model.

    The callback always needs it (the anchor moves away from the base), so it adds a frozen copy of
    `"default"` when TRL did not (a `peft_config` passed to the trainer rather than a wrapped model).
    """
    if "default" not in model.peft_config:
        raise ValueError(
            f"EMAAnchorCallback expects the trained adapter to be 'default', got {list(model.peft_config)}."
        )
    if "ref" not in model.peft_config:
        model.add_adapter("ref", model.peft_config["default"])
        model.set_adapter("default")
        for name, param in model.named_parameters():
            if ".ref." in name:
                param.requires_grad_(False)
                param.data.copy_(model.get_parameter(name.replace(".ref.", ".default.")).data)


def lora_layers(model) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if (
            not isinstance(module, LoraLinear)
            or module.lora_variant
            or module.lora_bias.get("default", False)
        ):
            raise ValueError(
                f"{name}: EMAAnchorCallback supports plain LoRA on Linear layers; {type(module).__name__} "
                f"with variant {list(module.lora_variant)} is not supported (no DoRA, lora_bias, conv, embedding)."
            )
        if module.fan_in_fan_out:
            raise ValueError(f"{name}: fan_in_fan_out=True LoRA layers are not supported by the EMA anchor.")
        layers.append((name, module))
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if trained:
        raise ValueError(
            f"Parameters outside the LoRA factors are trained ({trained[:3]}...; e.g. modules_to_save): the EMA "
            "anchor for LoRA covers only the adapter. Remove modules_to_save or use full fine-tuning."
        )
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        raise ValueError(
            "LoRA under DeepSpeed ZeRO-3 is not supported by EMAAnchorCallback yet; use ZeRO-2 or DDP."
        )
    if not layers:
        raise ValueError("The PeftModel has no LoRA Linear layer with a 'default' adapter to average.")
    return layers


def lora_layout(model, lora_mode: LoraMode, hooks: list) -> Layout:
    layers = lora_layers(model)
    if lora_mode == "factors":
        names, sources, targets = [], [], []
        for name, m in layers:
            for part in ("lora_A", "lora_B"):
                names.append(f"{name}.{part}")
                sources.append(getattr(m, part)["default"].weight.data)
                targets.append(getattr(m, part)["ref"].weight.data)
        return Layout("lora_factors", names, sources, targets, fp32_state(targets))

    names, sources, state, dense = [], [], [], []
    for name, m in layers:
        weight = m.base_layer.weight
        d = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        d_model = d if weight.dtype == torch.float32 else torch.zeros_like(weight)
        names.append(name)
        sources.append((m.lora_B["default"].weight, m.lora_A["default"].weight, float(m.scaling["default"])))
        state.append(d)
        dense.append(d_model)
        # the "ref" adapter's own B @ A must contribute nothing: D carries the whole anchor delta
        m.lora_B["ref"].weight.data.zero_()
        hooks.append(m.register_forward_hook(_make_ref_hook(d_model)))
    return Layout("lora_exact", names, sources, dense, state)


def _make_ref_hook(d: Tensor):
    def hook(module, args, output):
        if module.disable_adapters or module.merged or "ref" not in module.active_adapters:
            return None
        x = args[0]
        return output + F.linear(x.to(d.dtype), d).to(output.dtype)

    return hook

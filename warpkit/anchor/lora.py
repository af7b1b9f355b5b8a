"""The anchor of a LoRA run: a `PeftModel` whose reference TRL reads through a `"ref"` adapter.

Per adapted Linear layer, with W0 (out x in) the frozen base weight, B (out x r) and A (r x in) the trained
`"default"` factors and s = lora_alpha / r, the policy is W0 + s B @ A and the anchor is

- `lora_mode="exact"` (`LoraExactLayout`): W0 + D, D <- (1 - mu) D + mu * s B @ A, the exact EMA of the adapted
  weight. D is full rank (an average of rank-r products), so it is held densely (fp32, out x in) and added to
  the layer's output by a forward hook while the `"ref"` adapter is active (whose own B is zeroed);
- `lora_mode="factors"` (`LoraFactorsLayout`): the EMA of A and of B separately, into the `"ref"` adapter. The
  product of averages is NOT the average of products: a documented approximation for runs that cannot afford
  D; `bench/anchor.py` prints its deviation from the exact EMA.

An adapted Embedding layer (peft keeps its factors in `lora_embedding_A` (r x vocab) and `lora_embedding_B`
(dim x r)) is averaged the same way: its delta is the transpose, (s B @ A)^T = s A^T @ B^T (vocab x dim, the
embedding weight's layout), so D is vocab x dim (for a 50k x 4k embedding, 800 MB of fp32) and the hook
adds D's rows F.embedding(ids, D), times the layer's `embed_scale` when it has one, as peft does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from warpkit.anchor.ema import (
    LoraFactors,
    copy_distinct_,
    lora_delta_,
    lora_ema_update_,
    lora_squared_distance_and_norm,
)
from warpkit.anchor.layouts import Layout, TensorLayout
from warpkit.anchor.trl_adapter import REF_ADAPTER

__all__ = [
    "LoraExactLayout",
    "LoraFactorsLayout",
    "LoraMode",
    "ensure_ref_adapter",
    "lora_layers",
    "lora_layout",
]

LoraMode = Literal["exact", "factors"]
TRAINED_ADAPTER = "default"  # peft's name for the adapter a trainer trains


def _is_adapter(name: str, adapter: str) -> bool:
    """Whether parameter ``name`` belongs to ``adapter``: ``...lora_A.<adapter>.weight`` (Linear) or
    ``...lora_embedding_A.<adapter>`` (Embedding: the factors are the ParameterDict's values)."""
    return f".{adapter}." in name or name.endswith(f".{adapter}")


def _twin(name: str, adapter: str, other: str) -> str:
    """The name of the same factor in adapter ``other``."""
    if name.endswith(f".{adapter}"):
        return name[: -len(adapter)] + other
    return name.replace(f".{adapter}.", f".{other}.")


def _factor_params(module: nn.Module, adapter: str) -> tuple[Tensor, Tensor]:
    """(B, A) of ``adapter`` in a LoRA layer: Linear B (out x r), A (r x in); Embedding B (dim x r), A (r x vocab)."""
    if _is_embedding(module):
        return module.lora_embedding_B[adapter], module.lora_embedding_A[adapter]
    return module.lora_B[adapter].weight, module.lora_A[adapter].weight


def _is_embedding(module: nn.Module) -> bool:
    from peft.tuners.lora import Embedding as LoraEmbedding

    return isinstance(module, LoraEmbedding)


def ensure_ref_adapter(model: Any) -> None:
    """Give `model` (a `PeftModel`) a frozen `"ref"` adapter, a copy of `"default"`, if it has none.

    TRL reads the reference through a `"ref"` adapter when one exists, else through the bare base model. The
    callback always needs it (the anchor moves away from the base), so it adds one when TRL did not (a
    `peft_config` passed to the trainer rather than a wrapped model).
    """
    if TRAINED_ADAPTER not in model.peft_config:
        raise ValueError(
            f"EMAAnchorCallback expects the trained adapter to be 'default', got {list(model.peft_config)}."
        )
    if REF_ADAPTER not in model.peft_config:
        model.add_adapter(REF_ADAPTER, model.peft_config[TRAINED_ADAPTER])
        model.set_adapter(TRAINED_ADAPTER)
        for name, param in model.named_parameters():
            if _is_adapter(name, REF_ADAPTER):
                param.requires_grad_(False)
                param.data.copy_(model.get_parameter(_twin(name, REF_ADAPTER, TRAINED_ADAPTER)).data)


def lora_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of `model`'s plain LoRA Linear and Embedding layers; ValueError for anything
    else trained.

    Refused: DoRA and other variants, lora_bias, conv LoRA, fan_in_fan_out, embeddings with max_norm, trained
    weights outside the factors (modules_to_save), ZeRO-3 partitioned weights, and a model without any LoRA
    layer.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if TRAINED_ADAPTER not in module.lora_A and TRAINED_ADAPTER not in module.lora_embedding_A:
            continue
        if (
            (not isinstance(module, LoraLinear) and not _is_embedding(module))
            or module.lora_variant
            or module.lora_bias.get(TRAINED_ADAPTER, False)
        ):
            raise ValueError(
                f"{name}: EMAAnchorCallback supports plain LoRA on Linear layers and on Embedding layers; "
                f"{type(module).__name__} with variant {list(module.lora_variant)} is not supported (no DoRA, "
                "lora_bias, conv)."
            )
        if module.fan_in_fan_out:
            raise ValueError(f"{name}: fan_in_fan_out=True LoRA layers are not supported by the EMA anchor.")
        if _is_embedding(module) and module.get_base_layer().max_norm is not None:
            raise ValueError(
                f"{name}: an Embedding with max_norm renormalises the LoRA factors' rows on lookup, so its delta "
                "is not s (B @ A)^T; the EMA anchor does not support it. Leave this layer out of target_modules."
            )
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
        raise ValueError(
            "The PeftModel has no LoRA Linear or Embedding layer with a 'default' adapter to average."
        )
    return layers


class LoraFactorsLayout(TensorLayout):
    """EMA of A (r x in) and B (out x r) separately, state names `<layer>.lora_A` / `<layer>.lora_B`.

    Sources are the `"default"` factors, targets the `"ref"` adapter's (fp32 shadow if they are bf16/fp16).
    An Embedding layer's `lora_embedding_A` / `lora_embedding_B` are its A and B.
    """

    kind = "lora_factors"

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        names, sources, targets = [], [], []
        for name, m in layers:
            policy, ref = _factor_params(m, TRAINED_ADAPTER), _factor_params(m, REF_ADAPTER)
            for part, i in (("lora_A", 1), ("lora_B", 0)):
                names.append(f"{name}.{part}")
                sources.append(policy[i].data)
                targets.append(ref[i].data)
        super().__init__(names, sources, targets)


class LoraExactLayout(Layout):
    """D per adapted layer (state: fp32, out x in, named by the layer), the exact EMA of the delta s B @ A
    (of (s B @ A)^T, vocab x dim, for an Embedding).

    The reference forward reads W0 x + D x: a forward hook adds `F.linear(x, D)` (`F.embedding(ids, D)` for an
    Embedding; D cast to the weight's dtype when that is not fp32) while the `"ref"` adapter is active; the
    `"ref"` adapter's own B is zeroed so that it contributes nothing. Memory: one matrix of the base weight's
    shape per adapted layer (two for bf16/fp16 weights).
    """

    kind = "lora_exact"

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        names, state = [], []
        self.factors: list[LoraFactors] = []
        self.dense: list[
            Tensor
        ] = []  # what the hooks read: D itself (fp32 weights) or D cast to the weight dtype
        self.hooks: list[Any] = []
        for name, m in layers:
            weight = m.base_layer.weight
            d = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            d_model = d if weight.dtype == torch.float32 else torch.zeros_like(weight)
            names.append(name)
            b, a = _factor_params(m, TRAINED_ADAPTER)
            scaling = float(m.scaling[TRAINED_ADAPTER])
            # an Embedding's delta is (s B @ A)^T = s A^T @ B^T: the same rule on the transposed factors
            self.factors.append(
                (a.detach().T, b.detach().T, scaling) if _is_embedding(m) else (b, a, scaling)
            )
            state.append(d)
            self.dense.append(d_model)
            # the "ref" adapter's own B @ A must contribute nothing: D carries the whole anchor delta
            _factor_params(m, REF_ADAPTER)[0].data.zero_()
            self.hooks.append(m.register_forward_hook(_make_ref_hook(d_model, _is_embedding(m))))
        super().__init__(names, state)

    def reset_to_policy(self) -> None:
        lora_delta_(self.state, self.factors)
        self.write_targets()

    @torch.no_grad()
    def update(self, ema_rate: float) -> None:
        lora_ema_update_(self.state, self.factors, ema_rate)
        self.write_targets()

    def squared_distance_parts(self) -> tuple[float, float]:
        return lora_squared_distance_and_norm(self.state, self.factors)

    def write_targets(self) -> None:
        copy_distinct_(self.dense, self.state)

    def release(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def lora_layout(model: Any, lora_mode: LoraMode) -> LoraExactLayout | LoraFactorsLayout:
    """The layout of `model` (a `PeftModel` with a `"ref"` adapter, see `ensure_ref_adapter`) for `lora_mode`."""
    layers = lora_layers(model)
    modes = {"exact": LoraExactLayout, "factors": LoraFactorsLayout}
    if lora_mode not in modes:
        raise ValueError(f"lora_mode must be 'exact' or 'factors', got {lora_mode!r}.")
    return modes[lora_mode](layers)


def _make_ref_hook(d: Tensor, embedding: bool = False):
    """A forward hook adding x @ D^T (x: ... x in, D: out x in) to the layer's output under the "ref" adapter;
    for an Embedding, the rows D[ids] (D: vocab x dim) times the base layer's `embed_scale` if it has one."""

    def hook(module, args, output):
        if module.disable_adapters or module.merged or REF_ADAPTER not in module.active_adapters:
            return None
        x = args[0]
        if not embedding:
            return output + F.linear(x.to(d.dtype), d).to(output.dtype)
        rows = F.embedding(x, d)
        scale = getattr(module.get_base_layer(), "embed_scale", None)
        if scale is not None:
            rows = rows * (scale.to(rows.dtype) if isinstance(scale, Tensor) else scale)
        return output + rows.to(output.dtype)

    return hook

"""warpkit.anchor.layouts on small hand-built modules (no trainer): full fine-tuning, fp32 shadow, ZeRO-3 slices.

Expected values are recomputed here in float64: after reset a_0 = p_0; after an update with mu,
a_1 = (1 - mu) a_0 + mu p_1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from warpkit.anchor.layouts import STATE_FILE, FullLayout, Layout, Zero3Layout, full_layout
from warpkit.anchor.lora import LoraExactLayout, LoraFactorsLayout


def _pair(dtype=torch.float32, seed=0):
    """(policy, reference): two Linear(3 -> 2) + LayerNorm(2) stacks with different weights."""
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)).to(dtype)
    ref = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)).to(dtype)
    return policy, ref


def _move(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))


def _params64(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


# ---- the file format: `kind` strings are written into every state file ---------------------------------
@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (FullLayout, "full"),
        (Zero3Layout, "zero3"),
        (LoraFactorsLayout, "lora_factors"),
        (LoraExactLayout, "lora_exact"),
    ],
)
def test_kind_strings_are_the_saved_format(cls, kind):
    assert issubclass(cls, Layout)
    assert cls.kind == kind


# ---- full fine-tuning ------------------------------------------------------------------------------------
def test_full_layout_reset_update_distance():
    policy, ref = _pair()
    layout = full_layout(policy, ref)
    assert type(layout) is FullLayout
    layout.reset_to_policy()
    assert all(torch.equal(p, r) for p, r in zip(policy.parameters(), ref.parameters(), strict=True))

    start = _params64(policy)
    _move(policy, 1)
    moved = _params64(policy)
    layout.update(0.25)
    want = {n: 0.75 * start[n] + 0.25 * moved[n] for n in start}
    for name, param in ref.named_parameters():
        assert float((param.detach().double() - want[name]).abs().max()) < 1e-6, name
    num = sum(float((want[n] - moved[n]).square().sum()) for n in want)
    den = sum(float(moved[n].square().sum()) for n in moved)
    got_num, got_den = layout.squared_distance_parts()
    assert (got_num, got_den) == (pytest.approx(num, rel=1e-5), pytest.approx(den, rel=1e-5))


def test_bf16_reference_gets_fp32_shadow():
    """bf16 targets: the state is an fp32 copy; the reference holds it rounded once after each update."""
    policy, ref = _pair(torch.bfloat16)
    layout = full_layout(policy, ref)
    assert all(s.dtype == torch.float32 for s in layout.state)
    assert all(s is not t for s, t in zip(layout.state, layout.targets, strict=True))
    layout.reset_to_policy()
    _move(policy, 1)
    layout.update(0.01)
    for st, target in zip(layout.state, layout.targets, strict=True):
        assert torch.equal(target, st.to(torch.bfloat16))


def test_bf16_shadow_tracks_a_float64_ema_over_many_steps():
    """300 updates at mu = 0.01 of a bf16 model with a drifting policy: the fp32 shadow stays within a few fp32
    ulps of the EMA recomputed in float64 from the same bf16 policies, the bf16 reference is that shadow rounded
    once, and an in-place bf16 EMA (TRL's rule, no shadow) is orders of magnitude further off."""
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(64, 48), nn.LayerNorm(48)).to(torch.bfloat16)
    ref = nn.Sequential(nn.Linear(64, 48), nn.LayerNorm(48)).to(torch.bfloat16)
    inplace = [p.detach().clone() for p in policy.parameters()]
    layout = full_layout(policy, ref)
    layout.reset_to_policy()
    want = [p.detach().double().clone() for p in policy.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_((0.05 * torch.randn(p.shape, generator=gen)).to(torch.bfloat16))
        layout.update(0.01)
        for w, b, p in zip(want, inplace, policy.parameters(), strict=True):
            w.mul_(0.99).add_(0.01 * p.detach().double())
            b.mul_(0.99).add_(p.detach(), alpha=0.01)
    for st, target, w, b in zip(layout.state, layout.targets, want, inplace, strict=True):
        scale = float(w.abs().max())
        shadow_error = float((st.double() - w).abs().max()) / scale
        assert shadow_error < 32 * 2.0**-24, shadow_error  # fp32: 2^-24 relative rounding per operation
        assert torch.equal(target, st.to(torch.bfloat16))
        assert float((b.double() - w).abs().max()) / scale > 100 * shadow_error


def test_fp32_reference_is_its_own_state():
    policy, ref = _pair()
    layout = full_layout(policy, ref)
    assert all(s is t for s, t in zip(layout.state, layout.targets, strict=True))


def _extra_parameter(ref: nn.Module) -> None:
    ref.register_parameter("extra", nn.Parameter(torch.zeros(1)))


def _wider_layer(ref: nn.Module) -> None:
    ref[0] = nn.Linear(3, 4)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_extra_parameter, "have different tensors: missing tensors .*extra"),
        (_wider_layer, "differ in shape"),
    ],
    ids=["extra-parameter", "other-shape"],
)
def test_full_layout_refuses_a_reference_of_another_architecture(change, why):
    policy, ref = _pair()
    change(ref)
    with pytest.raises(ValueError, match=f"trainer.ref_model and the policy {why}") as info:
        full_layout(policy, ref)
    assert "share the policy's architecture" in str(info.value)


@pytest.mark.parametrize(("rank", "writes"), [(0, True), (1, False), (3, False)])
def test_full_layout_state_file_is_shared(rank, writes):
    layout = full_layout(*_pair())
    assert layout.state_file_name(rank, 4) == STATE_FILE == "warpkit_anchor.safetensors"
    assert layout.writes_state(rank) is writes


def test_state_dict_round_trip():
    policy, ref = _pair(torch.bfloat16)
    layout = full_layout(policy, ref)
    layout.reset_to_policy()
    saved = layout.state_dict()
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in saved.values())
    _move(policy, 2)
    layout.update(0.5)
    layout.load_state_dict(saved)
    for name, target in zip(layout.names, layout.targets, strict=True):
        assert torch.equal(target, saved[name].to(torch.bfloat16)), name


def _drop_first(saved: dict) -> None:
    saved.pop(next(iter(saved)))


def _reshape_first(saved: dict) -> None:
    name = next(iter(saved))
    saved[name] = saved[name].reshape(-1, 1)


@pytest.mark.parametrize(
    ("change", "why"),
    [(_drop_first, "have different tensors: missing tensors"), (_reshape_first, "differ in shape")],
    ids=["missing", "other-shape"],
)
def test_load_state_dict_refuses_another_model(change, why):
    layout = full_layout(*_pair())
    saved = layout.state_dict()
    change(saved)
    with pytest.raises(
        ValueError, match=f"ckpt/warpkit_anchor.safetensors and this run's 'full' anchor {why}"
    ):
        layout.load_state_dict(saved, source="ckpt/warpkit_anchor.safetensors")


# ---- ZeRO-3: local slices, faked without DeepSpeed's runtime ----------------------------------------------
def _zero3_module(full: dict[str, torch.Tensor], status, persist: set[str] = frozenset()) -> nn.Module:
    """A module whose parameters look ZeRO-3 partitioned on rank 0 of 2: empty `data`, the first half of each
    flattened tensor in `ds_tensor`, `ds_shape`/`ds_numel` the whole tensor's."""
    module = nn.Module()
    for name, tensor in full.items():
        param = nn.Parameter(torch.empty(0))
        flat = tensor.flatten()
        param.ds_tensor = flat[: (flat.numel() + 1) // 2].clone()
        param.ds_shape, param.ds_numel = tensor.shape, tensor.numel()
        param.ds_status, param.ds_persist = status, name in persist
        module.register_parameter(name, param)
    return module


def test_zero3_layout_updates_local_slices_and_reduces_the_distance(monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gen = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    policy = _zero3_module(full, ZeroParamStatus.NOT_AVAILABLE)
    ref = _zero3_module({n: t + 1 for n, t in full.items()}, ZeroParamStatus.AVAILABLE, persist={"b"})
    calls = []
    for name, param in ref.named_parameters():
        param.partition = lambda param_list, has_been_updated, name=name: calls.append(
            ("partition", name, [p.ds_shape for p in param_list], has_been_updated)
        )
        param.all_gather = lambda param_list, name=name: calls.append(
            ("all_gather", name, [p.ds_shape for p in param_list])
        )

    layout = full_layout(policy, ref)
    assert type(layout) is Zero3Layout
    layout.reset_to_policy()
    assert all(
        torch.equal(p.ds_tensor, r.ds_tensor)
        for p, r in zip(policy.parameters(), ref.parameters(), strict=True)
    )
    # after every write of the slices: release the gathered copies, re-gather the persistent ones
    refresh = [
        ("partition", "w", [torch.Size([3, 4]), torch.Size([5])], False),
        ("all_gather", "b", [torch.Size([5])]),
    ]
    assert calls == refresh

    start = {n: p.ds_tensor.double().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        for p in policy.parameters():
            p.ds_tensor.mul_(3.0)
    layout.update(0.5)
    assert calls == refresh * 2
    for name, r in ref.named_parameters():
        assert float((r.ds_tensor.double() - 2.0 * start[name]).abs().max()) < 1e-6  # 0.5 a + 0.5 * 3 a

    local = [p.ds_tensor for p in policy.parameters()]
    num = sum(
        float((r.ds_tensor.double() - p.double()).square().sum())
        for r, p in zip(ref.parameters(), local, strict=True)
    )
    den = sum(float(p.double().square().sum()) for p in local)
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: (reduced.append(t.clone()), t.mul_(2)))
    got_num, got_den = layout.squared_distance_parts()  # a fake second rank holding equal sums
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    assert (got_num, got_den) == (pytest.approx(2 * num, rel=1e-6), pytest.approx(2 * den, rel=1e-6))


@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_state_file_per_rank(rank):
    full = {"w": torch.ones(2, 2)}
    layout = Zero3Layout(
        dict(_zero3_module(full, None).named_parameters()), dict(_zero3_module(full, None).named_parameters())
    )
    assert layout.state_file_name(rank, 2) == f"warpkit_anchor-rank{rank}-of-2.safetensors"
    assert layout.writes_state(rank) is True


def test_zero3_layout_refuses_an_unpartitioned_reference():
    policy = _zero3_module({"w": torch.ones(2, 2)}, None)
    ref = nn.Module()
    ref.register_parameter("w", nn.Parameter(torch.ones(2, 2)))
    with pytest.raises(ValueError, match="w: the policy is ZeRO-3 partitioned but the reference is not"):
        full_layout(policy, ref)

"""warpkit.anchor.fused: the one-pass CPU kernels are bitwise the eager torch path they replace, and the eager
path still runs (same results) when the kernels are disabled or cannot be built.

The eager references are the chunked paths of `warpkit.anchor.ema` and `warpkit.anchor.bema` with the
kernels switched off (`WARPKIT_FUSED_ANCHOR=0`), i.e. `lerp_` on an fp32 copy of the policy, then `copy_`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

import warpkit.anchor.ema as ema_module
from warpkit.anchor import fused
from warpkit.anchor.bema import bema_update_

SHAPES = [
    (1,),
    (7,),
    (33,),
    (4099,),
    (257, 129),
    (70001,),
    (3, 1 << 17),
]  # odd sizes, tails, > one thread's block
RATES = [0.01, 0.3, 0.5, 0.7, 1.0]  # both lerp branches (w < 0.5: from the state; w >= 0.5: from the policy)


@pytest.fixture(scope="module")
def kernels():
    venv_bin = str(Path(sys.executable).parent)
    if shutil.which("c++") is None or not (shutil.which("ninja") or shutil.which("ninja", path=venv_bin)):
        pytest.skip("no c++ or no ninja: the fused kernels cannot be built here (the eager path is tested)")
    k = fused.kernels()
    assert k is not None, "a compiler is here, so the kernels must build and pass their bitwise check"
    return k


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _case(shape, dtype, seed, *, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    state = torch.randn(shape, generator=gen) * 0.05
    policy = (state + 1e-3 * torch.randn(shape, generator=gen)).to(dtype)
    if transposed and len(shape) == 2:  # a non-contiguous policy of the state's shape
        policy = policy.t().contiguous().t()
    return state, policy


@contextlib.contextmanager
def _eager(monkeypatch):
    """The kernels switched off for the block: the callers' eager paths."""
    with monkeypatch.context() as m:
        m.setenv(fused.ENV, "0")
        yield


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rate", RATES)
def test_ema_fused_is_bitwise_the_eager_path(kernels, monkeypatch, rate, dtype, threads):
    """fp32 shadow + bf16/fp16 policy -> the shadow and the reference, 3 updates, with and without an out."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, shape in enumerate(SHAPES):
            state, policy = _case(shape, dtype, seed, transposed=seed % 2 == 0)
            ours, theirs = state.clone(), state.clone()
            out_ours, out_theirs = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
            alone_ours, alone_theirs = state.clone(), state.clone()  # out is the state (Elastic Reset's EMA)
            for _ in range(3):
                ema_module.ema_update_([ours, alone_ours], [policy, policy], rate, out=[out_ours, alone_ours])
                with _eager(monkeypatch):
                    ema_module.ema_update_(
                        [theirs, alone_theirs], [policy, policy], rate, out=[out_theirs, alone_theirs]
                    )
            for a, b in ((ours, theirs), (out_ours, out_theirs), (alone_ours, alone_theirs)):
                assert torch.equal(_bits(a), _bits(b)), (shape, rate, dtype)
    finally:
        torch.set_num_threads(before)


def test_ema_fused_keeps_extreme_values_bitwise(kernels, monkeypatch):
    """Random bit patterns (subnormals to 1e30, both signs), signed zeros and ties of the bf16 rounding (NaN and
    overflow left out: the bits of a NaN are not part of the contract)."""
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    state = bits.view(torch.float32).clone()
    state[~(state.abs() < 1e30)] = 1.0
    state[:8] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e30, -1e30, 1.00390625, 1.01171875])
    policy = state.flip(0).to(torch.bfloat16)
    for rate in (0.01, 0.9):
        ours, theirs = state.clone(), state.clone()
        out_ours, out_theirs = torch.empty_like(policy), torch.empty_like(policy)
        ema_module.ema_update_([ours], [policy], rate, out=[out_ours])
        with _eager(monkeypatch):
            ema_module.ema_update_([theirs], [policy], rate, out=[out_theirs])
        assert torch.equal(_bits(ours), _bits(theirs))
        assert torch.equal(_bits(out_ours), _bits(out_theirs))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(("beta", "alpha"), [(0.02, 0.4), (0.3, 1.7), (0.5, 0.0), (0.8, -0.3), (1.0, 1.0)])
def test_bema_fused_is_bitwise_the_eager_path(kernels, monkeypatch, dtype, beta, alpha):
    """ema <- lerp(ema, policy, beta), anchor <- ema + alpha (policy - theta0), 3 updates, every shape."""
    for seed, shape in enumerate(SHAPES):
        ema, policy = _case(shape, dtype, seed, transposed=seed % 2 == 1)
        theta0 = (ema + 1e-3).to(dtype)
        ours, theirs = ema.clone(), ema.clone()
        out_ours, out_theirs = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        for _ in range(3):
            bema_update_([ours], [theta0], [policy], [out_ours], beta, alpha)
            with _eager(monkeypatch):
                bema_update_([theirs], [theta0], [policy], [out_theirs], beta, alpha)
        assert torch.equal(_bits(ours), _bits(theirs)), (shape, beta, alpha)
        assert torch.equal(_bits(out_ours), _bits(out_theirs)), (shape, beta, alpha)


def test_the_writes_are_seen_by_autograd(kernels):
    """As torch's in-place ops: the version counters of the state and the reference move."""
    state, policy = _case((64,), torch.bfloat16, 0)
    out = torch.empty(64, dtype=torch.bfloat16)
    versions = state._version, out._version
    ema_module.ema_update_([state], [policy], 0.1, out=[out])
    assert state._version > versions[0] and out._version > versions[1]


def test_tensors_the_kernel_does_not_take_go_the_eager_way(kernels):
    """A non-contiguous shadow is left to the caller (by index); the others are done."""
    state, policy = _case((64, 33), torch.bfloat16, 0)
    strided = torch.randn(33, 64).t()
    out = [torch.empty(64, 33, dtype=torch.bfloat16), torch.empty(64, 33, dtype=torch.bfloat16)]
    assert fused.ema_([state, strided], [policy, policy], out, 0.1) == [1]


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(fused.ENV, "0")
    assert fused.kernels() is None
    state, policy = _case((10,), torch.bfloat16, 0)
    assert fused.ema_([state], [policy], [state], 0.1) == [0]  # all left to the eager path


def test_a_failed_build_warns_once_and_the_eager_path_runs(monkeypatch, caplog):
    """No compiler (or ninja, or a writable cache): one warning naming the reason, then the same results."""

    def no_compiler():
        raise RuntimeError("Error building extension:\nc++: command not found")

    monkeypatch.setattr(fused, "_loaded", {})
    monkeypatch.setattr(fused, "_load", no_compiler)
    monkeypatch.delenv(fused.ENV, raising=False)
    state, policy = _case((4099,), torch.bfloat16, 3)
    out = torch.empty(4099, dtype=torch.bfloat16)
    want = state.clone().lerp_(policy.float(), 0.01)
    with caplog.at_level(logging.WARNING, logger="warpkit"):
        for _ in range(2):
            assert fused.kernels() is None
        ema_module.ema_update_([state], [policy], 0.01, out=[out])
    warnings = [r for r in caplog.records if "fused CPU anchor update is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "c++: command not found" in warnings[0].getMessage()
    assert torch.equal(_bits(state), _bits(want)) and torch.equal(_bits(out), _bits(want.bfloat16()))


def test_a_kernel_that_disagrees_with_torch_is_refused(kernels):
    """The bitwise check on first use: a library whose arithmetic differs is not used."""

    class Off:
        def ema_(self, state, policy, out, weight, fma):
            kernels.module.ema_(state, policy, out, weight * 1.0001, fma)

        def bema_(self, *args):
            kernels.module.bema_(*args)

    with pytest.raises(RuntimeError, match="bitwise"):
        fused._checked(Off(), "off.so")

"""The CPU anchor updates with an fp32 state in one pass over memory: a small C++ kernel (`fused.cpp`).

With a bf16/fp16 policy, the eager update (`warpkit.anchor.ema`) converts the policy into an fp32 scratch,
lerps, then casts the state into the reference: three passes. The kernel reads each input and writes each
output once, with the same arithmetic, so its results are bitwise those of the eager ops it replaces:

- `ema_`:  state <- lerp(state, policy, w); out <- state rounded to out's dtype (skipped where out is state).
  12 bytes per parameter with a bf16 policy and reference (read 2 + 4, write 4 + 2), 10 without an out.
- `bema_`: ema <- lerp(ema, policy, beta); out <- fp32((policy - theta0) * alpha) + ema, rounded once to
  out's dtype, as `warpkit.anchor.bema`'s chunked torch ops compute it. The minimum traffic of BEMA:
  read policy, theta0 and ema, write ema and out: 20 bytes per parameter in fp32, 14 in bf16.

lerp is ATen's CPU formula, `w < 0.5 ? self + w (end - self) : end - (1 - w) (end - self)`, evaluated as
ATen's vectorised kernel does: one fused multiply-add, fma(w < 0.5 ? w : w - 1, end - self, w < 0.5 ? self :
end), where this torch's kernels use FMA (x86 with AVX2 or AVX-512: checked), two roundings elsewhere;
bf16/fp16 are rounded to nearest even, as c10's conversions (bitwise equal for every non-NaN value).
Threads: as many as `torch.get_num_threads()`, one contiguous block of at least 2^16 elements each.

Built on first use with `torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja; about 40 s of
one core, once per machine, torch and Python version) into `$TORCH_EXTENSIONS_DIR` (default: torch's cache,
`~/.cache/torch_extensions`), folder `warpkit_fused_anchor_<isa>_<digest of source, flags, versions>/`,
under an flock (concurrent ranks build once; a killed build leaves no lock behind, unlike torch's lock
file). Then checked against the eager ops on probe tensors (both lerp branches, each dtype), which also
picks the variant with or without FMA. Every later process loads the cached library (no compiler needed).

`kernels()` is None, and the callers keep their eager path, when `WARPKIT_FUSED_ANCHOR=0`, or when the
build, the load or the check fails (one logged warning per process, saying why).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from warpkit._util.files import atomic_file, file_lock, remove_stale_temporaries, temp_prefix

__all__ = ["ENV", "FusedKernels", "bema_", "ema_", "kernels"]

ENV = "WARPKIT_FUSED_ANCHOR"  # "0" (or false, off, no): always the eager path
SOURCE = Path(__file__).with_name("fused.cpp")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
log = logging.getLogger(__name__)


class FusedKernels:
    """The loaded extension and the lerp variant (with or without FMA) that matches this torch bitwise."""

    def __init__(self, module: ModuleType, fma: bool, path: str) -> None:
        self.module, self.fma, self.path = module, fma, path

    def ema_(self, state: list[Tensor], policy: list[Tensor], out: list[Tensor], weight: float) -> None:
        self.module.ema_(state, policy, out, float(weight), self.fma)

    def bema_(self, ema, theta0, policy, out, beta: float, alpha: float) -> None:
        self.module.bema_(ema, theta0, policy, out, float(beta), float(alpha), self.fma)


_loaded: dict[str, Any] = {}  # "kernels": FusedKernels | None, once per process


def kernels() -> FusedKernels | None:
    """The fused kernels, built or loaded on first call; None when disabled or unavailable (see module doc)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if "kernels" not in _loaded:
        try:
            _loaded["kernels"] = _checked(*_load())
        except Exception as error:  # no compiler, no ninja, a read-only cache, a mismatch: the eager path
            reason = str(error).strip().splitlines() or [type(error).__name__]
            log.warning(
                "the fused CPU anchor update is unavailable (%s); using the eager torch path (same results, "
                "more memory traffic). Set %s=0 to skip the attempt.",
                reason[-1][:300],
                ENV,
            )
            _loaded["kernels"] = None
    return _loaded["kernels"]


def _isa() -> tuple[str, list[str]]:
    """(tag, flags): compile for what torch's own CPU kernels use, never for more (a shared cache is safe)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability.startswith(("AVX2", "AVX512", "AMX")):
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return capability.lower(), []


def _load() -> tuple[ModuleType, str]:
    from torch.utils.cpp_extension import get_default_build_root

    tag, isa = _isa()
    source = SOURCE.read_text()
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []  # threads; without it, one thread
    flags = ["-O3", "-ffp-contract=off", *isa, *openmp]
    key = "\n".join([source, torch.__version__, sys.version, platform.machine(), *flags])
    name = f"warpkit_fused_anchor_{tag}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    library = folder / f"{name}.so"
    if not library.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # flock, released by the OS if the holder dies (torch's own build lock file would stay behind)
        with file_lock(folder / ".build.lock"):
            if not library.is_file():
                return _build(name, source, flags, openmp, folder, library), str(library)
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(library)


def _build(
    name: str, source: str, flags: list[str], ldflags: list[str], folder: Path, library: Path
) -> ModuleType:
    from torch.utils.cpp_extension import load_inline

    remove_stale_temporaries(folder)  # what a build killed earlier left
    log.info("building the fused CPU anchor kernel (once per machine and torch version) into %s", folder)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(name), dir=folder)
    path = os.environ.get("PATH", "")
    venv_bin = str(Path(sys.executable).parent)  # `pip install ninja` in a venv that is not activated
    try:
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = os.pathsep.join([venv_bin, path])
        module = load_inline(
            name, cpp_sources=[source], extra_cflags=flags, extra_ldflags=ldflags, build_directory=tmp
        )
        with atomic_file(library) as staged:
            shutil.copyfile(module.__file__, staged)
        return module
    finally:
        os.environ["PATH"] = path
        shutil.rmtree(tmp, ignore_errors=True)


def _checked(module: ModuleType, path: str) -> FusedKernels:
    """The variant (FMA or not) whose results equal the eager torch ops bitwise on probe tensors."""
    for fma in (True, False):
        candidate = FusedKernels(module, fma, path)
        if all(_agrees(candidate, dtype, w) for dtype in _DTYPES for w in (0.01, 0.3, 0.5, 0.9)):
            return candidate
    raise RuntimeError(f"{path} does not reproduce torch's CPU lerp bitwise here")


def _agrees(k: FusedKernels, dtype: torch.dtype, w: float) -> bool:
    gen = torch.Generator().manual_seed(0)
    n = 4099  # a vector body and a tail whatever the width
    state, theta0 = torch.randn(n, generator=gen), torch.randn(n, generator=gen).to(dtype)
    policy = (state + 0.3 * torch.randn(n, generator=gen)).to(dtype)
    want_state = state.clone().lerp_(policy.float(), w)
    want_out = want_state.to(dtype)
    got_state, got_out = state.clone(), torch.empty(n, dtype=dtype)
    k.ema_([got_state], [policy], [got_out], w)
    alone = state.clone()
    k.ema_([alone], [policy], [alone], w)
    want_bema = policy.to(torch.float32, copy=True).sub_(theta0).mul_(1.7).add_(want_state).to(dtype)
    ema, got_bema = state.clone(), torch.empty(n, dtype=dtype)
    k.bema_([ema], [theta0], [policy], [got_bema], w, 1.7)
    return all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for a, b in ((got_state, want_state), (got_out, want_out), (alone, want_state), (ema, want_state))
    ) and torch.equal(got_bema.view(torch.uint8), want_bema.view(torch.uint8))


def _usable(state: Tensor, *others: Tensor) -> bool:
    return (
        state.device.type == "cpu"
        and state.dtype == torch.float32
        and state.is_contiguous()
        and all(t.device.type == "cpu" and t.dtype in _DTYPES and t.numel() == state.numel() for t in others)
    )


def ema_(state: list[Tensor], policy: list[Tensor], out: list[Tensor], weight: float) -> list[int]:
    """state_i <- lerp(state_i, policy_i, weight), out_i <- state_i (none where out_i is state_i), fused where
    it can; returns the indices it left to the caller (all of them when the kernels are unavailable).

    Fused: an fp32 contiguous CPU state, a float policy (copied first if not contiguous), a contiguous float
    out; bitwise what `state_i.lerp_(policy_i.float(), weight); out_i.copy_(state_i)` gives.
    """
    k = kernels()
    if k is None:
        return list(range(len(state)))
    done = [
        i
        for i in range(len(state))
        if _usable(state[i], policy[i], out[i]) and (out[i] is state[i] or out[i].is_contiguous())
    ]
    if done:
        k.ema_(
            [state[i] for i in done],
            [policy[i].detach().contiguous() for i in done],
            [out[i].detach() if out[i] is not state[i] else state[i] for i in done],
            weight,
        )
    return sorted(set(range(len(state))) - set(done))


def bema_(
    ema: list[Tensor],
    theta0: list[Tensor],
    policy: list[Tensor],
    out: list[Tensor],
    beta: float,
    alpha: float,
) -> list[int]:
    """ema_i <- lerp(ema_i, policy_i, beta), out_i <- ema_i + alpha (policy_i - theta0_i), fused where it can
    (as `ema_`; theta0_i in policy_i's dtype); returns the indices it left to the caller."""
    k = kernels()
    if k is None:
        return list(range(len(ema)))
    done = [
        i
        for i in range(len(ema))
        if _usable(ema[i], theta0[i], policy[i], out[i])
        and theta0[i].dtype == policy[i].dtype
        and out[i].is_contiguous()
        and out[i] is not ema[i]
    ]
    if done:
        k.bema_(
            [ema[i] for i in done],
            [theta0[i].detach().contiguous() for i in done],
            [policy[i].detach().contiguous() for i in done],
            [out[i].detach() for i in done],
            beta,
            alpha,
        )
    return sorted(set(range(len(ema))) - set(done))

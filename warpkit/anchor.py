"""Stage 1 of WARP: the KL reference is an exponential moving average (EMA) of the policy.

After every optimizer step (every `update_every` steps, gradient-accumulation safe)

    anchor <- (1 - mu) * anchor + mu * policy            mu = `ema_rate`; paper: mu = 0.01, every step

with the anchor equal to the policy when training starts, whatever TRL loaded as its reference. With
`update_every = tau > 1` this is TR-DPO's soft update (TRL's `sync_ref_model`), alpha = mu every tau steps.

Where the anchor lives, per setup (`EMAAnchorCallback` picks the layout when training starts):

- full fine-tuning (plain module, DDP, DeepSpeed ZeRO-1/2): `trainer.ref_model`'s parameters, updated in place
  on every rank identically. Low-precision tensors (bf16/fp16) get an fp32 shadow: an update of size
  mu * (policy - anchor) ~ 1e-2 * 1e-3 is below bf16's resolution and would be lost in place.
- DeepSpeed ZeRO-3: policy and reference are partitioned with the same world size, so the i-th rank holds the
  same slice of every tensor in both; the EMA runs on the local slices (`param.ds_tensor`) with no
  communication at all, and nothing is ever gathered whole. Reference parameters that DeepSpeed keeps
  gathered (small "persistent" ones) are re-gathered from their updated slices.
- LoRA (a `PeftModel`; TRL then reads the reference through a `"ref"` adapter), `lora_mode="exact"`: the anchor
  is W0 + D per adapted linear layer, D = EMA of the adapted delta s * B @ A (shape out x in, fp32). D is full
  rank (an average of rank-r products), so it is held densely and added to the layer's output by a forward
  hook while the `"ref"` adapter is active (its own B is zeroed). Memory: one out x in matrix per adapted layer.
- LoRA, `lora_mode="factors"`: EMA of A and of B separately into the `"ref"` adapter. This is NOT the EMA of
  B @ A (the product of averages is not the average of products); it is a documented approximation for runs
  that cannot afford D, and `bench/anchor.py` prints its deviation from the exact EMA.

Checkpoints: the anchor's state (fp32) goes to `<checkpoint>/warpkit_anchor[-rank<r>-of-<w>].safetensors`
(atomic write) at every Trainer save, before the Trainer's own `trainer_state.json`, and
`resume_from_checkpoint` restores it, so a resumed run ends with the same anchor as an uninterrupted one.
Under ZeRO-3 each rank saves its slices, so a resume needs the same number of processes.

Cost per update: fp32, one pass reading policy and anchor and writing the anchor (`bench/anchor.py` measures
it at the speed of a single `lerp_` over a flat buffer); bf16/fp16, the fp32 shadow adds 4 bytes per parameter
of memory and is updated cache-blocked. LoRA exact: one `addmm_` per adapted layer.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import TrainerCallback

__all__ = ["EMAAnchorCallback", "LoraMode", "ema_update_"]

LoraMode = Literal["exact", "factors"]
STATE_FORMAT = "warpkit-anchor-v1"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def ema_update_(
    anchor: list[Tensor], policy: list[Tensor], ema_rate: float, *, out: list[Tensor] | None = None
) -> None:
    """In place: anchor_i <- (1 - mu) * anchor_i + mu * policy_i (mu = `ema_rate`), then out_i <- anchor_i.

    `anchor` is the EMA state (fp32 when the model is bf16/fp16: the fp32 shadow), `out` the tensors the
    reference forward reads (cast on copy; skipped where `out_i is anchor_i`). Shapes must match pairwise.

    - Same-dtype pairs: one `torch._foreach_lerp_`, which reads anchor and policy once and writes anchor once,
      the memory-bandwidth floor (TRL's `mul_` + `add_` passes over the anchor twice).
    - Mixed pairs (fp32 shadow, bf16 policy): lerp wants equal dtypes and mixed-dtype foreach ops take a slow,
      unvectorised path, so the policy is converted into a small fp32 scratch, chunk by chunk, and each chunk is
      averaged and written back while it is still in cache (CPU); on accelerators, where launches cost more
      than passes, whole buckets of tensors go through three foreach calls instead.
    """
    if len(anchor) != len(policy) or (out is not None and len(out) != len(anchor)):
        raise ValueError(f"Got {len(anchor)} anchor, {len(policy)} policy and {len(out or [])} out tensors.")
    out = anchor if out is None else out
    same = [i for i in range(len(anchor)) if anchor[i].dtype == policy[i].dtype]
    mixed = [i for i in range(len(anchor)) if anchor[i].dtype != policy[i].dtype]
    if same:
        torch._foreach_lerp_([anchor[i] for i in same], [policy[i] for i in same], ema_rate)
        copies = [i for i in same if out[i] is not anchor[i]]
        if copies:
            torch._foreach_copy_([out[i] for i in copies], [anchor[i] for i in copies])
    if not mixed:
        return
    if anchor[mixed[0]].device.type == "cpu":
        _mixed_chunked_(
            [anchor[i] for i in mixed], [policy[i] for i in mixed], [out[i] for i in mixed], ema_rate
        )
    else:
        _mixed_bucketed_(
            [anchor[i] for i in mixed], [policy[i] for i in mixed], [out[i] for i in mixed], ema_rate
        )


_CHUNK_NUMEL = 1 << 20  # 4 MB of fp32 scratch: stays in cache, large enough for multithreaded kernels
_BUCKET_NUMEL = 1 << 25  # 128 MB of fp32 scratch per bucket on accelerators


def _mixed_chunked_(anchor: list[Tensor], policy: list[Tensor], out: list[Tensor], ema_rate: float) -> None:
    scratch = torch.empty(_CHUNK_NUMEL, dtype=anchor[0].dtype, device=anchor[0].device)
    for a, p, o in zip(anchor, policy, out, strict=True):
        a, p, o = a.view(-1), p.reshape(-1), o.view(-1)
        for start in range(0, a.numel(), _CHUNK_NUMEL):
            stop = min(start + _CHUNK_NUMEL, a.numel())
            chunk = scratch[: stop - start]
            chunk.copy_(p[start:stop])
            a[start:stop].lerp_(chunk, ema_rate)
            if o is not a:
                o[start:stop].copy_(a[start:stop])


def _squared_distance_and_norm(anchor: list[Tensor], policy: list[Tensor]) -> tuple[float, float]:
    """(sum |a_i - p_i|^2, sum |p_i|^2) in fp32, through a cache-sized scratch: no model-sized temporaries."""
    scratch = torch.empty(_CHUNK_NUMEL, dtype=torch.float32, device=anchor[0].device)
    num = torch.zeros((), dtype=torch.float64, device=anchor[0].device)
    den = torch.zeros((), dtype=torch.float64, device=anchor[0].device)
    for a, p in zip(anchor, policy, strict=True):
        a, p = a.reshape(-1), p.reshape(-1)
        for start in range(0, a.numel(), _CHUNK_NUMEL):
            stop = min(start + _CHUNK_NUMEL, a.numel())
            chunk = scratch[: stop - start]
            chunk.copy_(p[start:stop])
            den += torch.dot(chunk, chunk).double()
            chunk.sub_(a[start:stop])
            num += torch.dot(chunk, chunk).double()
    return float(num), float(den)


def _mixed_bucketed_(anchor: list[Tensor], policy: list[Tensor], out: list[Tensor], ema_rate: float) -> None:
    size = max(_BUCKET_NUMEL, max(p.numel() for p in policy))
    scratch = torch.empty(size, dtype=anchor[0].dtype, device=anchor[0].device)
    start = 0
    while start < len(anchor):
        stop, used = start, 0
        while stop < len(anchor) and (stop == start or used + policy[stop].numel() <= size):
            used += policy[stop].numel()
            stop += 1
        views, offset = [], 0
        for p in policy[start:stop]:
            views.append(scratch[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        torch._foreach_copy_(views, policy[start:stop])
        torch._foreach_lerp_(anchor[start:stop], views, ema_rate)
        pairs = [(o, a) for o, a in zip(out[start:stop], anchor[start:stop], strict=True) if o is not a]
        if pairs:
            torch._foreach_copy_([o for o, _ in pairs], [a for _, a in pairs])
        start = stop


@dataclass
class _Layout:
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


def _fp32_state(targets: list[Tensor]) -> list[Tensor]:
    """The target itself when it is fp32/fp64, else an fp32 shadow of it (same device)."""
    return [t if t.dtype not in _LOW_PRECISION else t.detach().float() for t in targets]


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
        self._layout: _Layout | None = None
        self._hooks: list[Any] = []
        self._saved_step = -1
        self._peft = _peft_model(trainer)
        if self._peft is not None:
            _lora_layers(self._peft)  # refuse unsupported adapters now rather than when training starts
            _ensure_ref_adapter(self._peft)
        elif trainer.ref_model is None:
            raise ValueError(
                "trainer.ref_model is None although beta > 0 and the model is not a PeftModel; there is no "
                "reference to turn into an anchor."
            )

    # ---- binding ---------------------------------------------------------------------------------------
    def _bind(self) -> _Layout:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._peft is not None:
            return _lora_layout(self._peft, self.lora_mode, self._hooks)
        policy = _unwrap(self.trainer.model)
        ref = _unwrap(self.trainer.ref_model)
        return _full_layout(policy, ref)

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
            num, den = _squared_distance_and_norm(layout.state, layout.sources)
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
    def _require_layout(self) -> _Layout:
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DeepSpeedEngine / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _peft_model(trainer) -> nn.Module | None:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a model without it is simply not a PeftModel
        return None
    model = _unwrap(trainer.model)
    return model if isinstance(model, PeftModel) else None


# ---- full fine-tuning ----------------------------------------------------------------------------------
def _full_layout(policy: nn.Module, ref: nn.Module) -> _Layout:
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
        return _zero3_layout(names, policy_params, ref_params)
    for n in names:
        if policy_params[n].shape != ref_params[n].shape:
            raise ValueError(
                f"{n}: policy shape {tuple(policy_params[n].shape)} != reference {tuple(ref_params[n].shape)}."
            )
    targets = [ref_params[n].data for n in names]
    return _Layout("full", names, [policy_params[n].data for n in names], targets, _fp32_state(targets))


def _zero3_layout(names: list[str], policy_params: dict, ref_params: dict) -> _Layout:
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

    return _Layout(
        "zero3",
        names,
        [policy_params[n].ds_tensor.data for n in names],
        targets,
        _fp32_state(targets),
        after_write=[refresh_gathered],
    )


# ---- LoRA ----------------------------------------------------------------------------------------------
def _ensure_ref_adapter(model) -> None:
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


def _lora_layers(model) -> list[tuple[str, nn.Module]]:
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


def _lora_layout(model, lora_mode: LoraMode, hooks: list) -> _Layout:
    layers = _lora_layers(model)
    if lora_mode == "factors":
        names, sources, targets = [], [], []
        for name, m in layers:
            for part in ("lora_A", "lora_B"):
                names.append(f"{name}.{part}")
                sources.append(getattr(m, part)["default"].weight.data)
                targets.append(getattr(m, part)["ref"].weight.data)
        return _Layout("lora_factors", names, sources, targets, _fp32_state(targets))

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
    return _Layout("lora_exact", names, sources, dense, state)


def _make_ref_hook(d: Tensor):
    def hook(module, args, output):
        if module.disable_adapters or module.merged or "ref" not in module.active_adapters:
            return None
        x = args[0]
        return output + F.linear(x.to(d.dtype), d).to(output.dtype)

    return hook

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

Modules, imports pointing down (bema, elastic -> callback -> layouts, lora -> ema; trl_adapter imports
nothing of warpkit):

- `ema`: the update rules as pure torch functions over tensor lists (and the LoRA delta's dense EMA);
- `layouts`: the `Layout` interface, full fine-tuning with fp32 shadows, ZeRO-3 local slices;
- `lora`: the LoRA layouts (exact D, factors) and the checks of what LoRA setups are supported;
- `trl_adapter`: the only module touching TRL/Trainer private internals, checked when the callback is built;
- `callback`: `AnchorCallback` (the Trainer events and checkpoint files every kind shares) and
  `EMAAnchorCallback`.

The EMA's relatives, each a callback over the same layouts and state-file machinery:

- `schedules`: when they act and with which coefficients (plain Python, imported by the RL config's checks);
- `bema`: `BEMAAnchorCallback`, the reference is the bias-corrected EMA of the policy (BEMA, arXiv 2508.00180,
  as TRL's `BEMACallback` computes it);
- `elastic`: `ElasticResetCallback`, the reference stays the init; every n steps policy <- EMA, EMA <- init
  (Elastic Reset, arXiv 2312.07551).
"""

from warpkit.anchor.bema import BEMAAnchorCallback, bema_update_
from warpkit.anchor.callback import AnchorCallback, EMAAnchorCallback
from warpkit.anchor.elastic import ElasticResetCallback
from warpkit.anchor.ema import ema_update_
from warpkit.anchor.lora import LoraMode
from warpkit.anchor.schedules import BemaSchedule, ElasticSchedule
from warpkit.anchor.trl_adapter import TrlInternalsError

__all__ = [
    "AnchorCallback",
    "BEMAAnchorCallback",
    "BemaSchedule",
    "EMAAnchorCallback",
    "ElasticResetCallback",
    "ElasticSchedule",
    "LoraMode",
    "TrlInternalsError",
    "bema_update_",
    "ema_update_",
]

"""The KL anchor of one RL run (`rl.anchor`): the kinds, their settings' checks, and their callback.

| `rl.anchor`     | KL reference                                 | callback (`warpkit.anchor`)   | settings                     |
|-----------------|----------------------------------------------|-------------------------------|------------------------------|
| `ema`           | EMA of the policy (WARP stage 1)             | `EMAAnchorCallback`           | ema_rate, ema_update_every   |
| `bema`          | bias-corrected EMA of the policy (BEMA)      | `BEMAAnchorCallback`          | bema_* (TRL's BEMA names)    |
| `elastic_reset` | the init; policy <- EMA, EMA <- init every n | `ElasticResetCallback`        | reset_every, ema_rate, ...   |
| `sft`           | the init, fixed (TRL's own reference)        | none                          | -                            |

The checks run where the settings are parsed (`RLArguments.__post_init__`, `rl.check_args`), so a WARP config
with a bad anchor setting fails in the driver before any run starts; the callbacks check again when built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ANCHORS", "anchor_callback", "anchor_settings", "check_anchor_args", "check_anchor_fields"]

ANCHORS = ("ema", "bema", "elastic_reset", "sft")
_REFERENCE_ROLE = {  # what each kind needs TRL's reference for, in refusals
    "ema": "to move",
    "bema": "to write the BEMA iterate into",
    "elastic_reset": "(the init) for Elastic Reset to keep",
}


def check_anchor_fields(rl_args: Any) -> None:
    """The anchor's own fields of `RLArguments`: `reset_every` with `elastic_reset` only (and >= 1 there), the
    `bema_*` settings when `anchor == "bema"` (`check_bema_settings`). ValueError naming the field and the fix."""
    reset_every = rl_args.reset_every
    if rl_args.anchor == "elastic_reset" and (
        isinstance(reset_every, bool) or not isinstance(reset_every, int) or reset_every < 1
    ):
        raise ValueError(
            f"reset_every={reset_every!r}: anchor='elastic_reset' needs reset_every = n >= 1, the optimizer "
            "steps between two resets (policy <- EMA, EMA <- init)."
        )
    if rl_args.anchor != "elastic_reset" and reset_every is not None:
        raise ValueError(
            f"reset_every={reset_every!r} is set but anchor={rl_args.anchor!r}: only anchor='elastic_reset' "
            "resets. Remove reset_every or set anchor: elastic_reset."
        )
    if rl_args.anchor == "bema":
        from warpkit.anchor.schedules import check_bema_settings

        check_bema_settings(rl_args.bema_settings(), prefix="bema_")


def check_anchor_args(rl_args: Any, training_args: Any, model_args: Any) -> None:
    """What the anchor needs from TRL's config and the model: a reference (beta > 0), no `sync_ref_model`,
    full fine-tuning for `bema` and `elastic_reset`."""
    anchor = rl_args.anchor
    if anchor != "sft" and training_args.beta == 0:
        raise ValueError(
            f"beta=0 with anchor={anchor!r}: TRL loads no reference model when beta is 0, so there is no KL "
            f"anchor {_REFERENCE_ROLE[anchor]}. Set beta > 0 (the paper uses 0.1)."
        )
    if anchor == "ema" and getattr(training_args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True and anchor='ema' both rewrite the reference: keep one. WARP's EMA anchor is "
            "TRL's sync with alpha = ema_rate and tau = 1, done exactly; set sync_ref_model=False."
        )
    if anchor != "sft" and getattr(training_args, "sync_ref_model", False):
        raise ValueError(
            f"sync_ref_model=True rewrites the reference, the KL anchor {_REFERENCE_ROLE[anchor]} with "
            f"anchor={anchor!r}; set sync_ref_model=False."
        )
    if anchor in ("bema", "elastic_reset") and getattr(model_args, "use_peft", False):
        raise ValueError(
            f"anchor={anchor!r} supports full fine-tuning only, and use_peft is true. Set use_peft: false, or "
            "anchor: ema, whose anchor supports LoRA."
        )


def anchor_settings(rl_args: Any) -> dict[str, Any]:
    """The settings the run's anchor uses, by their `rl` names (run_info.json)."""
    if rl_args.anchor == "ema":
        return {"ema_rate": rl_args.ema_rate, "ema_update_every": rl_args.ema_update_every}
    if rl_args.anchor == "bema":
        return {f"bema_{name}": value for name, value in rl_args.bema_settings().items()}
    if rl_args.anchor == "elastic_reset":
        names = ("reset_every", "ema_rate", "ema_update_every")
        return {name: getattr(rl_args, name) for name in names}
    return {}


def anchor_callback(trainer: Any, rl_args: Any):
    """The callback of `rl_args.anchor` for `trainer` (None for "sft": TRL's fixed reference needs none)."""
    from warpkit.anchor import BEMAAnchorCallback, ElasticResetCallback, EMAAnchorCallback

    if rl_args.anchor == "ema":
        return EMAAnchorCallback(trainer, ema_rate=rl_args.ema_rate, update_every=rl_args.ema_update_every)
    if rl_args.anchor == "bema":
        return BEMAAnchorCallback(trainer, **rl_args.bema_settings())
    if rl_args.anchor == "elastic_reset":
        return ElasticResetCallback(
            trainer,
            reset_every=rl_args.reset_every,
            ema_rate=rl_args.ema_rate,
            update_every=rl_args.ema_update_every,
        )
    return None

"""Launched by tests/anchor/test_distributed.py under `accelerate launch` (DDP, ZeRO-2, ZeRO-3 on CPU/gloo).

Runs a tiny RLOO for a few steps with EMAAnchorCallback, snapshots the (gathered) policy after every optimizer
step, and writes, per rank, `<out>/rank<r>.safetensors` holding the final reference weights (`anchor.<name>`,
gathered whole), the float64 EMA recomputed from the snapshots (`expected.<name>`), and logits of the
reference's own forward (`ref_logits`) beside those of a plain model holding the expected anchor.

usage: run_anchor.py MODEL_DIR OUT_DIR EMA_RATE
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PolicySnapshots, ema_reference, make_trainer

from warpkit.anchor import EMAAnchorCallback


def gathered(params: list[torch.nn.Parameter]):
    """Whole tensors under ZeRO-3 (collective, read-only), a no-op otherwise."""
    if params and hasattr(params[0], "ds_tensor"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class GatheredSnapshots(PolicySnapshots):
    def _take(self) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        snap = {}
        for name, param in model.named_parameters():  # one tensor at a time: never the whole model at once
            with gathered([param]):
                snap[name] = param.detach().to(torch.float64).clone()
        self.snapshots.append(snap)


def main() -> None:
    model_dir, out_dir, ema_rate = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    trainer = make_trainer(
        "rloo", model_dir, model_dir, out_dir / "run", per_device_train_batch_size=2, ddp_backend="gloo"
    )
    callback = EMAAnchorCallback(trainer, ema_rate=ema_rate)
    trainer.add_callback(callback)
    snaps = GatheredSnapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()

    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    ref = getattr(ref, "module", ref)
    result = {f"expected.{n}": t for n, t in ema_reference(snaps.snapshots, ema_rate).items()}
    for name, param in ref.named_parameters():
        with gathered([param]):
            result[f"anchor.{name}"] = param.detach().to(torch.float64).clone()
    result["moved"] = torch.tensor(
        max(float((snaps.snapshots[-1][n] - snaps.snapshots[0][n]).abs().max()) for n in snaps.snapshots[0])
    )
    # What TRL's reference forward computes now (the engine's own forward: under ZeRO-3 it gathers the updated
    # slices, and persistent parameters must have been refreshed), against a plain model holding the expected
    # anchor. Rows of a fixed input; every rank runs it (collective under ZeRO-3).
    input_ids = torch.arange(5, 21).reshape(2, 8)
    with torch.no_grad():
        result["ref_logits"] = trainer.ref_model(input_ids=input_ids).logits.double()
        unset_hf_deepspeed_config()  # the plain model must be whole, not built under zero.Init
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        plain.load_state_dict(
            {n[len("expected.") :]: t for n, t in result.items() if n.startswith("expected.")}, strict=False
        )
        result["expected_logits"] = plain(input_ids=input_ids).logits
    result["zero3"] = torch.tensor(int(callback.layout.kind == "zero3"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.items()}, str(out_dir / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()

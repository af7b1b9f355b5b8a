"""Launched by tests/anchor/test_distributed_relatives.py under `accelerate launch` (DDP, ZeRO-3 on CPU/gloo).

Runs a tiny RLOO for 4 steps with BEMAAnchorCallback or ElasticResetCallback and writes, per rank,
`<out>/rank<r>.safetensors` with the (gathered) tensors the test compares against the float64 rule recomputed
from this rank's own gathered policy snapshots:

- bema: `anchor.<n>` (the reference), `expected.<n>` (`bema_reference`), and the reference's forward logits
  (`ref_logits`) beside those of a plain model holding the expected anchor (`expected_logits`);
- elastic_reset: `post<t>.<n>` (the policy after step t and its reset, t = 0..5), `expected<t>.<n>` (its
  `elastic_reference`), `ema.<n>` and `expected_ema.<n>`, `ref.<n>` and `init.<n>` (the policy when training
  started).

usage: run_relatives.py KIND MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bema_reference, elastic_reference, make_trainer
from run_anchor import GatheredSnapshots, gathered

from warpkit.anchor import BEMAAnchorCallback, ElasticResetCallback

BEMA = dict(update_freq=1, update_after=1, lag=1, ema_power=0.5, bias_power=0.2)
ELASTIC = dict(reset_every=2, ema_rate=0.3)


def _gathered_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            out[name] = param.detach().to(torch.float64).clone()
    return out


def _bema(trainer, model_dir: str) -> dict[str, torch.Tensor]:
    callback = BEMAAnchorCallback(trainer, **BEMA)
    snaps = GatheredSnapshots(trainer)
    trainer.add_callback(callback)
    trainer.add_callback(snaps)
    trainer.train()
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    ref = getattr(ref, "module", ref)
    expected = bema_reference(snaps.snapshots, **BEMA)[0]
    result = {f"expected.{n}": t for n, t in expected.items()}
    result.update({f"anchor.{n}": t for n, t in _gathered_params(ref).items()})
    input_ids = torch.arange(5, 21).reshape(2, 8)
    with torch.no_grad():
        result["ref_logits"] = trainer.ref_model(input_ids=input_ids).logits.double()
        unset_hf_deepspeed_config()  # the plain model must be whole, not built under zero.Init
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        plain.load_state_dict(expected, strict=False)
        result["expected_logits"] = plain(input_ids=input_ids).logits
    result["zero3"] = torch.tensor(int(callback.layout.kind == "bema_zero3"))
    result["moved"] = torch.tensor(
        max(float((snaps.snapshots[-1][n] - snaps.snapshots[0][n]).abs().max()) for n in expected)
    )
    return result


def _elastic(trainer) -> dict[str, torch.Tensor]:
    pre, post = GatheredSnapshots(trainer), GatheredSnapshots(trainer)
    callback = ElasticResetCallback(trainer, **ELASTIC)
    for cb in (pre, callback, post):  # the policy before and after the callback, at every step
        trainer.add_callback(cb)
    trainer.train()
    want_post, want_ema = elastic_reference(pre.snapshots, **ELASTIC)
    result = {}
    for t, (got, want) in enumerate(zip(post.snapshots, want_post, strict=True)):
        result.update({f"post{t}.{n}": v for n, v in got.items()})
        result.update({f"expected{t}.{n}": v for n, v in want.items()})
    result.update({f"ema.{n}": t.double() for n, t in callback.ema_state().items()})
    result.update({f"expected_ema.{n}": t for n, t in want_ema.items()})
    result.update({f"ref.{n}": t for n, t in _gathered_params(trainer.ref_model).items()})
    result.update({f"init.{n}": t for n, t in pre.snapshots[0].items()})
    result["resets"] = torch.tensor(callback.num_resets)
    result["steps"] = torch.tensor(len(post.snapshots) - 1)
    return result


def main() -> None:
    kind, model_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    steps = (
        4 if kind == "bema" else 5
    )  # Elastic Reset: resets after steps 2 and 4, then one step from the reset
    trainer = make_trainer(
        "rloo", model_dir, model_dir, out_dir / "run", per_device_train_batch_size=2, ddp_backend="gloo",
        max_steps=steps,
    )  # fmt: skip
    result = _bema(trainer, model_dir) if kind == "bema" else _elastic(trainer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.clone() for k, v in result.items()}, str(out_dir / f"rank{rank}.safetensors")
    )  # no aliases


if __name__ == "__main__":
    main()

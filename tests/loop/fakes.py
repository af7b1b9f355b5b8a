"""A deterministic fake RL run for driver tests, importable in-process and runnable as a crashing subprocess.

`fake_train(spec, env)` writes `spec.policy_dir` = init + 0.01 * N(0, 1) noise seeded by the run's data_seed,
so two runs from one init have (nearly) orthogonal task vectors, like independent RL runs.

As a script: `python tests/loop/fakes.py OUTPUT_DIR SFT_DIR [CRASH_POINT]` runs the WARP loop (I=2, M=2) with
the fake trainer and, if CRASH_POINT is given, kills itself with SIGKILL there:
- `run`: midway through iteration 1's second run, after its policy folder was half written;
- `merge`: inside iteration 1's merge, after the first tensor was written to the output shard;
- `between`: right after iteration 1's merge was recorded, before iteration 2 starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from warpkit.loop.config import WarpConfig
from warpkit.loop.driver import run_warp
from warpkit.loop.launch import RunSpec
from warpkit.loop.manifest import Manifest
from warpkit.merge.writer import ShardedWriter


def fake_policy_state(init_dir: Path, data_seed: int) -> dict[str, torch.Tensor]:
    state = load_file(str(init_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(1000 + data_seed)
    return {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }


def fake_train(spec: RunSpec, env: dict[str, str], crash_midway: bool = False) -> None:
    state = fake_policy_state(spec.init, spec.data_seed)
    tmp = spec.output_dir / ".policy.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(spec.init, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.json.index"))
    if crash_midway:
        (tmp / "model.safetensors").write_bytes(b"half written")
        shutil.copytree(tmp, spec.policy_dir)  # even a policy folder that looks real must not be trusted
        os.kill(os.getpid(), signal.SIGKILL)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, spec.policy_dir)


def tiny_config(output_dir: Path, sft: Path, **kw) -> WarpConfig:
    return WarpConfig(
        model_name_or_path=str(sft),
        output_dir=str(output_dir),
        iterations=2,
        num_policies=2,
        liti_eta=0.3,
        merge_granularity="tensor",
        **kw,
    )


def _main(output_dir: str, sft: str, crash: str | None = None) -> None:
    config = tiny_config(Path(output_dir), Path(sft))

    def train(spec: RunSpec, env: dict[str, str]) -> None:
        fake_train(spec, env, crash_midway=crash == "run" and spec.key == "iter_1/run_2")

    if crash == "merge":
        write = ShardedWriter.write

        def write_then_die(self, *args, **kwargs):
            write(
                self, *args, **kwargs
            )  # the first tensor of the merge reaches the disk, then the process dies
            os.kill(os.getpid(), signal.SIGKILL)

        ShardedWriter.write = write_then_die
    if crash == "between":
        record = Manifest.record

        def record_then_die(self, step, *args, **kwargs):
            record(self, step, *args, **kwargs)
            if step.key == "iter_1/merge":
                os.kill(os.getpid(), signal.SIGKILL)

        Manifest.record = record_then_die
    run_warp(config, train_fn=train)


if __name__ == "__main__":
    _main(*sys.argv[1:])

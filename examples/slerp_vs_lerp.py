"""Why WARP merges by SLERP of task vectors: two independent fine-tunes have near-orthogonal task vectors,
and LERP shrinks the merged task vector by ~1/sqrt(2) where SLERP keeps its norm.

    python examples/slerp_vs_lerp.py        # a few seconds on a CPU

Builds a tiny model locally, makes two "policies" by adding independent noise (a stand-in for two RL runs
from one init), merges them both ways with warpkit's streaming engine, and prints the geometry.
"""

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from warpkit.merge.folders import merge_folders
from warpkit.testing import save_tiny_model

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    init = save_tiny_model(tmp / "init", "llama", hidden_size=64)
    init_state = load_file(str(init / "model.safetensors"))
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        policy = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in init_state.items()}
        save_tiny_model(tmp / f"policy{seed}", "llama", hidden_size=64)  # config and tokenizer
        save_file(policy, str(tmp / f"policy{seed}" / "model.safetensors"), metadata={"format": "pt"})

    models = [tmp / "policy1", tmp / "policy2"]
    slerp = merge_folders("slerp", init, models, tmp / "slerp", granularity="model", progress=False)
    merge_folders("lerp", init, models, tmp / "lerp", granularity="model", progress=False)

    def task_vector_norm(folder: Path) -> float:
        state = load_file(str(folder / "model.safetensors"))
        return sum(((state[k] - init_state[k]).double() ** 2).sum() for k in init_state).sqrt().item()

    (stats,) = slerp.stats.values()
    print(f"angle between the two task vectors: {stats.angles_deg[-1]:.1f} degrees")
    print(f"|d1| = {stats.norms[0]:.4f}, |d2| = {stats.norms[1]:.4f}")
    print(f"|SLERP task vector| = {task_vector_norm(tmp / 'slerp'):.4f}   (kept)")
    print(f"|LERP task vector|  = {task_vector_norm(tmp / 'lerp'):.4f}   (shrunk by ~1/sqrt(2))")

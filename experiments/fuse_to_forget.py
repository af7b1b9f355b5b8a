"""Fuse to Forget (Zaman et al. 2023, arXiv 2311.07682, memorization: its Table 2 and Figure 2), reproduced
small on CPU with `warpkit forget`.

Setup, as the paper's memorization experiment but tiny: one reference LM (a tiny random llama, hidden 32,
two layers, GPT-2's tokenizer; the paper fine-tunes pretrained GPT-2), fine-tuned twice from it until it
memorizes: model a on shard `shared` + shard `only_a`, model b on `shared` + `only_b`, each shard 16 real
movie-review sentences from the packaged texts (`warpkit.workloads.default:review_prompts`), cut to 32
tokens. Then `experiments/fuse_to_forget.yaml`: the interpolation path a -> b over alpha in {0, 0.1, ..., 1},
three registry merges (soup, slerp, ties), the ALR of every point on the three shards and a held-out
shard, and Fisher overlaps.

Departures from the paper: a random tiny reference instead of pretrained GPT-2 (so held-out text is not
"already likely": the fine-tuned models find it *less* likely than the uniform reference, ALR > 1), 16
sentences per shard instead of thousands of CNN-DM articles, full-batch Adam for 40 steps instead of 10
epochs, one text per sample in the ALR instead of 1024-token blocks.

Run (about 3-5 minutes on 2 CPU cores):
    python -m experiments.fuse_to_forget --models runs/fuse_to_forget --output_dir results/fuse_to_forget
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "fuse_to_forget.yaml"

__all__ = ["CONFIG", "build_models", "shards"]


def shards(size: int) -> dict[str, list[str]]:
    """The first 4 x `size` training review sentences as shards shared, only_a, only_b, held_out."""
    from warpkit.workloads.default import review_prompts

    texts = list(review_prompts("train")["text"])
    names = ["shared", "only_a", "only_b", "held_out"]
    return {n: texts[i * size : (i + 1) * size] for i, n in enumerate(names)}


def build_models(
    root: str | Path,
    *,
    size: int = 16,
    hidden: int = 32,
    steps: int = 40,
    lr: float = 1e-2,
    max_tokens: int = 32,
) -> dict[str, Path]:
    """ref (random tiny llama), a (ref fine-tuned on shared + only_a), b (on shared + only_b) under `root`."""
    from warpkit.testing import save_tiny_model, train_tiny_lm

    root = Path(root)
    data = shards(size)
    ref = save_tiny_model(root / "ref", "llama", hidden_size=hidden, num_layers=2, seed=0)
    kw = {"steps": steps, "learning_rate": lr, "max_tokens": max_tokens}
    a = train_tiny_lm(ref, data["shared"] + data["only_a"], root / "a", seed=1, **kw)
    b = train_tiny_lm(ref, data["shared"] + data["only_b"], root / "b", seed=2, **kw)
    return {"ref": ref, "a": a, "b": b}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="runs/fuse_to_forget", help="where the three models are built")
    parser.add_argument("--output_dir", default="results/fuse_to_forget")
    args = parser.parse_args(argv)
    from warpkit.cli import main as warpkit

    t0 = time.perf_counter()
    build_models(args.models)
    built = time.perf_counter() - t0
    os.environ["FUSE_TO_FORGET_MODELS"] = str(Path(args.models).resolve())
    code = warpkit(["forget", str(CONFIG), "--output_dir", args.output_dir, "--no-progress"])
    total = time.perf_counter() - t0
    print(f"models built in {built:.0f} s; total wall time {total:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())

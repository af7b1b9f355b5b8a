"""Benchmark: TIES and DARE-TIES with warpkit vs mergekit (`ties`, `dare_ties`) vs peft's merge utilities.

Same inputs as bench/merge.py (three random ~0.5B-parameter llama-style checkpoints, float32, sharded;
built there and reused from --workdir), same machine, each run in its own process:

- warpkit:  `warpkit merge --method ties --density 0.5` and `--method dare_ties --density 0.5 --seed 0`;
            also `--trim-scope model` (the TIES paper's whole-model trim), timed against per-tensor.
- mergekit: `mergekit-yaml` with `merge_method: ties` / `dare_ties`, base_model set, weight 1, density 0.5
            (its own venv, default /work/venvs/mergekit).
- peft:     `peft.utils.merge_utils.ties` / `dare_ties` called tensor by tensor on the task vectors read
            with `safe_open`, written with `save_file` (peft has no checkpoint-level driver; this is the
            thinnest loop around its utilities).

Prints wall time and peak RssAnon per run, the ratios, and the largest difference between warpkit's
TIES output and each peer's (DARE's masks are random and differ between tools: timing only).

Usage: python bench/merge_toolbox.py [--workdir /tmp/warpkit-bench-merge]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import REPO, build_models, max_abs_diff, measure


def peft_merge(method: str, init: str, a: str, b: str, out: str) -> None:
    import torch
    from peft.utils.merge_utils import dare_ties, ties
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    index = json.loads((Path(init) / "model.safetensors.index.json").read_text())
    weights = torch.tensor([1.0, 1.0])
    for file in sorted(set(index["weight_map"].values())):
        merged = {}
        with (
            safe_open(Path(init) / file, "pt") as fi,
            safe_open(Path(a) / file, "pt") as fa,
            safe_open(Path(b) / file, "pt") as fb,
        ):
            for name in fi.keys():  # noqa: SIM118 (safe_open is not a dict)
                base = fi.get_tensor(name).float()
                tasks = [fa.get_tensor(name).float() - base, fb.get_tensor(name).float() - base]
                fn = ties if method == "ties" else dare_ties
                merged[name] = base + fn(tasks, weights, 0.5)
        save_file(merged, out_dir / file, metadata={"format": "pt"})
        del merged
    shutil.copy(Path(init) / "config.json", out_dir / "config.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/warpkit-bench-merge")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    args = p.parse_args()
    work = Path(args.workdir)
    (init, a, b), n_params = build_models(
        work / "inputs", args.layers, 1024, 4096, 49152, "float32", 500 * 10**6
    )
    print(f"{n_params / 1e9:.3f}B parameters per model, float32, 3 inputs", flush=True)
    outs = work / "toolbox-outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    mk_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    py = sys.executable
    runs = {}
    for method in ("ties", "dare_ties"):
        key = f"warpkit {method}"
        cmd = [
            py,
            "-m",
            "warpkit.cli",
            "merge",
            "--method",
            method,
            "--init",
            str(init),
            "--models",
            str(a),
            str(b),
        ]
        extra = ["--density", "0.5"] + (["--seed", "0"] if method == "dare_ties" else [])
        runs[key] = measure([*cmd, *extra, "--out", str(outs / key.replace(" ", "-")), "--no-progress"], env)
        print(f"  {key}: {runs[key]['seconds']:.1f} s", flush=True)
        if method == "ties":  # the TIES paper's model-wide trim: two more reading passes, no peer has it
            key = "warpkit ties/model"
            out = str(outs / "warpkit-ties-model")
            runs[key] = measure([*cmd, *extra, "--trim-scope", "model", "--out", out, "--no-progress"], env)
            print(f"  {key}: {runs[key]['seconds']:.1f} s", flush=True)
        key = f"peft {method}"
        runs[key] = measure(
            [py, __file__, "--_peft", method, str(init), str(a), str(b), str(outs / key.replace(" ", "-"))],
            env,
        )
        print(f"  {key}: {runs[key]['seconds']:.1f} s", flush=True)
        if Path(args.mergekit).exists():
            cfg = outs / f"{method}.yaml"
            cfg.write_text(
                f"merge_method: {method}\nbase_model: {init}\ndtype: float32\n"
                f"models:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                f"  - model: {b}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            )
            key = f"mergekit {method}"
            out = str(outs / key.replace(" ", "-"))
            mk = [args.mergekit, str(cfg), out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
            runs[key] = measure(mk, mk_env)
            print(f"  {key}: {runs[key]['seconds']:.1f} s", flush=True)

    print(f"\n{'run':<22}{'seconds':>10}{'peak RssAnon':>16}")
    for name, r in runs.items():
        print(f"{name:<22}{r['seconds']:>10.1f}{r['rss_anon'] / 2**20:>13.0f} MB")
    print("\nratios (peer time / warpkit time)")
    for method in ("ties", "dare_ties"):
        for peer in ("mergekit", "peft"):
            if f"{peer} {method}" in runs:
                ratio = runs[f"{peer} {method}"]["seconds"] / runs[f"warpkit {method}"]["seconds"]
                print(f"  {peer} {method} / warpkit {method} = {ratio:.2f}x")
    ratio = runs["warpkit ties/model"]["seconds"] / runs["warpkit ties"]["seconds"]
    print(f"  warpkit ties/model (whole-model trim) / warpkit ties (per tensor) = {ratio:.2f}x")
    for peer in ("mergekit", "peft"):
        if f"{peer} ties" in runs:
            diff = max_abs_diff(outs / "warpkit-ties", outs / f"{peer}-ties")
            print(f"  max |warpkit ties - {peer} ties| = {diff:.3e}")
    shutil.rmtree(outs, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--_peft":
        peft_merge(*sys.argv[2:])
    else:
        main()

"""Benchmark: WARP's SLERP merge of two fine-tunes of one init, warpkit vs mergekit's nuslerp vs the I/O floor.

Builds three random llama-style checkpoints locally (init, and two "policies" = init + small noise),
about 0.5B parameters each, sharded safetensors with an index, float32 by default (so about 2 GB per
input). Then, on the same files and machine, in separate processes:

- io-floor:  read every tensor of the three inputs with `safe_open(...).get_tensor` (a lazy mmap view,
             so one byte per 4 KiB page is touched to actually read it) and write the init's tensors
             as one output with `save_file` (+ fsync, as warpkit does): no arithmetic at all.
- warpkit:   `warpkit merge --method slerp --granularity tensor` (what nuslerp computes) and the
             default `--granularity block`.
- mergekit:  `mergekit-yaml` with `merge_method: nuslerp`, `base_model` set, weights 0.5 / 0.5, run
             from its own venv (default /work/venvs/mergekit; create it with
             `python3 -m venv /work/venvs/mergekit && /work/venvs/mergekit/bin/pip install torch mergekit`).

Prints wall time, peak RssAnon (anonymous memory, sampled every 5 ms from /proc) and peak RSS per
run, the ratios against the targets (>= 3x faster than mergekit, <= 1.5x the I/O floor, < 1 GB
RssAnon) and the largest difference between warpkit's and mergekit's tensor-granularity outputs.
The inputs are read once before timing, so every run starts from a warm page cache.

Usage: python bench/merge.py [--workdir /tmp/warpkit-bench-merge] [--layers 24] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_models(root: Path, layers: int, hidden: int, inter: int, vocab: int, dtype: str, shard_bytes: int):
    """init, a, b as sharded save_pretrained-style folders (config.json + shards + index), built per tensor."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    n_params = sum(math.prod(s) for s in shapes.values())
    marker = root / "done.json"
    spec = {"config": config, "shard_bytes": shard_bytes}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return [root / n for n in ("init", "a", "b")], n_params
    shutil.rmtree(root, ignore_errors=True)
    item = torch.empty((), dtype=tdtype).element_size()
    for k, name in enumerate(("init", "a", "b")):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        shards, current, size = [], {}, 0
        for t_name, shape in shapes.items():
            nbytes = item * math.prod(shape)
            if current and size + nbytes > shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[t_name] = shape
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for j, (t_name, shape) in enumerate(shard.items()):
                # the same init in every folder; a and b add independent noise (nearly orthogonal task vectors)
                g = torch.Generator().manual_seed(zlib.crc32(t_name.encode()))
                t = torch.randn(shape, generator=g) * 0.02
                if k:
                    t += (
                        torch.randn(shape, generator=torch.Generator().manual_seed(1000 * k + j + 7 * i))
                        * 1e-3
                    )
                tensors[t_name] = t.to(tdtype)
                weight_map[t_name] = file
            save_file(tensors, folder / file, metadata={"format": "pt"})
            del tensors
        total = item * n_params
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        print(f"  built {folder} ({total / 1e9:.2f} GB, {len(shards)} shards)", flush=True)
    marker.write_text(json.dumps(spec))
    return [root / n for n in ("init", "a", "b")], n_params


def io_floor(init: str, a: str, b: str, out: str) -> None:
    """Read all three inputs tensor by tensor and write the init's tensors as one output: plain safetensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir = Path(out)
    out_dir.mkdir(parents=True)
    index = json.loads((Path(init) / "model.safetensors.index.json").read_text())
    for file in sorted(set(index["weight_map"].values())):
        keep = {}
        for folder in (init, a, b):
            with safe_open(Path(folder) / file, "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = f.get_tensor(name)  # a lazy view of the file: touch every 4 KiB page to read it
                    t.reshape(-1).view(torch.uint8)[::4096].sum()
                    if folder == init:
                        keep[name] = t
        save_file(keep, out_dir / file, metadata={"format": "pt"})
        fd = os.open(out_dir / file, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        del keep


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`, sampling the child's RssAnon / VmRSS every 5 ms. Returns seconds and peaks in bytes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        path = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(path) as status:
                    lines = status.read().splitlines()
                for line in lines:
                    key, _, value = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{output[-3000:]}")
    return {"seconds": seconds, "rss_anon": peak["RssAnon"], "rss": peak["VmRSS"]}


def max_abs_diff(x: Path, y: Path) -> float:
    from safetensors import safe_open

    def locate(folder: Path) -> dict[str, Path]:
        where = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                where |= dict.fromkeys(h.keys(), f)
        return where

    wx, wy = locate(x), locate(y)
    if set(wx) != set(wy):
        raise RuntimeError(f"outputs differ in tensor names: {sorted(set(wx) ^ set(wy))[:5]}")
    worst = 0.0
    for name in wx:
        with safe_open(wx[name], "pt") as fx, safe_open(wy[name], "pt") as fy:
            a, b = fx.get_tensor(name).float(), fy.get_tensor(name).float()
        worst = max(worst, (a - b).abs().max().item())
        del a, b
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/warpkit-bench-merge")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument(
        "--dtype", default="float32", help="input dtype (float32: ~2 GB per input at the defaults)"
    )
    p.add_argument("--shard-mb", type=int, default=500)
    p.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args()

    work = Path(args.workdir)
    print(f"building inputs under {work}", flush=True)
    (init, a, b), n_params = build_models(
        work / "inputs",
        args.layers,
        args.hidden,
        args.intermediate,
        args.vocab,
        args.dtype,
        args.shard_mb * 10**6,
    )
    in_bytes = sum(f.stat().st_size for d in (init, a, b) for f in d.glob("*.safetensors"))
    print(
        f"{n_params / 1e9:.3f}B parameters per model, {args.dtype}, 3 inputs = {in_bytes / 1e9:.2f} GB",
        flush=True,
    )
    for d in (init, a, b):  # warm the page cache the same way for everyone
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass
    outs = work / "outputs"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    py = sys.executable
    warp = [
        py,
        "-m",
        "warpkit.cli",
        "merge",
        "--method",
        "slerp",
        "--init",
        str(init),
        "--models",
        str(a),
        str(b),
    ]
    runs = {}
    runs["io-floor"] = measure(
        [py, __file__, "--_floor", str(init), str(a), str(b), str(outs / "floor")], env
    )
    print(f"  io-floor done in {runs['io-floor']['seconds']:.1f} s", flush=True)
    for gran, extra in (("tensor", []), ("block", []), ("block", ["--no-hash"])):
        key = f"warpkit slerp ({gran}{', no hash' if extra else ''})"
        folder = str(outs / f"{gran}{'-nohash' if extra else ''}")
        runs[key] = measure([*warp, "--granularity", gran, "--out", folder, "--no-progress", *extra], env)
        print(f"  {key} done in {runs[key]['seconds']:.1f} s", flush=True)
    mergekit_note = ""
    if args.skip_mergekit or not Path(args.mergekit).exists():
        mergekit_note = (
            f"mergekit not run ({'--skip-mergekit' if args.skip_mergekit else args.mergekit + ' missing'})"
        )
    else:
        cfg = outs / "nuslerp.yaml"
        cfg.write_text(
            f"merge_method: nuslerp\nbase_model: {init}\ndtype: float32\nout_dtype: {args.dtype}\n"
            f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        )
        mk_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
        cmd = [
            args.mergekit,
            str(cfg),
            str(outs / "mergekit"),
            "--no-copy-tokenizer",
            "--no-write-model-card",
        ]
        runs["mergekit nuslerp"] = measure([*cmd, "--quiet"], mk_env)
        print(f"  mergekit nuslerp done in {runs['mergekit nuslerp']['seconds']:.1f} s", flush=True)

    print(f"\n{'run':<34}{'seconds':>10}{'peak RssAnon':>16}{'peak RSS':>12}")
    for name, r in runs.items():
        print(f"{name:<34}{r['seconds']:>10.1f}{r['rss_anon'] / 2**20:>13.0f} MB{r['rss'] / 2**20:>9.0f} MB")
    floor, wt = runs["io-floor"]["seconds"], runs["warpkit slerp (tensor)"]["seconds"]
    wb = runs["warpkit slerp (block)"]["seconds"]
    print("\nratios")
    print(f"  warpkit (tensor) / io-floor         = {wt / floor:.2f}x   (target <= 1.5x)")
    print(f"  warpkit (block)  / io-floor         = {wb / floor:.2f}x   (target <= 1.5x)")
    wn = runs["warpkit slerp (block, no hash)"]["seconds"]
    print(
        f"  warpkit (block, no sha256) / floor  = {wn / floor:.2f}x   (the recipe's input hashes cost the rest)"
    )
    if "mergekit nuslerp" in runs:
        mk = runs["mergekit nuslerp"]["seconds"]
        print(f"  mergekit nuslerp / warpkit (tensor) = {mk / wt:.2f}x   (target >= 3x)")
        print(f"  mergekit nuslerp / warpkit (block)  = {mk / wb:.2f}x   (target >= 3x)")
        print(
            f"  max |warpkit(tensor) - mergekit nuslerp| = {max_abs_diff(outs / 'tensor', outs / 'mergekit'):.3e}"
        )
    else:
        print(f"  {mergekit_note}")
    anon = max(runs[k]["rss_anon"] for k in runs if k.startswith("warpkit"))
    print(
        f"  warpkit peak RssAnon = {anon / 2**30:.2f} GB with {in_bytes / 1e9:.1f} GB of inputs   (target < 1 GB)"
    )
    if not args.keep_outputs:
        shutil.rmtree(outs, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--_floor":
        io_floor(*sys.argv[2:])
    else:
        main()

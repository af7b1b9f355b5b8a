"""Frontier cost, against named peers measured in the same run.

1. Sampling: warpkit's decoding loop (`warpkit.frontier.sample_completions`: KV cache, Gumbel-max,
   no logits processors) vs `transformers` `model.generate(do_sample=True, top_k=0, top_p=1)`, same
   prompts, batch and number of new tokens (EOS disabled so both produce exactly that many).
2. LITI sweep: warpkit's in-memory interpolation (`warpkit.merge.liti` + `load_state_dict`, init and
   merged loaded once) vs writing each eta's checkpoint with `save_pretrained` and loading it back.

Usage:  python bench/frontier_bench.py [--model default|tiny] [--batch 16] [--new-tokens 32]
Prints seconds and ratios (peer time / warpkit time; > 1 means warpkit is faster).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def _model(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "default":
        from warpkit.workloads.default import prepare_default_model

        path = prepare_default_model()
    else:
        from warpkit.testing import save_tiny_model

        path = save_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama", hidden_size=64, num_layers=4)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


def bench_sampling(model, tokenizer, batch: int, new_tokens: int, repeats: int = 2) -> None:
    from warpkit.frontier import sample_completions

    texts = [f"Review number {i}: the film was" for i in range(batch)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def ours() -> None:
        g = torch.Generator().manual_seed(0)
        sample_completions(
            model,
            prompts,
            max_new_tokens=new_tokens,
            temperature=0.9,
            eos_token_id=None,
            pad_token_id=pad,
            generator=g,
        )

    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)

    def peer() -> None:
        with torch.no_grad():
            model.generate(
                **enc,
                do_sample=True,
                temperature=0.9,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )

    t_ours, t_peer = _time(ours, repeats), _time(peer, repeats)
    print(
        f"sampling  batch {batch} x {new_tokens} tokens: warpkit {t_ours:.2f} s, transformers generate {t_peer:.2f} s"
    )
    print(f"sampling  ratio generate / warpkit = {t_peer / t_ours:.2f}")


def bench_liti(model, etas=(0.0, 0.3, 0.5, 0.8, 1.0)) -> None:
    from transformers import AutoModelForCausalLM

    from warpkit.merge import liti

    merged_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in merged_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = {k: v.detach() for k, v in merged_model.state_dict().items()}
    working = copy.deepcopy(model)

    def ours() -> None:
        for eta in etas:
            working.load_state_dict(liti(init, merged, eta))

    def peer() -> None:
        with tempfile.TemporaryDirectory() as d:
            for i, eta in enumerate(etas):
                working.load_state_dict(liti(init, merged, eta))
                working.save_pretrained(Path(d) / str(i))
                AutoModelForCausalLM.from_pretrained(Path(d) / str(i), dtype=torch.float32)

    t_ours, t_peer = _time(ours, 1), _time(peer, 1)
    print(f"LITI      {len(etas)} etas: in memory {t_ours:.2f} s, save + reload per eta {t_peer:.2f} s")
    print(f"LITI      ratio reload / in-memory = {t_peer / t_ours:.2f}")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = _model(args.model)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}")
    bench_sampling(model, tokenizer, args.batch, args.new_tokens)
    bench_liti(model)


if __name__ == "__main__":
    main()

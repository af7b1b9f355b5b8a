"""Frontier cost, against named peers and a compute floor measured in the same run.

1. Sampling: warpkit's decoding loop (`warpkit.frontier.sample_completions`: KV cache, Gumbel-max,
   no logits processors) vs `transformers` `model.generate(do_sample=True, top_k=0, top_p=1)`, same
   prompts, batch and number of new tokens (EOS disabled so both produce exactly that many).
2. LITI sweep: warpkit's in-memory interpolation (`warpkit.merge.liti` + `load_state_dict`, init and
   merged loaded once) vs writing each eta's checkpoint with `save_pretrained` and loading it back.
3. One policy's evaluation (`evaluate_policy`, the fast path) against its old implementation
   (`evaluate_policy_slow`: every row's prompt prefilled, then prompt + completion teacher-forced through the
   policy and the reference) on the embedded default's held-out chat prompts, ``--prompts`` x ``--samples``
   x ``--new-tokens`` at batch ``--eval-batch``; the policy is the reference with every weight perturbed
   (seeded noise, KL of a few nats). Prints sequences per second of each path and their time over the
   COMPUTE FLOOR, measured in the same run: the time of plain forwards (no cache, no sampling, no
   log-softmax) over the tokens that must be processed at minimum per policy, at the same batch size:
   each distinct prompt once through the policy (last-position logits only, ``--eval-batch`` prompts per
   forward) plus every sampled completion token once through the policy and once through the reference
   (the completions alone, without their prompts, [batch, L] per forward, full logits). The reference's
   prompts are processed once per prompt set, not per policy, so they are outside the floor; their one-off
   cost (`ReferencePrompts`) is printed separately. Also printed: where the time goes (new path: policy
   decoding, reference scoring, KL sums; the reward; loading a model; one LITI interpolation) and bfloat16
   weights (log-softmax in float32): its speed, and its KL error against float32 on the float32 samples.

Usage:  python bench/frontier_bench.py [--model default|tiny] [--batch 16] [--new-tokens 32]
            [--sections sampling liti evaluate] [--prompts 35] [--samples 12] [--eval-new-tokens 16]
            [--eval-batch 64] [--clock wall|cpu] [--threads N]
Prints seconds and ratios (peer time / warpkit time; > 1 means warpkit is faster).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def _model_path(name: str) -> Path:
    if name == "default":
        from warpkit.workloads.default import prepare_default_model

        return prepare_default_model()
    from warpkit.testing import save_tiny_model

    return save_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama", hidden_size=64, num_layers=4)


def _model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


# ----------------------------------------------------------------------------- one policy's evaluation


def _eval_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` held-out review prompts of the embedded default, chat-templated as the frontier does."""
    from warpkit.frontier.inputs import encode_prompt
    from warpkit.workloads.default import review_prompts

    prompts = list(review_prompts("eval")["prompt"])[:n]
    return [encode_prompt(p, tokenizer) for p in prompts]


def _perturbed(model, scale: float = 0.05):
    """A copy of ``model`` with each weight w moved by scale * std(w) * N(0, 1) (seeded): a policy near it."""
    policy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * p.float().std() * torch.randn(p.shape, generator=g).to(p.dtype))
    return policy


def _timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds it took on `CLOCK`)."""
    start = CLOCK()
    out = fn(*args, **kwargs)
    return out, CLOCK() - start


def _fast_stages(policy, prompts, settings: dict, rp) -> dict[str, float]:
    """The fast path's batch loop (as `evaluate_policy` runs it) with each stage timed: seconds per stage."""
    from warpkit.frontier.decode import decode_with_logprobs, kl_sums, trim_at_eos

    rows = [i for i in range(len(prompts)) for _ in range(settings["samples_per_prompt"])]
    t = {"policy decoding (prefill + steps)": 0.0, "reference scoring": 0.0, "KL sums": 0.0}
    step = {k: settings[k] for k in ("max_new_tokens", "temperature", "eos_token_id", "pad_token_id")}
    for b, start in enumerate(range(0, len(rows), settings["batch_size"])):
        chunk = rows[start : start + settings["batch_size"]]
        g = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + b)
        (tokens, logp), dt = _timed(decode_with_logprobs, policy, prompts, chunk, generator=g, **step)
        t["policy decoding (prefill + steps)"] += dt
        logq, dt = _timed(rp.logprobs, chunk, tokens, settings["temperature"])
        t["reference scoring"] += dt
        lengths = [len(c) for c in trim_at_eos(tokens.tolist(), settings["eos_token_id"])]
        t["KL sums"] += _timed(kl_sums, logp, logq, tokens, lengths)[1]
    return t


@torch.no_grad()
def _floor(policy, reference, prompts, completions, batch: int) -> float:
    """Seconds of the compute floor (see the module docstring): distinct prompts once through the policy
    (last logits), every completion token once through the policy and once through the reference."""
    from warpkit.frontier.decode import left_pad

    device = next(policy.parameters()).device
    start = CLOCK()
    for s in range(0, len(prompts), batch):
        ids, mask, pos = left_pad(prompts[s : s + batch], 0, device)
        policy(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
    for s in range(0, len(completions), batch):
        ids, mask, pos = left_pad(completions[s : s + batch], 0, device)  # padding is masked
        policy(input_ids=ids, attention_mask=mask, position_ids=pos)
        reference(input_ids=ids, attention_mask=mask, position_ids=pos)
    return CLOCK() - start


def _compare(fast, slow) -> str:
    same = sum(a == b for a, b in zip(fast.completions, slow.completions, strict=True))
    dkl = max(abs(a - b) for a, b in zip(fast.kl, slow.kl, strict=True))
    dex = max(abs(a - b) for a, b in zip(fast.kl_exact, slow.kl_exact, strict=True))
    return f"{same}/{len(fast.completions)} completions identical, max |kl diff| {dkl:.2e}, max |kl_exact diff| {dex:.2e}"


def _mean(x) -> float:
    return sum(x) / len(x)


def bench_evaluate(path: Path, reference, tokenizer, args) -> None:
    """Section 3 of the module docstring: old path, new path and the floor, then where the time goes."""
    from warpkit.frontier.estimate import ReferencePrompts, evaluate_policy, evaluate_policy_slow

    prompts = _eval_prompts(tokenizer, args.prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(
        samples_per_prompt=args.samples,
        max_new_tokens=args.eval_new_tokens,
        temperature=0.9,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        batch_size=args.eval_batch,
        seed=0,
    )
    policy = _perturbed(reference)
    n = len(prompts) * args.samples
    lengths = sorted(len(p) for p in prompts)
    print(
        f"evaluate  {len(prompts)} prompts (tokens {lengths[0]}-{lengths[-1]}, median {lengths[len(lengths) // 2]})"
        f" x {args.samples} samples x {args.eval_new_tokens} new tokens = {n} sequences, batch {args.eval_batch}"
    )
    warm = dict(settings, samples_per_prompt=2)
    evaluate_policy_slow(policy, reference, prompts[:2], **warm)  # warm-up
    evaluate_policy(policy, reference, prompts[:2], **warm)
    slow, t_slow = _timed(evaluate_policy_slow, policy, reference, prompts, **settings)
    rp, t_rp = _timed(ReferencePrompts, reference, prompts, pad_token_id=pad, batch_size=args.eval_batch)
    fast, t_fast = _timed(evaluate_policy, policy, reference, prompts, reference_prompts=rp, **settings)
    t_floor = _floor(policy, reference, prompts, fast.completions, args.eval_batch)
    print(
        f"evaluate  same results: {_compare(fast, slow)}; mean kl {_mean(fast.kl):.3f}, kl_exact {_mean(fast.kl_exact):.3f}"
    )
    print(f"evaluate  compute floor {t_floor:.2f} s ({n / t_floor:.1f} seq/s)")
    for name, t in (
        ("old path", t_slow),
        ("new path", t_fast),
        ("new path + ReferencePrompts", t_fast + t_rp),
    ):
        print(f"evaluate  {name:28s} {t:7.2f} s  {n / t:6.1f} seq/s  {t / t_floor:5.2f} x floor")
    print(
        f"evaluate  speed-up new / old = {t_slow / t_fast:.2f}; ReferencePrompts once per prompt set {t_rp:.2f} s"
    )
    _breakdown(path, policy, reference, prompts, settings, rp, fast, tokenizer)
    _bf16(policy, reference, prompts, settings, fast, t_fast)


def _breakdown(path, policy, reference, prompts, settings, rp, fast, tokenizer) -> None:
    """Where one point's time goes: the fast path's stages, the reward, loading a model, one LITI point."""
    from transformers import AutoModelForCausalLM

    from warpkit.merge import liti
    from warpkit.workloads.default import vader_reward

    stages = _fast_stages(policy, prompts, settings, rp)
    texts, t_decode = _timed(tokenizer.batch_decode, fast.completions, skip_special_tokens=True)
    stages["reward: detokenize + VADER"] = t_decode + _timed(vader_reward, texts)[1]
    stages["load a model (from_pretrained)"] = _timed(
        AutoModelForCausalLM.from_pretrained, path, dtype=torch.float32
    )[1]
    init = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    merged = {k: v.detach() for k, v in policy.state_dict().items()}
    working = copy.deepcopy(reference)
    stages["one LITI point (liti + load_state_dict)"] = _timed(
        lambda: working.load_state_dict(liti(init, merged, 0.5))
    )[1]
    for name, t in stages.items():
        print(f"breakdown {name:40s} {t:7.2f} s")


def _bf16(policy, reference, prompts, settings, fast, t_fast: float) -> None:
    """bfloat16 weights (log-softmax in float32): the fast path's speed, and its KL error against float32
    on the same samples: the sequences bf16 samples identically (same random numbers; a sample differs
    only where bf16 rounding flips a Gumbel argmax)."""
    from warpkit.frontier.estimate import ReferencePrompts, evaluate_policy

    pol16 = copy.deepcopy(policy).to(torch.bfloat16)
    ref16 = copy.deepcopy(reference).to(torch.bfloat16)
    pad, batch = settings["pad_token_id"], settings["batch_size"]
    rp16, t_rp = _timed(ReferencePrompts, ref16, prompts, pad_token_id=pad, batch_size=batch)
    s16, t16 = _timed(evaluate_policy, pol16, ref16, prompts, reference_prompts=rp16, **settings)
    same = [r for r, (a, b) in enumerate(zip(s16.completions, fast.completions, strict=True)) if a == b]
    n = len(fast.completions)
    print(
        f"bf16      new path {t16:.2f} s ({n / t16:.1f} seq/s) vs float32 {t_fast:.2f} s: bf16 / fp32 time "
        f"= {t16 / t_fast:.2f}; ReferencePrompts {t_rp:.2f} s"
    )
    print(f"bf16      {len(same)}/{n} samples identical to float32's (the same random numbers)")
    for name, a, b in (("kl", fast.kl, s16.kl), ("kl_exact", fast.kl_exact, s16.kl_exact)):
        err = [abs(a[r] - b[r]) for r in same] or [float("nan")]
        print(
            f"bf16      {name:8s} all samples: mean {_mean(b):.4f} vs float32 {_mean(a):.4f}; identical samples: "
            f"|bf16 - fp32| per sequence mean {_mean(err):.2e}, max {max(err):.2e}, "
            f"mean of the signed errors {_mean([b[r] - a[r] for r in same] or [float('nan')]):+.2e}"
        )


SECTIONS = ("sampling", "liti", "evaluate")
# The clock of every timing: wall time, or this process's CPU time (--clock cpu: on a machine shared with
# other jobs, where wall time measures the scheduler; use it with --threads 1, so no thread spins idle).
CLOCK = time.perf_counter


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--prompts", type=int, default=35)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--eval-new-tokens", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = _model_path(args.model)
    model, tokenizer = _model(path)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, clock {args.clock} (seconds)")
    if "sampling" in args.sections:
        bench_sampling(model, tokenizer, args.batch, args.new_tokens)
    if "liti" in args.sections:
        bench_liti(model)
    if "evaluate" in args.sections:
        bench_evaluate(path, model, tokenizer, args)


if __name__ == "__main__":
    main()

"""`warpkit frontier`: evaluate every policy of a config, then write frontier.json, frontier.csv, frontier.png.

Order of work: every input is checked before the first sample is drawn (folders, safetensors, vocabulary
and tokenizer against the reference, prompt lengths against every context), so a bad config fails in
seconds. Then each point is sampled and scored (`warpkit.frontier`), its reward computed and checked,
and the fronts, hypervolumes and matched-KL comparisons derived (`warpkit.pareto`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from warpkit.frontier import distinct_n, evaluate_policy, mean_stderr
from warpkit.frontier_config import FrontierConfig, PolicySpec, expand_trajectory
from warpkit.frontier_inputs import (
    check_compatible,
    check_folder,
    check_rewards,
    context_length,
    encode_prompt,
    load_model,
    load_prompts,
    load_reward,
    resolve_device,
)
from warpkit.pareto import hypervolume, pareto_front, reward_at_matched_kl

__all__ = ["FrontierResult", "run_frontier", "write_frontier"]

COLUMNS = [
    "name", "method", "kind", "spec", "step", "eta", "reward_mean", "reward_stderr", "kl_mean", "kl_stderr",
    "kl_exact_mean", "kl_exact_stderr", "length_mean", "diversity", "distinct_1", "distinct_2",
    "num_samples", "num_reward_skipped", "params",
]  # fmt: skip


@dataclass
class FrontierResult:
    """Rows of frontier.json (``points``) and what is derived from them. KL in nats per completion."""

    points: list[dict[str, Any]]
    fronts: dict[str, list[str]]
    hypervolume: dict[str, Any]
    matched_kl: list[dict[str, Any]]
    skipped: dict[str, Any]
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced scalars for a Trainer / tracker log: ``frontier/<point>/<field>`` and
        ``frontier/hypervolume/<method>``, e.g. to log the front after every WARP iteration."""
        keys = ("reward_mean", "reward_stderr", "kl_mean", "kl_stderr", "kl_exact_mean", "kl_exact_stderr")
        out = {
            f"frontier/{p['name']}/{k}": float(p[k])
            for p in self.points
            for k in (*keys, "length_mean", "diversity")
        }
        out |= {f"frontier/hypervolume/{m}": float(v) for m, v in self.hypervolume["by_method"].items()}
        return out


# ----------------------------------------------------------------------------- points


@dataclass
class _Job:
    name: str
    method: str
    kind: str
    spec: str
    step: int | None = None
    eta: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _jobs(spec: PolicySpec) -> list[tuple[_Job, str | None]]:
    """(point, folder) pairs of one policy entry; LITI points have no folder (built in memory)."""
    base = {"method": spec.method, "spec": spec.name, "params": spec.params}
    if spec.path is not None:
        return [(_Job(spec.name, kind="path", **base), spec.path)]
    if spec.trajectory is not None:
        return [
            (_Job(f"{spec.name}/step={step}", kind="trajectory", step=step, **base), path)
            for step, path in expand_trajectory(spec.trajectory)
        ]
    assert spec.liti is not None
    return [(_Job(f"{spec.name}/eta={eta:g}", kind="liti", eta=eta, **base), None) for eta in spec.liti.etas]


def _models(
    config: FrontierConfig, reference: torch.nn.Module, device: torch.device
) -> Iterator[tuple[_Job, Any]]:
    """Yield (point, model) in config order; a LITI sweep loads init and merged once and reuses them."""
    from warpkit.merge import liti

    if config.include_reference:
        yield _Job("sft", "sft", "reference", "sft"), reference
    for spec in config.policies:
        if spec.liti is None:
            for job, path in _jobs(spec):
                model = load_model(path, config, device)
                yield job, model
                del model
            continue
        working = load_model(spec.liti.init, config, device)
        init = {k: v.detach().clone() for k, v in working.state_dict().items()}
        merged_model = load_model(spec.liti.merged, config, device)
        merged = {k: v.detach() for k, v in merged_model.state_dict().items()}
        del merged_model
        for job, _ in _jobs(spec):
            point = liti(init, merged, job.eta, allow_extrapolation=spec.liti.allow_extrapolation)
            working.load_state_dict(point, strict=True)
            yield job, working
        del working, init, merged


def _folders(config: FrontierConfig) -> list[tuple[str, str]]:
    out = []
    for spec in config.policies:
        if spec.liti is not None:
            out += [
                (spec.liti.init, f"policy {spec.name!r} (liti.init)"),
                (spec.liti.merged, f"policy {spec.name!r} (liti.merged)"),
            ]
        else:
            out += [(path, f"policy {spec.name!r}") for _, path in _jobs(spec)]
    return out


# ----------------------------------------------------------------------------- run


def _resolve_default(config: FrontierConfig) -> None:
    """Replace the folder name ``default`` (reference, liti.init, path) by the embedded default model."""
    folders = [config.reference] + [p.path or "" for p in config.policies]
    folders += [p.liti.init for p in config.policies if p.liti is not None]
    if "default" not in folders:
        return
    from warpkit.default import prepare_default_model

    path = str(prepare_default_model())
    config.reference = path if config.reference == "default" else config.reference
    for p in config.policies:
        p.path = path if p.path == "default" else p.path
        if p.liti is not None and p.liti.init == "default":
            p.liti.init = path


def run_frontier(config: FrontierConfig, *, progress: bool = True) -> FrontierResult:
    """Evaluate every point of ``config``; nothing is written (see `write_frontier`)."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    if config.dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, float64, bfloat16 or float16, got {config.dtype!r}.")
    device = resolve_device(config.device)
    _resolve_default(config)
    reference_dir = config.reference
    check_folder(reference_dir, "reference", config.allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(reference_dir, trust_remote_code=False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    if pad is None:
        raise ValueError(f"the reference tokenizer at {reference_dir!r} has neither a pad nor an EOS token.")

    # Every check before the first sample.
    folders = _folders(config)
    for path, what in folders:
        check_folder(path, what, config.allow_pickle)
        check_compatible(reference_dir, tokenizer, path, what)
    contexts = [
        c
        for c in (
            context_length(AutoConfig.from_pretrained(p)) for p in [reference_dir] + [f for f, _ in folders]
        )
        if c
    ]
    context = min(contexts) if contexts else None
    prompts = load_prompts(config)
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    too_long = [
        (i, len(e)) for i, e in enumerate(encoded) if context and len(e) + config.max_new_tokens > context
    ]
    if too_long and config.on_long_prompt == "error":
        raise ValueError(
            f"{len(too_long)} prompt(s) do not fit the context of {context} tokens with max_new_tokens="
            f"{config.max_new_tokens} (prompt index, length): {too_long[:5]}. Shorten them, lower max_new_tokens, "
            "or set on_long_prompt: skip to leave them out (they are reported)."
        )
    if too_long:
        print(
            f"warpkit frontier: skipping {len(too_long)} prompt(s) longer than the context: {too_long[:5]}",
            file=sys.stderr,
        )
    long_ids = {i for i, _ in too_long}
    kept = [i for i in range(len(prompts)) if i not in long_ids]
    if not kept:
        raise ValueError(
            f"every prompt is longer than the context ({context} tokens) allows; nothing to evaluate."
        )
    prompts, encoded = [prompts[i] for i in kept], [encoded[i] for i in kept]
    reward_fn = load_reward(config.reward, device, config.batch_size)
    reference = load_model(reference_dir, config, device)

    num_points = int(config.include_reference) + sum(len(_jobs(s)) for s in config.policies)
    rows, samples = [], []
    bar = tqdm(
        total=num_points * len(encoded) * config.samples_per_prompt,
        desc="frontier",
        unit="seq",
        disable=not progress,
    )
    for job, model in _models(config, reference, device):
        bar.set_postfix_str(job.name)
        s = evaluate_policy(
            model,
            reference,
            encoded,
            samples_per_prompt=config.samples_per_prompt,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            eos_token_id=eos,
            pad_token_id=pad,
            batch_size=config.batch_size,
            seed=config.seed,
            progress=bar.update,
        )
        texts = tokenizer.batch_decode(s.completions, skip_special_tokens=True)
        row_prompts = [prompts[i] for i in s.prompt_index]
        conversational = isinstance(row_prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        raw = reward_fn(prompts=row_prompts, completions=completions, completion_ids=s.completions)
        s.rewards = check_rewards(raw, len(texts), job.name, config.on_nan_reward, texts)
        rows.append(_row(job, s, eos))
        for r in range(min(2, len(texts))):
            samples.append(
                {
                    "point": job.name,
                    "prompt": row_prompts[r],
                    "completion": texts[r],
                    "reward": s.rewards[r],
                    "kl": s.kl[r],
                }
            )
    bar.close()
    return _summarise(config, rows, samples, reference_dir, device, context, too_long, len(kept))


def _row(job: _Job, s: Any, eos: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": job.name,
        "method": job.method,
        "kind": job.kind,
        "spec": job.spec,
        "step": job.step,
        "eta": job.eta,
    }
    for key, values in (("reward", s.rewards), ("kl", s.kl), ("kl_exact", s.kl_exact)):
        row[f"{key}_mean"], row[f"{key}_stderr"] = mean_stderr(values, s.prompt_index)
    row["length_mean"] = sum(s.length) / len(s.length)
    row["distinct_1"] = distinct_n(s.completions, 1, eos)
    row["distinct_2"] = distinct_n(s.completions, 2, eos)
    row["diversity"] = row["distinct_2"]
    row["num_samples"] = len(s.length)
    row["num_reward_skipped"] = sum(math.isnan(r) for r in s.rewards)
    row["params"] = job.params
    return row


def _summarise(
    config, rows, samples, reference_dir, device, context, too_long, num_prompts
) -> FrontierResult:
    kl_key = f"{config.front_kl}_mean"
    ok = [r for r in rows if math.isfinite(r[kl_key]) and math.isfinite(r["reward_mean"])]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "sft"]
    sft = [r for r in ok if r["method"] == "sft"]

    def members(m: str) -> list[dict[str, Any]]:
        # The SFT point belongs to every method: each can stay at KL = 0 (eta = 0, no training step).
        return [r for r in ok if r["method"] == m] + sft

    fronts = {}
    for m in methods:
        pts = members(m)
        fronts[m] = [
            pts[i]["name"] for i in pareto_front([p[kl_key] for p in pts], [p["reward_mean"] for p in pts])
        ]
    if config.hypervolume_reference is not None:
        ref_kl, ref_reward = config.hypervolume_reference
        how = "from the config"
    else:
        ref_kl = 1.1 * max([r[kl_key] for r in ok] + [0.0]) or 1.0
        ref_reward = sft[0]["reward_mean"] if sft else min((r["reward_mean"] for r in ok), default=0.0)
        how = "default: KL = 1.1 x the largest KL of all points, reward = " + (
            "the SFT reference's reward" if sft else "the lowest reward"
        )
    hv = {
        "reference_point": {"kl": ref_kl, "reward": ref_reward, "how": how, "kl_estimator": config.front_kl},
        "by_method": {
            m: hypervolume(
                [r[kl_key] for r in members(m)], [r["reward_mean"] for r in members(m)], ref_kl, ref_reward
            )
            for m in methods
        },
    }
    pairs = (
        config.compare
        if config.compare is not None
        else [[a, b] for i, a in enumerate(methods) for b in methods[i + 1 :]]
    )
    matched = []
    for a, b in pairs:
        pa = [(r[kl_key], r["reward_mean"]) for r in members(a)]
        pb = [(r[kl_key], r["reward_mean"]) for r in members(b)]
        if pa and pb:
            matched.append(asdict(reward_at_matched_kl(a, pa, b, pb)))
    settings = asdict(config) | {
        "reference_resolved": reference_dir,
        "device": str(device),
        "context": context,
        "num_prompts_used": num_prompts,
    }
    skipped = {
        "prompts_too_long": [{"index": i, "length": n} for i, n in too_long],
        "rewards": {r["name"]: r["num_reward_skipped"] for r in rows if r["num_reward_skipped"]},
    }
    return FrontierResult(rows, fronts, hv, matched, skipped, settings, samples)


# ----------------------------------------------------------------------------- output


def write_frontier(result: FrontierResult, output_dir: str | Path, *, plot: bool = True) -> Path:
    """Write frontier.json, frontier.csv, samples.jsonl (and frontier.png) into ``output_dir``.

    Each file is written in a temporary folder first and moved into place, so an interrupted run never
    leaves a truncated file that looks complete.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".frontier-tmp-", dir=out))
    try:
        doc = {
            "points": result.points,
            "fronts": result.fronts,
            "hypervolume": result.hypervolume,
            "matched_kl": result.matched_kl,
            "skipped": result.skipped,
            "settings": result.settings,
        }
        (tmp / "frontier.json").write_text(json.dumps(doc, indent=2, default=str, allow_nan=True))
        with open(tmp / "frontier.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in result.points:
                writer.writerow({k: json.dumps(row[k]) if k == "params" else row[k] for k in COLUMNS})
        with open(tmp / "samples.jsonl", "w") as f:
            for sample in result.samples:
                f.write(json.dumps(sample) + "\n")
        if plot:
            _plot(result, tmp / "frontier.png")
        for p in tmp.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plot(result: FrontierResult, path: Path) -> None:
    from warpkit.plot import plot_frontier

    s = result.settings
    estimator = "per-position exact KL" if s["front_kl"] == "kl_exact" else "Monte Carlo log-ratio"
    reward = Path(s["reward"]).name if os.path.isdir(s["reward"]) else s["reward"].rpartition(":")[2]
    hv = result.hypervolume
    plot_frontier(
        result.points,
        path,
        kl_key=f"{s['front_kl']}_mean",
        fronts=result.fronts,
        hypervolume=hv["by_method"],
        hypervolume_reference=(hv["reference_point"]["kl"], hv["reference_point"]["reward"]),
        method_labels=s["method_labels"],
        title=s["title"] or "Reward-KL frontier",
        subtitle=(
            f"{s['num_prompts_used']} held-out prompts x {s['samples_per_prompt']} samples, temperature {s['temperature']:g}, "
            f"<= {s['max_new_tokens']} new tokens; error bars: 1 s.e."
        ),
        xlabel=f"KL(policy || SFT) per completion, nats ({estimator}, T = {s['temperature']:g})",
        ylabel=f"reward: {reward} (mean ± s.e.)",
        xscale=s["plot_xscale"],
    )

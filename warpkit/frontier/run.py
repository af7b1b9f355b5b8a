"""`warpkit frontier`: evaluate every policy of a config, then write frontier.json, frontier.csv, frontier.png
(and rewards.png, the reward-reward plot, when the config has extra rewards).

Order of work: every input is checked before the first sample is drawn (folders, safetensors, vocabulary
and tokenizer against the reference, prompt lengths against every context), so a bad config fails in
seconds. Then each point is sampled and scored (`warpkit.frontier`), its reward computed and checked,
and the fronts, hypervolumes and matched-KL comparisons derived (`warpkit.frontier.pareto`). Extra rewards score
the same samples as the main reward; with them each method also gets a front across two rewards
(rewarded soups, Ramé et al. 2023: every soup evaluated on every reward).
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

from warpkit.frontier.estimate import distinct_n, evaluate_policy, mean_stderr
from warpkit.frontier.config import FrontierConfig, PolicySpec, SoupSweep, expand_trajectory
from warpkit.frontier.inputs import (
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
from warpkit.frontier.pareto import hypervolume, pareto_front, pareto_front_max, reward_at_matched_kl

__all__ = ["FrontierResult", "print_frontier", "run_frontier", "write_frontier"]

COLUMNS = [
    "name", "method", "kind", "spec", "step", "eta", "reward_mean", "reward_stderr", "kl_mean", "kl_stderr",
    "kl_exact_mean", "kl_exact_stderr", "length_mean", "diversity", "distinct_1", "distinct_2",
    "num_samples", "num_reward_skipped", "params", "weights",
]  # fmt: skip
# Then reward_<name>_mean, reward_<name>_stderr for each extra reward, in config order.


@dataclass
class FrontierResult:
    """Rows of frontier.json (``points``) and what is derived from them. KL in nats per completion.

    ``reward_fronts`` maps each method to the names of its points on the front of the two rewards named by
    ``reward_front_axes`` (both maximised, in increasing order of the first); both are empty without
    extra rewards.
    """

    points: list[dict[str, Any]]
    fronts: dict[str, list[str]]
    hypervolume: dict[str, Any]
    matched_kl: list[dict[str, Any]]
    skipped: dict[str, Any]
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    reward_fronts: dict[str, list[str]] = field(default_factory=dict)
    reward_front_axes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat, namespaced scalars for a Trainer / tracker log: ``frontier/<point>/<field>`` and
        ``frontier/hypervolume/<method>``, e.g. to log the front after every WARP iteration; with extra
        rewards also ``frontier/<point>/reward_<name>_mean`` and ``_stderr``."""
        keys = ("reward_mean", "reward_stderr", "kl_mean", "kl_stderr", "kl_exact_mean", "kl_exact_stderr")
        out = {
            f"frontier/{p['name']}/{k}": float(p[k])
            for p in self.points
            for k in (*keys, "length_mean", "diversity")
        }
        out |= {
            f"frontier/{p['name']}/reward_{name}_{k}": float(r[k])
            for p in self.points
            for name, r in p.get("rewards", {}).items()
            for k in ("mean", "stderr")
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
    weights: list[float] | None = None


def _jobs(spec: PolicySpec) -> list[tuple[_Job, str | None]]:
    """(point, folder) pairs of one policy entry; LITI and soup points have no folder (built in memory)."""
    base = {"method": spec.method, "spec": spec.name, "params": spec.params}
    if spec.path is not None:
        return [(_Job(spec.name, kind="path", **base), spec.path)]
    if spec.trajectory is not None:
        return [
            (_Job(f"{spec.name}/step={step}", kind="trajectory", step=step, **base), path)
            for step, path in expand_trajectory(spec.trajectory)
        ]
    if spec.soup is not None:
        return [
            (_Job(f"{spec.name}/w={','.join(f'{x:g}' for x in w)}", kind="soup", weights=w, **base), None)
            for w in spec.soup.vectors()
        ]
    assert spec.liti is not None
    return [(_Job(f"{spec.name}/eta={eta:g}", kind="liti", eta=eta, **base), None) for eta in spec.liti.etas]


def _models(
    config: FrontierConfig, reference: torch.nn.Module, device: torch.device
) -> Iterator[tuple[_Job, Any]]:
    """Yield (point, model) in config order; a LITI or soup sweep loads its models once and reuses them."""
    from warpkit.merge import liti, weighted_average

    if config.include_reference:
        yield _Job("sft", "sft", "reference", "sft"), reference
    for spec in config.policies:
        if spec.soup is not None:
            # One working model whose weights are overwritten per point; the M state dicts stay in memory.
            working = load_model(spec.soup.models[0], config, device)
            states = [{k: v.detach().clone() for k, v in working.state_dict().items()}]
            for path in spec.soup.models[1:]:
                other = load_model(path, config, device)
                states.append({k: v.detach() for k, v in other.state_dict().items()})
                del other
            for job, _ in _jobs(spec):
                assert job.weights is not None
                try:  # safetensors folders were checked up front; pickled ones (allow_pickle) only here
                    point = weighted_average(states, job.weights)
                except ValueError as e:
                    raise ValueError(f"policy {spec.name!r}: the soup models cannot be averaged: {e}") from e
                working.load_state_dict(point, strict=True)
                yield job, working
            del working, states
            continue
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
        if spec.soup is not None:
            out += [(m, f"policy {spec.name!r} (soup.models[{i}])") for i, m in enumerate(spec.soup.models)]
        elif spec.liti is not None:
            out += [
                (spec.liti.init, f"policy {spec.name!r} (liti.init)"),
                (spec.liti.merged, f"policy {spec.name!r} (liti.merged)"),
            ]
        else:
            out += [(path, f"policy {spec.name!r}") for _, path in _jobs(spec)]
    return out


def _check_soup_tensors(name: str, soup: SoupSweep) -> None:
    """Refuse soup models whose tensors differ in names or shapes, from the safetensors headers alone.

    Folders with pickled weights only (allow_pickle) are checked later, when their state dicts load.
    """
    from warpkit.merge.checkpoint import Checkpoint

    if not all(any(Path(m).glob("*.safetensors")) for m in soup.models):
        return
    first = {n: t.shape for n, t in Checkpoint(soup.models[0]).tensors.items()}
    for i, path in enumerate(soup.models[1:], start=1):
        other = {n: t.shape for n, t in Checkpoint(path).tensors.items()}
        diff = sorted(set(first) ^ set(other))[:3]
        diff += [f"{n}: {first[n]} vs {other[n]}" for n in first if n in other and first[n] != other[n]][:3]
        if diff:
            raise ValueError(
                f"policy {name!r}: soup.models[{i}] {path!r} does not match soup.models[0] "
                f"{soup.models[0]!r} tensor for tensor (first differences: {diff}). A rewarded soup averages "
                "the weights of policies fine-tuned from one init, so they need the same architecture and "
                "shapes: list only policies fine-tuned from the same base model."
            )


# ----------------------------------------------------------------------------- run


def _resolve_default(config: FrontierConfig) -> None:
    """Replace the folder name ``default`` (reference, liti.init, path, soup.models) by the embedded model."""
    folders = [config.reference] + [p.path or "" for p in config.policies]
    folders += [p.liti.init for p in config.policies if p.liti is not None]
    folders += [m for p in config.policies if p.soup is not None for m in p.soup.models]
    if "default" not in folders:
        return
    from warpkit.workloads.default import prepare_default_model

    path = str(prepare_default_model())
    config.reference = path if config.reference == "default" else config.reference
    for p in config.policies:
        p.path = path if p.path == "default" else p.path
        if p.liti is not None and p.liti.init == "default":
            p.liti.init = path
        if p.soup is not None:
            p.soup.models = [path if m == "default" else m for m in p.soup.models]


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
    for spec in config.policies:
        if spec.soup is not None:
            _check_soup_tensors(spec.name, spec.soup)
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
    # The main reward under the key None, then the extra rewards by name.
    reward_fns = {
        name: load_reward(spec, device, config.batch_size)
        for name, spec in [(None, config.reward), *config.extra_rewards.items()]
    }
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
        extra: dict[str | None, list[float]] = {}
        for name, fn in reward_fns.items():  # the same samples: every point is scored on every reward
            raw = fn(prompts=row_prompts, completions=completions, completion_ids=s.completions)
            what = "the reward" if name is None else f"extra reward {name!r}"
            extra[name] = check_rewards(raw, len(texts), job.name, config.on_nan_reward, texts, what=what)
        s.rewards = extra.pop(None)
        rows.append(_row(job, s, eos, extra))
        for r in range(min(2, len(texts))):
            samples.append(
                {
                    "point": job.name,
                    "prompt": row_prompts[r],
                    "completion": texts[r],
                    "reward": s.rewards[r],
                    "kl": s.kl[r],
                }
                | ({"rewards": {n: v[r] for n, v in extra.items()}} if extra else {})
            )
    bar.close()
    return _summarise(config, rows, samples, reference_dir, device, context, too_long, len(kept))


def _row(job: _Job, s: Any, eos: int | None, extra: dict[str, list[float]]) -> dict[str, Any]:
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
    row["weights"] = job.weights
    row["rewards"] = {}
    for name, values in extra.items():
        mean, stderr = mean_stderr(values, s.prompt_index)
        skipped = sum(math.isnan(v) for v in values)
        row["rewards"][name] = {"mean": mean, "stderr": stderr, "num_skipped": skipped}
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
    extra_skipped = {
        name: {
            r["name"]: r["rewards"][name]["num_skipped"] for r in rows if r["rewards"][name]["num_skipped"]
        }
        for name in config.extra_rewards
    }
    if any(extra_skipped.values()):
        skipped["extra_rewards"] = extra_skipped
    axes = config.front_reward_axes()
    reward_fronts = {}
    if axes:
        for m in methods:
            pts = [r for r in members(m) if all(math.isfinite(_reward_value(r, a)[0]) for a in axes)]
            x, y = ([_reward_value(r, a)[0] for r in pts] for a in axes)
            reward_fronts[m] = [pts[i]["name"] for i in pareto_front_max(x, y)]
    return FrontierResult(rows, fronts, hv, matched, skipped, settings, samples, reward_fronts, axes)


def _reward_value(row: dict[str, Any], axis: str) -> tuple[float, float]:
    """(mean, stderr) of reward ``axis`` in a row: ``reward`` is the main reward, else an extra reward."""
    if axis == "reward":
        return row["reward_mean"], row["reward_stderr"]
    return row["rewards"][axis]["mean"], row["rewards"][axis]["stderr"]


# ----------------------------------------------------------------------------- output


def write_frontier(result: FrontierResult, output_dir: str | Path, *, plot: bool = True) -> Path:
    """Write frontier.json, frontier.csv, samples.jsonl (and frontier.png, plus rewards.png with extra
    rewards) into ``output_dir``.

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
        if result.reward_front_axes:
            doc |= {"reward_fronts": result.reward_fronts, "reward_front_axes": result.reward_front_axes}
        (tmp / "frontier.json").write_text(json.dumps(doc, indent=2, default=str, allow_nan=True))
        extra = list(result.settings.get("extra_rewards", {}))
        extra_columns = [f"reward_{n}_{k}" for n in extra for k in ("mean", "stderr")]
        with open(tmp / "frontier.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS + extra_columns)
            writer.writeheader()
            for row in result.points:
                line = {k: row.get(k) for k in COLUMNS}
                line["params"] = json.dumps(row["params"])
                line["weights"] = "" if row.get("weights") is None else json.dumps(row["weights"])
                for n in extra:
                    line[f"reward_{n}_mean"] = row["rewards"][n]["mean"]
                    line[f"reward_{n}_stderr"] = row["rewards"][n]["stderr"]
                writer.writerow(line)
        with open(tmp / "samples.jsonl", "w") as f:
            for sample in result.samples:
                f.write(json.dumps(sample) + "\n")
        if plot:
            _plot(result, tmp / "frontier.png")
            if result.reward_front_axes:
                _plot_rewards(result, tmp / "rewards.png")
        for p in tmp.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _reward_label(spec: str) -> str:
    """``module:function`` -> ``function``; a reward model folder -> its folder name."""
    return Path(spec).name if os.path.isdir(spec) else spec.rpartition(":")[2]


def _plot(result: FrontierResult, path: Path) -> None:
    from warpkit.frontier.plot import plot_frontier

    s = result.settings
    estimator = "per-position exact KL" if s["front_kl"] == "kl_exact" else "Monte Carlo log-ratio"
    reward = _reward_label(s["reward"])
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


def _plot_rewards(result: FrontierResult, path: Path) -> None:
    from warpkit.frontier.plot import plot_rewards

    s = result.settings
    x_axis, y_axis = result.reward_front_axes

    def label(axis: str) -> str:
        spec = s["reward"] if axis == "reward" else s["extra_rewards"][axis]
        name = "main reward" if axis == "reward" else f"reward {axis!r}"
        return f"{name}: {_reward_label(spec)} (mean ± s.e.)"

    points = [
        p | {"x": _reward_value(p, x_axis), "y": _reward_value(p, y_axis)}
        for p in result.points
        if all(math.isfinite(_reward_value(p, a)[0]) for a in (x_axis, y_axis))
    ]
    plot_rewards(
        points,
        path,
        fronts=result.reward_fronts,
        method_labels=s["method_labels"],
        title=s["title"] or "Reward against reward",
        subtitle=(
            f"{s['num_prompts_used']} held-out prompts x {s['samples_per_prompt']} samples, temperature "
            f"{s['temperature']:g}; both rewards on the same samples; error bars: 1 s.e."
        ),
        xlabel=label(x_axis),
        ylabel=label(y_axis),
    )


def print_frontier(result: FrontierResult) -> None:
    """The table `warpkit frontier` prints: every point, each method's front, reward fronts, matched KL."""
    key = f"{result.settings['front_kl']}_mean"
    print(f"{'point':<28} {'method':<14} {'reward':>16} {'KL (MC)':>16} {'KL (exact/pos)':>16} {'len':>6}")
    for r in result.points:
        print(
            f"{r['name']:<28} {r['method']:<14} {r['reward_mean']:>8.3f} ± {r['reward_stderr']:<5.3f} "
            f"{r['kl_mean']:>8.3f} ± {r['kl_stderr']:<5.3f} {r['kl_exact_mean']:>8.3f} ± {r['kl_exact_stderr']:<5.3f} "
            f"{r['length_mean']:>6.1f}"
        )
    for method, names in result.fronts.items():
        hv = result.hypervolume["by_method"][method]
        print(f"front {method}: {' -> '.join(names)}  (hypervolume {hv:.4g}, KL axis: {key})")
    if result.reward_fronts:
        x, y = result.reward_front_axes
        for method, names in result.reward_fronts.items():
            print(f"reward front {method} ({x} vs {y}, both maximised): {' -> '.join(names)}")
    for m in result.matched_kl:
        if m["kl"]:
            print(
                f"reward at matched KL, {m['method_a']} - {m['method_b']}: mean gap {m['mean_gap']:+.4f} "
                f"over KL [{m['kl'][0]:.3g}, {m['kl'][-1]:.3g}]"
            )
        else:
            print(
                f"reward at matched KL, {m['method_a']} - {m['method_b']}: their fronts do not overlap in KL"
            )

"""`warpkit frontier`: evaluate every point of a config (`run_frontier`); `output.write_frontier` writes it.

Order of work: every input is checked before the first model is loaded and the first sample is drawn
(`inputs.prepare_inputs`: folders, complete safetensors weights, vocabulary and tokenizer against the
reference, the tensor shapes of LITI sweeps and soups, prompt lengths against every context), so a bad
config fails in seconds. Then each point's model is loaded or interpolated
(`point_models`), sampled and scored (`estimate.evaluate_policy`, with the reference's prompt cache
`ReferencePrompts` computed once for all points), its rewards computed and checked
(`rewards.score_rewards`), and the fronts, hypervolumes and matched-KL comparisons derived
(`summary.summarise`). Extra rewards score the same samples as the main reward; with them each method also
gets a front across two rewards (rewarded soups, Ramé et al. 2023: every soup evaluated on every reward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from warpkit.frontier.config import FrontierConfig
from warpkit.frontier.estimate import ReferencePrompts, evaluate_policy
from warpkit.frontier.inputs import FrontierInputs, load_model, prepare_inputs
from warpkit.frontier.policies import Point, PolicySpec, reference_point
from warpkit.frontier.rewards import RewardFn, load_rewards, score_rewards
from warpkit.frontier.summary import FrontierResult, Row, point_row, summarise
from warpkit.merge.math import liti, weighted_average

__all__ = ["evaluate_point", "point_models", "run_frontier"]

SAMPLES_KEPT = 2  # samples per point written to samples.jsonl


def run_frontier(config: FrontierConfig, *, progress: bool = True) -> FrontierResult:
    """Evaluate every point of ``config``; nothing is written (see `write_frontier`).

    Model names in ``config`` (``default``...) are replaced by their folders, in place.
    """
    inputs = prepare_inputs(config)
    reward_fns = load_rewards(config.reward, config.extra_rewards, inputs.device, config.batch_size)
    reference = load_model(inputs.reference_dir, config, inputs.device)

    num_points = int(config.include_reference) + sum(len(s.points()) for s in config.policies)
    total = num_points * len(inputs.encoded) * config.samples_per_prompt
    # The reference's prompt cache, computed once for every policy (the reference point needs none).
    reference_prompts = (
        ReferencePrompts(
            reference, inputs.encoded, pad_token_id=inputs.pad_token_id, batch_size=config.batch_size
        )
        if num_points > int(config.include_reference)
        else None
    )
    rows, samples = [], []
    with tqdm(total=total, desc="frontier", unit="seq", disable=not progress) as bar:
        for point, model in point_models(config, reference, inputs.device):
            bar.set_postfix_str(point.name)
            row, kept = evaluate_point(
                point,
                model,
                reference,
                config=config,
                inputs=inputs,
                reward_fns=reward_fns,
                progress=bar.update,
                reference_prompts=reference_prompts,
            )
            rows.append(row)
            samples += kept
    return summarise(
        config,
        rows,
        samples,
        reference_dir=inputs.reference_dir,
        device=str(inputs.device),
        context=inputs.context,
        prompts_too_long=inputs.prompts_too_long,
        num_prompts=len(inputs.encoded),
    )


def evaluate_point(
    point: Point,
    model: torch.nn.Module,
    reference: torch.nn.Module,
    *,
    config: FrontierConfig,
    inputs: FrontierInputs,
    reward_fns: dict[str | None, RewardFn],
    progress: Callable[[int], None] | None = None,
    reference_prompts: ReferencePrompts | None = None,
) -> tuple[Row, list[dict[str, Any]]]:
    """Sample and score one point on every reward: (its row, its first `SAMPLES_KEPT` samples).

    ``reference_prompts``: the reference's prompt cache shared by every point (built here when None)."""
    s = evaluate_policy(
        model,
        reference,
        inputs.encoded,
        samples_per_prompt=config.samples_per_prompt,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        eos_token_id=inputs.eos_token_id,
        pad_token_id=inputs.pad_token_id,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=progress,
        reference_prompts=reference_prompts,
    )
    texts = inputs.tokenizer.batch_decode(s.completions, skip_special_tokens=True)
    row_prompts = [inputs.prompts[i] for i in s.prompt_index]
    extra = score_rewards(  # the same samples: every point is scored on every reward
        reward_fns,
        prompts=row_prompts,
        texts=texts,
        completion_ids=s.completions,
        point=point.name,
        on_nan=config.on_nan_reward,
    )
    s.rewards = extra.pop(None)
    kept = [
        {
            "point": point.name,
            "prompt": row_prompts[r],
            "completion": texts[r],
            "reward": s.rewards[r],
            "kl": s.kl[r],
        }
        | ({"rewards": {n: v[r] for n, v in extra.items()}} if extra else {})
        for r in range(min(SAMPLES_KEPT, len(texts)))
    ]
    return point_row(point, s, inputs.eos_token_id, extra), kept


# ----------------------------------------------------------------------------- the model of each point


def point_models(
    config: FrontierConfig, reference: torch.nn.Module, device: torch.device
) -> Iterator[tuple[Point, torch.nn.Module]]:
    """Yield (point, model) in config order; a LITI or soup sweep loads its models once and reuses them.

    Sweep points share one working model whose weights are overwritten per point: use each model before
    asking for the next.
    """
    if config.include_reference:
        yield reference_point(), reference
    for spec in config.policies:
        if spec.soup is not None:
            yield from _soup_models(spec, config, device)
        elif spec.liti is not None:
            yield from _liti_models(spec, config, device)
        else:
            for point, path in spec.points():
                assert path is not None, "path and trajectory points have a folder"
                model = load_model(path, config, device)
                yield point, model
                del model


def _soup_models(
    spec: PolicySpec, config: FrontierConfig, device: torch.device
) -> Iterator[tuple[Point, torch.nn.Module]]:
    """theta(w) = sum_m w_m theta_m for each w of the sweep; the M state dicts stay in memory."""
    assert spec.soup is not None
    working = load_model(spec.soup.models[0], config, device)
    states = [{k: v.detach().clone() for k, v in working.state_dict().items()}]
    for path in spec.soup.models[1:]:
        other = load_model(path, config, device)
        states.append({k: v.detach() for k, v in other.state_dict().items()})
        del other
    for point, _ in spec.points():
        assert point.weights is not None
        try:  # safetensors folders were checked up front; pickled ones (allow_pickle) only here
            weights = weighted_average(states, point.weights)
        except ValueError as e:
            raise ValueError(f"policy {spec.name!r}: the soup models cannot be averaged: {e}") from e
        working.load_state_dict(weights, strict=True)
        yield point, working
    del working, states


def _liti_models(
    spec: PolicySpec, config: FrontierConfig, device: torch.device
) -> Iterator[tuple[Point, torch.nn.Module]]:
    """theta_eta = (1 - eta) * init + eta * merged for each eta of the sweep, from tensors loaded once."""
    assert spec.liti is not None
    working = load_model(spec.liti.init, config, device)
    init = {k: v.detach().clone() for k, v in working.state_dict().items()}
    merged_model = load_model(spec.liti.merged, config, device)
    merged = {k: v.detach() for k, v in merged_model.state_dict().items()}
    del merged_model
    for point, _ in spec.points():
        assert point.eta is not None
        try:  # safetensors folders were checked up front; pickled ones (allow_pickle) only here
            weights = liti(init, merged, point.eta, allow_extrapolation=spec.liti.allow_extrapolation)
        except ValueError as e:
            raise ValueError(f"policy {spec.name!r}: the LITI sweep cannot interpolate: {e}") from e
        working.load_state_dict(weights, strict=True)
        yield point, working
    del working, init, merged

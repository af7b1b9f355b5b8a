"""Everything a WARP config names, checked before the first run starts: a bad reward, dataset, accelerate
config, init or frontier field fails in seconds with one clear line, not inside the first subprocess or
after hours of training.

- `check_output_dir`: a folder (not a file), writable, and either new or a warpkit train output;
- `check_init`: the SFT init's weights are readable safetensors (not pickled, not truncated);
- `preflight`: the rl sections parsed as each run will parse them, every reward and dataset spec loaded,
  the accelerate config read, the frontier section built as the frontier will build it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from warpkit._util.config import ConfigError, build_dataclass, load_yaml_mapping
from warpkit.loop.config import WarpConfig
from warpkit.loop.evaluate import baseline_specs, frontier_document
from warpkit.loop.manifest import MANIFEST_NAME
from warpkit.merge.checkpoint import check_weights
from warpkit.workloads import load_prompt_dataset, reward_spec

__all__ = ["LOCK_NAME", "check_init", "check_output_dir", "preflight"]

LOCK_NAME = ".warpkit.lock"
_OWN_FILES = {LOCK_NAME, MANIFEST_NAME, "warp_config.yaml"}  # what marks a folder as a warpkit train output


def check_output_dir(out: Path) -> None:
    """Refuse an output_dir that is a file, cannot be written, or holds something that is not warpkit's."""
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output_dir={out} is a file; give a folder (new, or one warpkit train wrote before)."
        )
    existing = out if out.exists() else next((p for p in out.parents if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir={out} cannot be written ({existing} is read-only); choose another folder."
        )
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and not names & _OWN_FILES:
            raise ConfigError(
                f"output_dir={out} exists and is not a warpkit train output (no {MANIFEST_NAME}); warpkit "
                "writes and replaces folders under it, so it refuses: choose a new or empty folder."
            )


def check_init(sft: Path) -> None:
    """The init's weights: safetensors that read (headers and sizes), so no merge fails on it after M runs."""
    try:
        check_weights(sft)
    except ValueError as e:
        raise ConfigError(f"model_name_or_path={sft}: {e}") from None


def preflight(config: WarpConfig) -> None:
    """Check every run's settings, reward, dataset and launcher, and the frontier section (see module doc)."""
    from warpkit.loop.rl import check_settings

    sections = [("rl", config.rl)]
    sections += [(f"baselines[{s.name}].rl", s.rl) for s in baseline_specs(config, Path("."), Path("."))]
    with tempfile.TemporaryDirectory() as tmp:  # a scratch output_dir: TrainingArguments may touch it
        for section, rl in sections:
            run = {**rl, "model_name_or_path": config.model_name_or_path, "output_dir": tmp, "data_seed": 0}
            try:
                rl_args = check_settings(run)
                _check_specs(rl_args)
            except (ValueError, TypeError, FileNotFoundError, SystemExit) as e:
                raise ConfigError(f"invalid {section}: {e}") from None
    if config.accelerate_config is not None:
        load_yaml_mapping(config.accelerate_config, "accelerate_config")
    slurm = config.slurm_config()
    if slurm is not None:
        from warpkit.loop.scheduler import check_slurm

        try:
            check_slurm(slurm)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if config.frontier is not None or config.frontier_policies:
        _check_frontier(config)


def _check_specs(rl_args: Any) -> None:
    for spec in rl_args.reward_funcs:
        reward_spec(spec)
    load_prompt_dataset(rl_args.dataset, split=rl_args.dataset_split)


def _check_frontier(config: WarpConfig) -> None:
    """The user's frontier fields and extra policies, built as the frontier will build them: beside the
    driver's own policies (WARP's iterations, the baselines), whose methods `compare` may name. Their
    folders do not exist yet; only the user's extra policies must."""
    from warpkit.frontier import FrontierConfig

    fields = frontier_document(config, Path("sft"), Path(config.output_dir or "."))
    try:
        frontier = build_dataclass(FrontierConfig, {**fields, "reference": "sft"}, "frontier")
    except ConfigError:  # already one line naming the field
        raise
    except ValueError as e:  # FrontierConfig's own checks (compare, policies, levels)
        raise ConfigError(f"frontier: {e}") from None
    extra = {p.get("name") for p in config.frontier_policies if isinstance(p, dict)}
    for spec in [frontier.reward, *frontier.extra_rewards.values()]:
        try:
            reward_spec(spec)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise ConfigError(f"frontier: {e}") from None
    for policy in [p for p in frontier.policies if p.name in extra]:
        try:
            folders = policy.folders()
        except ValueError as e:  # a trajectory glob that matches nothing
            raise ConfigError(f"frontier_policies: {e}") from None
        for folder, what in folders:
            if ":" not in folder and folder != "default" and not Path(folder).is_dir():
                raise ConfigError(f"frontier_policies: {what} {folder!r} is not a folder; check the path.")

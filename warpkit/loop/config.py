"""The WARP run's settings: one dataclass, read from YAML with types checked, overridable from the command line.

Everything a config names that can be checked without training is checked when it loads: value ranges,
the merge method and its settings (against the registry, `warpkit.merge.methods`), the baselines' shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warpkit._util.config import ConfigError, apply_overrides, build_dataclass, load_yaml_mapping
from warpkit.loop.slurm import SlurmConfig
from warpkit.merge.math import GRANULARITIES, check_eta
from warpkit.merge.methods import get_method

__all__ = ["DRIVER_RL_FIELDS", "ENGINE_MERGE_KWARGS", "WarpConfig", "load_config"]

# rl fields the driver sets per run; a config must not set them.
DRIVER_RL_FIELDS = ("model_name_or_path", "output_dir", "data_seed")
# Engine settings that `merge_kwargs` may carry besides the method's own parameters.
ENGINE_MERGE_KWARGS = ("compute_dtype", "dtype", "max_shard_size")
LAUNCHERS = ("local", "slurm")
_EXTRAPOLATE = "set allow_extrapolation: true (YAML) or --allow_extrapolation true"


@dataclass
class WarpConfig:
    """All settings of a WARP run (Algorithm 1 of Ramé et al. 2024).

    Args:
        model_name_or_path: the SFT init: a model folder, `warpkit:default` (embedded SmolLM2-135M-Instruct)
            or `warpkit:tiny` (a tiny local llama, for tests).
        output_dir: where runs, merges, the manifest and the final init go.
        iterations: I, the number of WARP iterations. Paper: up to 5 (gains flatten after 3).
        num_policies: M, independent RL runs per iteration. Paper: 2.
        liti_eta: η, next init = (1 - η) init + η merged. Paper: 0.3.
        allow_extrapolation: allow η > 1 (extrapolation past the merge, as in ExPO).
        merge_method: `slerp` (WARP's SLERP of task vectors), `lerp` (the ablation), or any other method of
            `warpkit merge` (ties, dare_ties, model_stock, karcher, ...).
        merge_kwargs: settings of that method (`density`, `seed`, `scale`, ...: its parameters in
            `warpkit.merge.methods`) and of the engine (`compute_dtype`, `dtype`, `max_shard_size`).
        merge_granularity: one SLERP angle per `block` (transformer layer; the paper), `tensor` or `model`.
        merge_weights: λ weights of the M policies; None is uniform (λ = 1/M).
        front_etas: if set, also write the final front (1 - η) sft + η merged_I for each η here.
        seed: run m of iteration i uses `data_seed = seed + (i - 1) * M + (m - 1)`: runs differ in prompt order.
        accelerate_config: an `accelerate_configs/*.yaml` file for every run; None runs one plain process.
        num_processes: processes per run (overrides the accelerate config's).
        gpus_per_run: GPUs one run needs (default: num_processes). With more GPUs visible, runs of one
            iteration go side by side on disjoint GPU sets.
        cpu_threads_per_process: CPU threads (OMP_NUM_THREADS) of each training process. None: an equal
            share of the cores, cores / (num_processes x runs at once) locally (all of them when runs go one
            after another), slurm.cpus_per_task / processes per node on SLURM. accelerate alone would give a
            CPU process one thread. The thread count changes a CPU run's last bits: compare runs made with
            the same count.
        rl: the fields of each run's config: TRL's RLOOConfig/GRPOConfig, TRL's ModelConfig (LoRA) and
            `warpkit.loop.rl.RLArguments`. `model_name_or_path`, `output_dir` and `data_seed` are set per run.
        baselines: single RL runs from the SFT init in the same harness, each `{name: ..., rl: {...}}` whose
            rl fields override the rl section (e.g. `{name: sft_beta0.1, rl: {anchor: sft, beta: 0.1}}`), and
            an optional `method`: its group on the frontier (default `<anchor>_anchor`, so the SFT-anchor runs
            of a beta grid form one front; give each its own method to compare them one by one).
            Equal budget: a baseline trains `iterations * rl.max_steps` steps (as many sequential steps as
            WARP's final policy has seen), unless its rl sets max_steps; checkpoints every rl.max_steps steps
            (or its own rl.save_steps) are kept as its trajectory. One with `final_policy: swa | lawa` is
            drawn as its averaged policy.
        frontier: if set, end with the reward-KL evaluation: fields of `warpkit.frontier.FrontierConfig`
            except reference and policies, which the driver fills (the SFT init; the LITI front
            (1 - η) sft + η merged_i of every iteration over `frontier_etas`; each baseline's trajectory).
            The generated config is kept as `frontier.yaml`; results go to `frontier/`.
        frontier_etas: the η grid of each iteration's LITI front in the frontier evaluation.
        launcher: `local` (each run an `accelerate launch` subprocess on this machine) or `slurm` (each run
            a SLURM job; see `slurm`).
        slurm: with `launcher: slurm`, the fields of `warpkit.loop.slurm.SlurmConfig` (partition, account,
            qos, time, nodes, gpus_per_node, cpus_per_task, mem, extra_sbatch, setup, python, max_retries,
            poll_seconds), e.g. `--slurm.partition gpu`.
        frontier_policies: more frontier policy entries drawn on the same plot, e.g. the M = 1 ablation from
            another output_dir: `{name: warp-m1, method: warp_m1, liti: {init: ..., merged: .../iter_2/merged}}`.
    """

    model_name_or_path: str
    output_dir: str = "outputs/warp"
    iterations: int = 2
    num_policies: int = 2
    liti_eta: float = 0.3
    allow_extrapolation: bool = False
    merge_method: str = "slerp"
    merge_granularity: str = "block"
    merge_weights: list[float] | None = None
    merge_kwargs: dict[str, Any] = field(default_factory=dict)
    front_etas: list[float] = field(default_factory=list)
    seed: int = 0
    accelerate_config: str | None = None
    num_processes: int = 1
    gpus_per_run: int | None = None
    cpu_threads_per_process: int | None = None
    rl: dict[str, Any] = field(default_factory=dict)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    frontier: dict[str, Any] | None = None
    frontier_etas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    frontier_policies: list[dict[str, Any]] = field(default_factory=list)
    launcher: str = "local"
    slurm: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher={self.launcher!r}: choose one of {list(LAUNCHERS)}.")
        if self.slurm is not None and self.launcher != "slurm":
            raise ConfigError(
                "a slurm section is set but launcher is local; set launcher: slurm (or remove it)."
            )
        self.slurm_config()  # its types and ranges, now
        if self.iterations < 1:
            raise ConfigError(f"iterations={self.iterations}: WARP needs at least one iteration (I >= 1).")
        if self.num_policies < 1:
            raise ConfigError(f"num_policies={self.num_policies}: M must be at least 1 (the paper uses 2).")
        if self.num_processes < 1:
            raise ConfigError(f"num_processes={self.num_processes} must be >= 1.")
        if self.cpu_threads_per_process is not None and self.cpu_threads_per_process < 1:
            raise ConfigError(
                f"cpu_threads_per_process={self.cpu_threads_per_process} must be >= 1 (or unset: a share of the cores)."
            )
        check_eta(self.liti_eta, self.allow_extrapolation, fix=_EXTRAPOLATE)
        check_eta(self.front_etas, self.allow_extrapolation, name="front_etas", fix=_EXTRAPOLATE)
        if self.frontier is not None and {"reference", "policies"} & set(self.frontier):
            raise ConfigError(
                "frontier.reference and frontier.policies are filled by the driver; remove them."
            )
        self._check_merge()
        self._check_baselines()

    def _check_merge(self) -> None:
        try:
            method = get_method(self.merge_method)
        except ValueError as e:
            raise ConfigError(f"merge_{e}") from None  # "merge_method='sum' is not one of [...]"
        if method.init == "none":
            raise ConfigError(
                f"merge_method={self.merge_method!r} averages models without an init; WARP merges task "
                "vectors relative to the iteration's init: use slerp (the paper), lerp or another method with an init."
            )
        params = {k: v for k, v in self.merge_kwargs.items() if k not in ENGINE_MERGE_KWARGS}
        try:
            method.resolve(params)
            method.check_inputs(
                self.num_policies, self.merge_weights, params, allow_extrapolation=self.allow_extrapolation
            )
        except ValueError as e:
            raise ConfigError(
                f"merge_kwargs / merge_weights for merge_method={self.merge_method!r}: {e}"
            ) from None
        if self.merge_granularity not in GRANULARITIES:
            raise ConfigError(f"merge_granularity={self.merge_granularity!r}: choose one of {GRANULARITIES}.")

    def _check_baselines(self) -> None:
        for b in self.baselines:
            if (
                set(b) - {"name", "rl", "method"}
                or not isinstance(b.get("name"), str)
                or not b["name"].isidentifier()
            ):
                raise ConfigError(
                    f"baseline {b!r}: give {{name: <identifier>, rl: {{...}}}} (e.g. name: sft_beta0_1), "
                    "optionally method: <identifier> (its group on the frontier)."
                )
            if not isinstance(b.get("method", ""), str) or not b.get("method", "x").isidentifier():
                raise ConfigError(f"baseline {b['name']}: method={b['method']!r} must be an identifier.")
        names = [b["name"] for b in self.baselines]
        if len(set(names)) != len(names):
            raise ConfigError(f"baseline names must be unique, got {names}.")
        for section, rl in self.rl_sections():
            reserved = set(DRIVER_RL_FIELDS) & set(rl)
            if reserved:
                raise ConfigError(f"{section}.{sorted(reserved)[0]} is set by the driver per run; remove it.")

    def slurm_config(self) -> SlurmConfig | None:
        """The `slurm` section as a checked `SlurmConfig` (None with the local launcher)."""
        if self.launcher != "slurm":
            return None
        return build_dataclass(SlurmConfig, self.slurm or {}, "slurm")

    def rl_sections(self) -> list[tuple[str, dict[str, Any]]]:
        """("rl", the shared run settings) and ("baselines[<name>].rl", each baseline's overrides)."""
        return [("rl", self.rl), *((f"baselines[{b['name']}].rl", b.get("rl", {})) for b in self.baselines)]

    def merge_settings(self) -> dict[str, Any]:
        """Keyword arguments of `merge_folders` for stage 2: weights, granularity and `merge_kwargs`."""
        return {
            "weights": self.merge_weights,
            "granularity": self.merge_granularity,
            "allow_extrapolation": self.allow_extrapolation,
            **self.merge_kwargs,
        }


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> WarpConfig:
    """A `WarpConfig` from YAML plus `--field VALUE` overrides; unknown fields and wrong types are refused
    (RL fields go under `rl:`)."""
    raw = apply_overrides(load_yaml_mapping(path, "WARP config") if path is not None else {}, overrides)
    if "model_name_or_path" not in raw:
        raise ConfigError("model_name_or_path is required: the SFT init folder, or warpkit:default.")
    return build_dataclass(WarpConfig, raw, str(path) if path is not None else "WARP config")

"""The iterated WARP loop (Algorithm 1): M RL runs from one init, SLERP of their policies, LITI, I times.

Each RL run is a fresh `accelerate launch -m warpkit.rl` subprocess, so no process state leaks between runs.
The training step and the merge step are injected (`train_fn`, `merge_fn`), so the loop itself is testable in
milliseconds with a fake trainer.

Resumability is content-addressed: every step (a run, a merge) is recorded in `warp_manifest.json` with a
fingerprint of its inputs (config and input hashes) and the sha256 of every output file. Re-running the same
command skips a step whose record matches and whose outputs still hash the same, resumes an interrupted run
from its last complete Trainer checkpoint, and redoes anything else. All outputs are written to a temporary
folder and renamed, so a half-written folder never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Manifest",
    "RunSpec",
    "WarpConfig",
    "accelerate_launcher",
    "gpu_slots",
    "load_config",
    "main",
    "run_warp",
]

MANIFEST_NAME = "warp_manifest.json"
FINGERPRINT_NAME = ".warpkit_fingerprint"


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
        merge_kwargs: extra settings of that method (`density`, `seed`, `scale`, ...), see `warpkit merge -h`.
        merge_granularity: one SLERP angle per `block` (transformer layer; the paper), `tensor` or `model`.
        merge_weights: λ weights of the M policies; None is uniform (λ = 1/M).
        front_etas: if set, also write the final front (1 - η) sft + η merged_I for each η here.
        seed: run m of iteration i uses `data_seed = seed + (i - 1) * M + (m - 1)`: runs differ in prompt order.
        accelerate_config: an `accelerate_configs/*.yaml` file for every run; None runs one plain process.
        num_processes: processes per run (overrides the accelerate config's).
        gpus_per_run: GPUs one run needs (default: num_processes). With more GPUs visible, runs of one
            iteration go side by side on disjoint GPU sets.
        rl: the fields of each run's config: TRL's RLOOConfig/GRPOConfig, TRL's ModelConfig (LoRA) and
            `warpkit.rl.RLArguments`. `model_name_or_path`, `output_dir` and `data_seed` are set per run.
        baselines: single RL runs from the SFT init in the same harness, each `{name: ..., rl: {...}}` whose
            rl fields override the rl section (e.g. `{name: sft_beta0.1, rl: {anchor: sft, beta: 0.1}}`).
            Equal budget: a baseline trains `iterations * rl.max_steps` steps (as many sequential steps as
            WARP's final policy has seen), unless its rl sets max_steps; checkpoints every rl.max_steps steps
            are kept as its trajectory.
        frontier: if set, end with the reward-KL evaluation: fields of `warpkit.frontier_config.FrontierConfig`
            except reference and policies, which the driver fills (the SFT init; the LITI front
            (1 - η) sft + η merged_i of every iteration over `frontier_etas`; each baseline's trajectory).
            The generated config is kept as `frontier.yaml`; results go to `frontier/`.
        frontier_etas: the η grid of each iteration's LITI front in the frontier evaluation.
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
    rl: dict[str, Any] = field(default_factory=dict)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    frontier: dict[str, Any] | None = None
    frontier_etas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    frontier_policies: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: WARP needs at least one iteration (I >= 1).")
        if self.num_policies < 1:
            raise ValueError(f"num_policies={self.num_policies}: M must be at least 1 (the paper uses 2).")
        for name, eta in [("liti_eta", self.liti_eta), *(("front_etas", e) for e in self.front_etas)]:
            if not math.isfinite(eta) or eta < 0 or (eta > 1 and not self.allow_extrapolation):
                raise ValueError(
                    f"{name}={eta} is outside [0, 1]; set allow_extrapolation: true to extrapolate (eta > 1)."
                )
        if self.frontier is not None and {"reference", "policies"} & set(self.frontier):
            raise ValueError(
                "frontier.reference and frontier.policies are filled by the driver; remove them."
            )
        from warpkit.merge.methods import METHODS

        if self.merge_method not in METHODS:
            raise ValueError(f"merge_method={self.merge_method!r}: choose one of {METHODS} (WARP: slerp).")
        allowed = {"scale", "density", "seed", "normalize", "compute_dtype", "dtype", "max_shard_size"}
        if set(self.merge_kwargs) - allowed:
            raise ValueError(
                f"merge_kwargs {sorted(set(self.merge_kwargs) - allowed)} unknown; use {sorted(allowed)}."
            )
        if self.merge_granularity not in ("block", "tensor", "model"):
            raise ValueError(f"merge_granularity={self.merge_granularity!r}: choose block, tensor or model.")
        if self.merge_weights is not None and len(self.merge_weights) != self.num_policies:
            raise ValueError(
                f"merge_weights has {len(self.merge_weights)} entries for num_policies={self.num_policies}."
            )
        if self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be >= 1.")
        for b in self.baselines:
            if set(b) - {"name", "rl"} or not isinstance(b.get("name"), str) or not b["name"].isidentifier():
                raise ValueError(
                    f"baseline {b!r}: give {{name: <identifier>, rl: {{...}}}} (e.g. name: sft_beta0_1)."
                )
        names = [b["name"] for b in self.baselines]
        if len(set(names)) != len(names):
            raise ValueError(f"baseline names must be unique, got {names}.")
        sections = [
            ("rl", self.rl),
            *((f"baselines[{b['name']}].rl", b.get("rl", {})) for b in self.baselines),
        ]
        for section, rl in sections:
            reserved = {"model_name_or_path", "output_dir", "data_seed"} & set(rl)
            if reserved:
                raise ValueError(f"{section}.{sorted(reserved)[0]} is set by the driver per run; remove it.")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--field VALUE` / `--rl.field=VALUE` command-line overrides (values parsed as YAML)."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    items = list(overrides)
    while items:
        token = items.pop(0)
        if not token.startswith("--"):
            raise ValueError(
                f"unexpected argument {token!r}: overrides look like --field VALUE or --rl.field VALUE."
            )
        key, eq, value = token[2:].partition("=")
        if not eq:
            if not items:
                raise ValueError(f"override {token} has no value.")
            value = items.pop(0)
        *parents, leaf = key.split(".")
        target = raw
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {token}: {parent} is not a section.")
        target[leaf] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> WarpConfig:
    """A `WarpConfig` from YAML plus overrides; unknown fields are refused with the list of valid ones."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a YAML mapping.")
    raw = apply_overrides(raw, overrides)
    known = {f.name for f in dataclasses.fields(WarpConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {unknown}; valid fields: {sorted(known)} (RL fields go under rl:)."
        )
    if "model_name_or_path" not in raw:
        raise ValueError("model_name_or_path is required: the SFT init folder, or warpkit:default.")
    return WarpConfig(**raw)


# ----------------------------------------------------------------------------- hashing and the manifest


def tree_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file below `folder`, keyed by relative path (sorted)."""
    from warpkit._util.files import sha256_file

    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Manifest:
    """`warp_manifest.json`: one record per finished step, rewritten atomically after each step."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # runs side by side record from several threads
        if path.is_file():
            try:
                self.steps = json.loads(path.read_text())["steps"]
            except (ValueError, KeyError) as e:
                raise ValueError(
                    f"{path} is not a warpkit manifest ({e}); move it away to start over."
                ) from e

    def done(self, key: str, inputs: str, outputs: Sequence[Path]) -> bool:
        """True when `key` finished with these inputs and its outputs still hash as recorded."""
        record = self.steps.get(key)
        if record is None or record["inputs"] != inputs:
            return False
        return all(p.is_dir() and tree_digest(p) == record["outputs"].get(p.name) for p in outputs)

    def record(self, key: str, inputs: str, outputs: Sequence[Path], **info: Any) -> None:
        hashes = {p.name: tree_digest(p) for p in outputs}
        with self._lock:
            self.steps[key] = {
                "inputs": inputs,
                "outputs": hashes,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **info,
            }
            self._write()

    def save(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"steps": self.steps}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One RL run: iteration i (1-based), policy m (1-based), its init folder, output folder and config."""

    iteration: int
    index: int
    init: Path
    output_dir: Path
    data_seed: int
    rl: dict[str, Any]

    name: str | None = None  # baselines are named; WARP runs are keyed by (iteration, index)

    @property
    def key(self) -> str:
        if self.name is not None:
            return f"baselines/{self.name}"
        return f"iter_{self.iteration}/run_{self.index}"

    @property
    def policy_dir(self) -> Path:
        from warpkit.rl import POLICY_DIRNAME

        return self.output_dir / POLICY_DIRNAME

    def run_config(self) -> dict[str, Any]:
        return {
            **self.rl,
            "model_name_or_path": str(self.init),
            "output_dir": str(self.output_dir),
            "data_seed": self.data_seed,
        }


TrainFn = Callable[[RunSpec, "dict[str, str]"], None]


def gpu_slots(n_gpus: int, gpus_per_run: int) -> list[list[int]]:
    """Disjoint GPU sets for runs side by side: 8 GPUs, 2 per run -> [[0, 1], [2, 3], [4, 5], [6, 7]].

    Fewer GPUs than one run needs (or none) gives a single slot with no GPU list: runs go one after another.
    """
    if gpus_per_run < 1:
        raise ValueError(f"gpus_per_run={gpus_per_run} must be >= 1.")
    if n_gpus < gpus_per_run:
        return [[]]
    return [list(range(s * gpus_per_run, (s + 1) * gpus_per_run)) for s in range(n_gpus // gpus_per_run)]


def accelerate_launcher(config: WarpConfig) -> TrainFn:
    """Train a run as `accelerate launch [--config_file X] --num_processes N -m warpkit.rl --config run.yaml`."""

    def train(spec: RunSpec, env: dict[str, str]) -> None:
        run_yaml = spec.output_dir / "warp_run.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if config.accelerate_config:
            cmd += ["--config_file", str(Path(config.accelerate_config).resolve())]
        else:
            cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            if config.num_processes > 1:
                cmd += ["--multi_gpu"]
        cmd += ["--num_processes", str(config.num_processes)]
        cmd += ["--main_process_port", env.get("WARPKIT_PORT", "29500")]
        cmd += ["-m", "warpkit.rl", "--config", str(run_yaml)]
        log_path = spec.output_dir / "train.log"
        print(f"warpkit: {spec.key}: {' '.join(cmd[2:])}\n         log: {log_path}", flush=True)
        with open(log_path, "ab") as log:
            proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(
                f"{spec.key} failed (exit {proc.returncode}); last lines of {log_path}:\n" + "\n".join(tail)
            )

    return train


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


# ----------------------------------------------------------------------------- merging


MergeFn = Callable[..., dict[str, Any]]


def default_merge(
    *,
    init: Path,
    policies: Sequence[Path],
    merged_out: Path,
    next_init_out: Path,
    config: WarpConfig,
) -> dict[str, Any]:
    """Stage 2 (SLERP of the policies' task vectors) to `merged_out`, stage 3 (LITI) to `next_init_out`."""
    from warpkit.merge.folders import merge_folders

    report = merge_folders(
        config.merge_method,
        init,
        list(policies),
        merged_out,
        config.merge_weights,
        granularity=config.merge_granularity,
        allow_extrapolation=config.allow_extrapolation,
        **config.merge_kwargs,
    )
    liti_folder(init, merged_out, next_init_out, config.liti_eta, config.allow_extrapolation)
    return report.log()


def liti_folder(init: Path, merged: Path, out: Path, eta: float, allow_extrapolation: bool) -> None:
    """(1 - η) init + η merged, streamed to `out`: LITI is the LERP of the single model `merged`."""
    from warpkit.merge.folders import merge_folders

    merge_folders("lerp", init, [merged], out, liti_eta=eta, allow_extrapolation=allow_extrapolation)


# ----------------------------------------------------------------------------- the loop


def _prepare_run_dir(spec: RunSpec, inputs: str) -> None:
    """Keep an interrupted run of the same inputs (to resume it); wipe one of other inputs."""
    marker = spec.output_dir / FINGERPRINT_NAME
    if spec.output_dir.exists() and (not marker.is_file() or marker.read_text() != inputs):
        shutil.rmtree(spec.output_dir)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(inputs)
    (spec.output_dir / "warp_run.yaml").write_text(yaml.safe_dump(spec.run_config(), sort_keys=True))
    if spec.policy_dir.exists():  # a policy not in the manifest is not trusted
        shutil.rmtree(spec.policy_dir)


def baseline_specs(config: WarpConfig, sft: Path, out: Path) -> list[RunSpec]:
    """One run per baseline, from the SFT init, under `baselines/<name>/`, with equal sequential budget."""
    specs = []
    for n, baseline in enumerate(config.baselines):
        rl = {**config.rl, **baseline.get("rl", {})}
        if "max_steps" not in baseline.get("rl", {}) and "max_steps" in config.rl:
            rl["max_steps"] = config.iterations * int(config.rl["max_steps"])
            rl["save_strategy"] = "steps"
            rl["save_steps"] = int(config.rl["max_steps"])  # a checkpoint per WARP-iteration length
            rl["save_total_limit"] = None  # keep them all: they are the trajectory the frontier draws
        folder = out / "baselines" / baseline["name"]
        specs.append(RunSpec(0, n + 1, sft, folder, config.seed, rl, name=baseline["name"]))
    return specs


def _train_one(
    spec: RunSpec, inputs: str, gpus: list[int], port_offset: int, train_fn: TrainFn, manifest: Manifest
) -> None:
    _prepare_run_dir(spec, inputs)
    env = {"WARPKIT_PORT": str(29500 + port_offset)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    print(f"warpkit: {spec.key}: training from {spec.init} (data_seed={spec.data_seed})", flush=True)
    train_fn(spec, env)
    if not any((spec.policy_dir / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise RuntimeError(f"{spec.key} ended without writing its policy to {spec.policy_dir}.")
    manifest.record(spec.key, inputs, [spec.policy_dir], data_seed=spec.data_seed)


def _train_side_by_side(
    specs: Sequence[RunSpec],
    inputs: dict[str, str],
    slots: list[list[int]],
    train_fn: TrainFn,
    manifest: Manifest,
) -> None:
    """Train `specs`, at most one per slot at a time; one slot (no GPUs or too few) means one after another."""
    free: queue.Queue[int] = queue.Queue()
    for n in range(len(slots)):
        free.put(n)

    def train_in_slot(spec: RunSpec) -> None:
        n = free.get()  # a slot is a disjoint GPU set and a port, held for the whole run
        try:
            _train_one(spec, inputs[spec.key], slots[n], n, train_fn, manifest)
        finally:
            free.put(n)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        list(pool.map(train_in_slot, specs))


def run_warp(
    config: WarpConfig,
    *,
    train_fn: TrainFn | None = None,
    merge_fn: MergeFn | None = None,
    validate: Callable[[WarpConfig], None] | None = None,
) -> Path:
    """Run (or finish) Algorithm 1 and return the final init folder.

    Layout of `output_dir`: `iter_i/run_m/` (a TRL output_dir; `policy/` is the run's final policy),
    `iter_i/merged/` (SLERP of the M policies), `iter_i/next_init/` (LITI: the next iteration's init),
    `front/eta_X/` when `front_etas` is set, and `warp_manifest.json`.
    """
    from warpkit.rl import resolve_model_path

    out = Path(config.output_dir).resolve()
    sft = Path(resolve_model_path(config.model_name_or_path))
    if validate is not None:
        validate(config)
    train_fn = train_fn or accelerate_launcher(config)
    merge_fn = merge_fn or default_merge
    out.mkdir(parents=True, exist_ok=True)
    (out / "warp_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    manifest = Manifest(out / MANIFEST_NAME)
    slots = gpu_slots(_visible_gpus(), config.gpus_per_run or config.num_processes)
    did_work = False

    sft_hash = fingerprint(tree_digest(sft))
    init, init_hash = sft, sft_hash
    M = config.num_policies
    for i in range(1, config.iterations + 1):
        it_dir = out / f"iter_{i}"
        specs = [
            RunSpec(i, m, init, it_dir / f"run_{m}", config.seed + (i - 1) * M + (m - 1), config.rl)
            for m in range(1, M + 1)
        ]
        fingerprints = {s.key: fingerprint([init_hash, s.rl, s.data_seed]) for s in specs}
        pending = [s for s in specs if not manifest.done(s.key, fingerprints[s.key], [s.policy_dir])]
        for s in specs:
            if s not in pending:
                print(f"warpkit: {s.key}: done (manifest), skipping.", flush=True)
        if pending:
            did_work = True
            print(
                f"warpkit: iteration {i}/{config.iterations}: training {len(pending)} of {M} runs", flush=True
            )
            _train_side_by_side(pending, fingerprints, slots, train_fn, manifest)

        merged, next_init = it_dir / "merged", it_dir / "next_init"
        policy_hashes = [manifest.steps[s.key]["outputs"][s.policy_dir.name] for s in specs]
        merge_params = [
            config.merge_method, config.merge_granularity, config.merge_weights, config.merge_kwargs, config.liti_eta
        ]  # fmt: skip
        merge_inputs = fingerprint([init_hash, policy_hashes, merge_params])
        key = f"iter_{i}/merge"
        if manifest.done(key, merge_inputs, [merged, next_init]):
            print(f"warpkit: {key}: done (manifest), skipping.", flush=True)
        else:
            did_work = True
            for folder in (merged, next_init):  # never trust an output the manifest does not vouch for
                if folder.exists():
                    shutil.rmtree(folder)
            print(
                f"warpkit: iteration {i}: {config.merge_method} of {M} policies, then LITI eta="
                f"{config.liti_eta} -> {next_init}",
                flush=True,
            )
            stats = merge_fn(
                init=init,
                policies=[s.policy_dir for s in specs],
                merged_out=merged,
                next_init_out=next_init,
                config=config,
            )
            (it_dir / "merge_stats.json").write_text(json.dumps(stats, indent=1, default=float))
            manifest.record(key, merge_inputs, [merged, next_init], summary=_summary(stats))
            _print_stats(i, stats)
        init, init_hash = next_init, fingerprint(manifest.steps[key]["outputs"][next_init.name])

    final_merged = out / f"iter_{config.iterations}" / "merged"
    for eta in config.front_etas:
        point = out / "front" / f"eta_{eta:g}"
        key = f"front/eta_{eta:g}"
        merged_hash = manifest.steps[f"iter_{config.iterations}/merge"]["outputs"]["merged"]
        inputs = fingerprint([sft_hash, merged_hash, eta])
        if manifest.done(key, inputs, [point]):
            continue
        did_work = True
        if point.exists():
            shutil.rmtree(point)
        liti_folder(sft, final_merged, point, eta, config.allow_extrapolation)
        manifest.record(key, inputs, [point], eta=eta)

    baselines = baseline_specs(config, sft, out)
    inputs = {s.key: fingerprint([sft_hash, s.rl, s.data_seed]) for s in baselines}
    pending = [s for s in baselines if not manifest.done(s.key, inputs[s.key], [s.policy_dir])]
    if pending:
        did_work = True
        print(f"warpkit: baselines: training {len(pending)} of {len(baselines)} runs", flush=True)
        _train_side_by_side(pending, inputs, slots, train_fn, manifest)

    if config.frontier is not None:
        did_work |= _evaluate_frontier(config, sft, out, manifest, [s.key for s in baselines])

    manifest.steps["final_init"] = {"inputs": "", "outputs": {}, "path": str(init)}
    manifest.save()
    _print_artefacts(out, config)
    if not did_work:
        print(
            f"warpkit: nothing to do: all {config.iterations * M} runs and {config.iterations} merges in "
            f"{out / MANIFEST_NAME} are complete and verified.",
            flush=True,
        )
    print(f"warpkit: final init: {init}", flush=True)
    return init


def _summary(stats: dict[str, float]) -> dict[str, float]:
    """Means over groups of the per-group merge metrics (`merge/<group>/<metric>` -> `<metric>_mean`)."""
    by_metric: dict[str, list[float]] = {}
    for key, value in stats.items():
        if math.isfinite(value):
            by_metric.setdefault(key.rsplit("/", 1)[-1], []).append(value)
    return {
        f"{m}_mean": sum(v) / len(v) for m, v in by_metric.items() if m in ("angle_deg", "cos", "merged_norm")
    }


def _print_stats(iteration: int, stats: dict[str, float]) -> None:
    summary = _summary(stats)
    if summary:
        print(
            f"warpkit: iteration {iteration} merge: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items())
        )


def frontier_document(config: WarpConfig, sft: Path, out: Path) -> dict[str, Any]:
    """The frontier config for this run's artefacts: WARP's LITI front per iteration and each baseline."""
    policies: list[dict[str, Any]] = [
        {
            "name": f"warp-iter{i}",
            "method": f"warp_iter{i}",
            "liti": {
                "init": str(sft),
                "merged": str(out / f"iter_{i}" / "merged"),
                "etas": config.frontier_etas,
            },
            "params": {"iteration": i, "num_policies": config.num_policies, "liti_eta": config.liti_eta},
        }
        for i in range(1, config.iterations + 1)
    ]
    labels = {
        f"warp_iter{i}": f"WARP iteration {i} (LITI front from SFT)" for i in range(1, config.iterations + 1)
    }
    for spec in baseline_specs(config, sft, out):
        anchor = spec.rl.get("anchor", "ema")
        method = f"{anchor}_anchor"
        labels.setdefault(method, {"sft": "RL, SFT anchor", "ema": "RL, EMA anchor, no merge"}[anchor])
        params = {k: spec.rl[k] for k in ("beta", "ema_rate") if k in spec.rl}
        policies.append(
            {
                "name": spec.name,
                "method": method,
                "trajectory": str(spec.output_dir / "checkpoint-*"),
                "params": params,
            }
        )
    user = dict(config.frontier or {})
    return {
        "title": f"WARP (I={config.iterations}, M={config.num_policies}) vs baselines",
        **user,
        "method_labels": {**labels, **user.get("method_labels", {})},
        "reference": str(sft),
        "policies": policies + list(config.frontier_policies),
        "output_dir": str(out / "frontier"),
    }


def _evaluate_frontier(
    config: WarpConfig, sft: Path, out: Path, manifest: Manifest, baseline_keys: list[str]
) -> bool:
    """Run the frontier evaluation unless the manifest has it for these exact inputs. Returns whether it ran."""
    from warpkit.frontier_config import load_frontier_config
    from warpkit.frontier_run import run_frontier, write_frontier

    document = frontier_document(config, sft, out)
    merges = [manifest.steps[f"iter_{i}/merge"]["outputs"] for i in range(1, config.iterations + 1)]
    baselines = [manifest.steps[k]["outputs"] for k in baseline_keys]
    inputs = fingerprint([document, merges, baselines])
    if manifest.done("frontier", inputs, [out / "frontier"]):
        print("warpkit: frontier: done (manifest), skipping.", flush=True)
        return False
    path = out / "frontier.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    print(f"warpkit: frontier: evaluating {len(document['policies'])} policy groups ({path})", flush=True)
    write_frontier(run_frontier(load_frontier_config(path)), out / "frontier")
    manifest.record("frontier", inputs, [out / "frontier"])
    print(f"warpkit: frontier: {out / 'frontier' / 'frontier.png'}", flush=True)
    return True


def _print_artefacts(out: Path, config: WarpConfig) -> None:
    print(f"warpkit: artefacts under {out}:")
    for i in range(1, config.iterations + 1):
        it = f"iter_{i}"
        runs = ", ".join(f"{it}/run_{m}/policy" for m in range(1, config.num_policies + 1))
        print(
            f"  iteration {i}: policies {runs}; merged {it}/merged; next init {it}/next_init; "
            f"geometry {it}/merge_stats.json"
        )
    if config.front_etas:
        print(f"  front: {', '.join(f'front/eta_{e:g}' for e in config.front_etas)}")
    for b in config.baselines:
        print(f"  baseline {b['name']}: baselines/{b['name']}/policy (checkpoints: its trajectory)")
    print(f"  manifest: {MANIFEST_NAME}; per-run logs: iter_*/run_*/train.log (and report_to)")


def validate_rl_section(config: WarpConfig) -> None:
    """Parse every run's rl fields exactly as the run will, so a bad field fails before any training starts."""
    import tempfile

    from warpkit.rl import check_args, parse_args

    sections = [("rl", config.rl)] + [
        (f"baselines[{s.name}].rl", s.rl) for s in baseline_specs(config, Path("."), Path("."))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for section, rl in sections:
            run = {**rl, "model_name_or_path": config.model_name_or_path, "output_dir": tmp, "data_seed": 0}
            path = Path(tmp) / "run.yaml"
            path.write_text(yaml.safe_dump(run))
            try:
                rl_args, training_args, model_args = parse_args(["--config", str(path)])
                check_args(rl_args, training_args, model_args)
            except (ValueError, SystemExit) as e:
                raise ValueError(f"invalid {section}: {e}") from e


def main(argv: Sequence[str] | None = None) -> Path:
    """`warpkit train CONFIG [--output_dir DIR] [--any.config.field VALUE ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        print(WarpConfig.__doc__)
        raise SystemExit(0)
    config = load_config(argv[0], argv[1:])
    return run_warp(config, validate=validate_rl_section)

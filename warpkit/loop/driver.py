"""The iterated WARP loop (Algorithm 1 of Ramé et al. 2024): M RL runs from one init, the SLERP of their
policies, LITI towards the init, I times; then the optional final front, baselines and frontier.

Each step is one function: `_iteration` (stage 1: the M runs; stages 2 and 3: `_merge_step`),
`_front_steps`, the baselines and the frontier (`warpkit.loop.evaluate`). Every step goes through the
manifest (`warpkit.loop.manifest`): a step whose record matches its inputs and whose outputs still hash
the same is skipped, anything else is redone, so re-running the same command resumes after any crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from warpkit._util.files import hold_lock, remove_stale_temporaries, tree_digest, write_atomic
from warpkit.loop.config import WarpConfig, load_config
from warpkit.loop.evaluate import baseline_specs, evaluate_frontier
from warpkit.loop.launch import (
    RunSpec,
    TrainFn,
    accelerate_launcher,
    cpu_threads,
    gpu_slots,
    run_steps,
    train_runs,
    visible_gpus,
)
from warpkit.loop.manifest import MANIFEST_NAME, Manifest, Step, fingerprint
from warpkit.loop.preflight import LOCK_NAME, check_init, check_output_dir, preflight
from warpkit.merge.folders import liti_folder, merge_folders
from warpkit.workloads import resolve_model_path

__all__ = ["MergeFn", "default_merge", "main", "run_warp", "validate_rl_section"]

log = logging.getLogger(__name__)
MergeFn = Callable[..., dict[str, Any]]


def default_merge(
    *, init: Path, policies: Sequence[Path], merged_out: Path, next_init_out: Path, config: WarpConfig
) -> dict[str, Any]:
    """Stage 2 (SLERP of the policies' task vectors) to `merged_out`, stage 3 (LITI) to `next_init_out`.
    Returns the merge's per-group geometry as flat metrics (`merge/<group>/angle_deg`, ...)."""
    report = merge_folders(config.merge_method, init, list(policies), merged_out, **config.merge_settings())
    liti_folder(init, merged_out, next_init_out, config.liti_eta, config.allow_extrapolation)
    return report.log()


@dataclass
class _Loop:
    """What every step of one `run_warp` call shares."""

    config: WarpConfig
    out: Path
    sft: Path
    sft_hash: str
    manifest: Manifest
    slots: list[list[int]]
    train_fn: TrainFn
    merge_fn: MergeFn
    did_work: bool = False


def run_warp(
    config: WarpConfig,
    *,
    train_fn: TrainFn | None = None,
    merge_fn: MergeFn | None = None,
    validate: Callable[[WarpConfig], None] | None = None,
    detach: bool = False,
) -> Path:
    """Run (or finish) Algorithm 1 and return the final init folder.

    Layout of `output_dir`: `iter_i/run_m/` (a TRL output_dir; `policy/` is the run's final policy),
    `iter_i/merged/` (SLERP of the M policies), `iter_i/next_init/` (LITI: the next iteration's init),
    `front/eta_X/` when `front_etas` is set, `baselines/<name>/`, `frontier/`, and `warp_manifest.json`.
    `detach`: with `launcher: slurm`, an interrupted driver leaves its jobs running (re-attached next time).
    """
    out = Path(config.output_dir).resolve()
    check_output_dir(out)
    with contextlib.ExitStack() as stack:
        locked = out.is_dir()
        if locked:  # a second driver on the same output_dir is refused at once, before any check
            stack.enter_context(hold_lock(out / LOCK_NAME, f"output_dir {out}"))
        sft = Path(resolve_model_path(config.model_name_or_path))
        check_init(sft)
        if validate is not None:
            validate(config)
        out.mkdir(parents=True, exist_ok=True)
        if not locked:  # a new folder: nothing written before every check passed
            stack.enter_context(hold_lock(out / LOCK_NAME, f"output_dir {out}"))
        return _run_locked(config, out, sft, train_fn, merge_fn, detach)


def _run_locked(
    config: WarpConfig, out: Path, sft: Path, train_fn: TrainFn | None, merge_fn: MergeFn | None, detach: bool
) -> Path:
    """Algorithm 1 in `out`, which this process holds locked: stale temporaries first, then every step."""
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        for stale in remove_stale_temporaries(folder):
            log.info("removed %s, left by an interrupted run", stale)
    write_atomic(out / "warp_config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    manifest = Manifest(out / MANIFEST_NAME)
    slots, default_train = _launcher(config, manifest, detach)
    loop = _Loop(
        config, out, sft, fingerprint(tree_digest(sft)), manifest, slots, train_fn or default_train,
        merge_fn or default_merge,
    )  # fmt: skip
    init, init_hash = sft, loop.sft_hash
    for i in range(1, config.iterations + 1):
        init, init_hash = _iteration(loop, i, init, init_hash)
    _front_steps(loop)
    baselines = baseline_specs(config, sft, out)
    _train(loop, baselines, {s.key: fingerprint([loop.sft_hash, s.rl, s.data_seed]) for s in baselines})
    if config.frontier is not None:
        loop.did_work |= evaluate_frontier(config, sft, out, loop.manifest, [s.key for s in baselines])
    loop.manifest.steps["final_init"] = {"inputs": "", "outputs": {}, "path": str(init)}
    loop.manifest.save()
    _report(loop, init)
    return init


def _launcher(config: WarpConfig, manifest: Manifest, detach: bool) -> tuple[list[list[int]], TrainFn]:
    """(slots, train function) of the configured launcher: local GPU slots and `accelerate launch`, or one
    slot per run side by side with each run a SLURM job (the scheduler places them)."""
    slurm = config.slurm_config()
    if slurm is None:
        slots = gpu_slots(visible_gpus(), config.gpus_per_run or config.num_processes)
        threads = config.cpu_threads_per_process or cpu_threads(config.num_processes, len(slots))
        return slots, accelerate_launcher(config.accelerate_config, config.num_processes, threads)
    from warpkit.loop.scheduler import SlurmLauncher

    if config.cpu_threads_per_process:  # the nodes' accelerate keeps an OMP_NUM_THREADS it finds set
        threads = f"export OMP_NUM_THREADS={config.cpu_threads_per_process}"
        slurm = dataclasses.replace(slurm, setup="\n".join(filter(None, [slurm.setup, threads])))

    launcher = SlurmLauncher(slurm, config.accelerate_config, manifest, Path.cwd(), detach=detach)
    return [[] for _ in range(max(config.num_policies, len(config.baselines), 1))], launcher


def _iteration(loop: _Loop, i: int, init: Path, init_hash: str) -> tuple[Path, str]:
    """Iteration i: M runs from `init` (stage 1), then their merge and LITI (stages 2 and 3).
    Returns the next iteration's init and its fingerprint."""
    config, it_dir, m_total = loop.config, loop.out / f"iter_{i}", loop.config.num_policies
    specs = [
        RunSpec(i, m, init, it_dir / f"run_{m}", config.seed + (i - 1) * m_total + (m - 1), config.rl)
        for m in range(1, m_total + 1)
    ]
    _train(loop, specs, {s.key: fingerprint([init_hash, s.rl, s.data_seed]) for s in specs}, iteration=i)
    _merge_step(loop, i, init, init_hash, specs)
    return it_dir / "next_init", loop.manifest.output_hash(f"iter_{i}/merge", "next_init")


def _train(
    loop: _Loop, specs: list[RunSpec], fingerprints: dict[str, str], iteration: int | None = None
) -> None:
    runs = run_steps(specs, fingerprints)
    todo = [k for k, (_, step) in runs.items() if not loop.manifest.done(step)]
    if todo:
        loop.did_work = True
        what = f"iteration {iteration}/{loop.config.iterations}" if iteration else "baselines"
        log.info("%s: training %d of %d runs", what, len(todo), len(specs))
    train_runs(runs, loop.slots, loop.train_fn, loop.manifest)


def _merge_step(loop: _Loop, i: int, init: Path, init_hash: str, specs: list[RunSpec]) -> None:
    """Stage 2 (merge of the M policies) and stage 3 (LITI) of iteration i, as one manifest step."""
    config, it_dir = loop.config, loop.out / f"iter_{i}"
    merged, next_init = it_dir / "merged", it_dir / "next_init"
    policy_hashes = [loop.manifest.steps[s.key]["outputs"][s.policy_dir.name] for s in specs]
    merge_params = [
        config.merge_method, config.merge_granularity, config.merge_weights, config.merge_kwargs, config.liti_eta
    ]  # fmt: skip
    step = Step(f"iter_{i}/merge", fingerprint([init_hash, policy_hashes, merge_params]), [merged, next_init])

    def merge() -> dict[str, Any]:
        log.info(
            "iteration %d: %s of %d policies, then LITI eta=%s -> %s",
            i, config.merge_method, len(specs), config.liti_eta, next_init,
        )  # fmt: skip
        stats = loop.merge_fn(
            init=init, policies=[s.policy_dir for s in specs], merged_out=merged, next_init_out=next_init,
            config=config,
        )  # fmt: skip
        write_atomic(it_dir / "merge_stats.json", json.dumps(stats, indent=1, default=float))
        summary = merge_summary(stats)
        if summary:
            log.info("iteration %d merge: %s", i, ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        return {"summary": summary}

    loop.did_work |= loop.manifest.run(step, merge)


def _front_steps(loop: _Loop) -> None:
    """The final front (1 - η) sft + η merged_I for each η of `front_etas`, one folder per η."""
    config = loop.config
    final_merged = loop.out / f"iter_{config.iterations}" / "merged"
    merged_hash = loop.manifest.steps[f"iter_{config.iterations}/merge"]["outputs"]["merged"]
    for eta in config.front_etas:
        point = loop.out / "front" / f"eta_{eta:g}"
        step = Step(f"front/eta_{eta:g}", fingerprint([loop.sft_hash, merged_hash, eta]), [point])

        def write_point(point: Path = point, eta: float = eta) -> dict[str, Any]:
            liti_folder(loop.sft, final_merged, point, eta, config.allow_extrapolation)
            return {"eta": eta}

        loop.did_work |= loop.manifest.run(step, write_point)


def merge_summary(stats: dict[str, float]) -> dict[str, float]:
    """Means over groups of the per-group merge metrics (`merge/<group>/<metric>` -> `<metric>_mean`)."""
    by_metric: dict[str, list[float]] = {}
    for key, value in stats.items():
        if math.isfinite(value):
            by_metric.setdefault(key.rsplit("/", 1)[-1], []).append(value)
    return {
        f"{m}_mean": sum(v) / len(v) for m, v in by_metric.items() if m in ("angle_deg", "cos", "merged_norm")
    }


def _report(loop: _Loop, init: Path) -> None:
    config, out = loop.config, loop.out
    lines = [f"artefacts under {out}:"]
    for i in range(1, config.iterations + 1):
        runs = ", ".join(f"iter_{i}/run_{m}/policy" for m in range(1, config.num_policies + 1))
        lines.append(
            f"  iteration {i}: policies {runs}; merged iter_{i}/merged; next init iter_{i}/next_init; "
            f"geometry iter_{i}/merge_stats.json"
        )
    if config.front_etas:
        lines.append(f"  front: {', '.join(f'front/eta_{e:g}' for e in config.front_etas)}")
    for b in config.baselines:
        final = {**config.rl, **b.get("rl", {})}.get("final_policy", "last")
        what = "checkpoints: its trajectory" if final == "last" else f"the {final} mean of its checkpoints"
        lines.append(f"  baseline {b['name']}: baselines/{b['name']}/policy ({what})")
    lines.append(f"  manifest: {MANIFEST_NAME}; per-run logs: iter_*/run_*/train.log (and report_to)")
    log.info("\n".join(lines))
    if not loop.did_work:
        log.info(
            "nothing to do: all %d runs and %d merges in %s are complete and verified.",
            config.iterations * config.num_policies, config.iterations, out / MANIFEST_NAME,
        )  # fmt: skip
    log.info("final init: %s", init)


def validate_rl_section(config: WarpConfig) -> None:
    """Everything the config names, checked before the first run (`warpkit.loop.preflight.preflight`)."""
    preflight(config)


def main(argv: Sequence[str] | None = None) -> Path:
    """`warpkit train CONFIG [--output_dir DIR] [--any.config.field VALUE ...] [--detach]`."""
    from warpkit._util.log import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        print(WarpConfig.__doc__)
        raise SystemExit(0)
    setup_logging()
    detach = "--detach" in argv[1:]
    config = load_config(argv[0], [a for a in argv[1:] if a != "--detach"])
    signal.signal(signal.SIGTERM, _interrupted)  # SIGTERM (scancel of the driver, kill) as Ctrl-C: clean stop
    return run_warp(config, validate=validate_rl_section, detach=detach)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

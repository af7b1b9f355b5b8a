"""Launching RL runs: what a run is (`RunSpec`), how it is started (`accelerate launch` subprocesses), and
where (disjoint GPU sets, side by side, when the machine has more GPUs than a run needs).

Each run is a fresh `accelerate launch -m warpkit.loop.rl --config warp_run.yaml` process, so no process
state leaks between runs. The training step is injected (`TrainFn`), so the loop is testable in
milliseconds with a fake trainer.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from warpkit.loop.manifest import Manifest, Step, pending
from warpkit.loop.rl import POLICY_DIRNAME
from warpkit.loop.slurm import accelerate_command

__all__ = [
    "FINGERPRINT_NAME",
    "RunFailedError",
    "RunSpec",
    "TrainFn",
    "accelerate_launcher",
    "cpu_threads",
    "gpu_slots",
    "train_runs",
    "visible_gpus",
]

FINGERPRINT_NAME = ".warpkit_fingerprint"  # the inputs a run folder was started with (resume only those)
log = logging.getLogger(__name__)


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
        return self.output_dir / POLICY_DIRNAME

    def run_config(self) -> dict[str, Any]:
        return {
            **self.rl,
            "model_name_or_path": str(self.init),
            "output_dir": str(self.output_dir),
            "data_seed": self.data_seed,
        }


# Trains one run (spec, extra environment) and may return more info for its manifest record. A launcher
# object may also have `prepare(spec, inputs)` (instead of `prepare_run_dir`), and `interrupt()` (called when
# the driver is interrupted while runs go on).
TrainFn = Callable[[RunSpec, "dict[str, str]"], "dict[str, Any] | None"]


class RunFailedError(RuntimeError):
    """An RL run ended with an error: the message names the run, the cause, the log and its last lines."""


def failure_message(key: str, returncode: int, log_path: Path, lines: int = 25) -> str:
    """`<run> failed (exit N): <the last error line of its log>` then the log's path and its last lines."""
    tail = log_path.read_text(errors="replace").splitlines()[-200:] if log_path.is_file() else []
    errors = [line.strip() for line in tail if re.match(r"^\s*\w*(Error|Exception)\b", line.strip())]
    cause = errors[-1] if errors else "no error line in the log"
    return f"{key} failed (exit {returncode}): {cause}\nlog: {log_path}, last lines:\n" + "\n".join(
        tail[-lines:]
    )


def gpu_slots(n_gpus: int, gpus_per_run: int) -> list[list[int]]:
    """Disjoint GPU sets for runs side by side: 8 GPUs, 2 per run -> [[0, 1], [2, 3], [4, 5], [6, 7]].

    Fewer GPUs than one run needs (or none) gives a single slot with no GPU list: runs go one after another.
    """
    if gpus_per_run < 1:
        raise ValueError(f"gpus_per_run={gpus_per_run} must be >= 1.")
    if n_gpus < gpus_per_run:
        return [[]]
    return [list(range(s * gpus_per_run, (s + 1) * gpus_per_run)) for s in range(n_gpus // gpus_per_run)]


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def cpu_threads(num_processes: int, side_by_side: int, cores: int | None = None) -> int:
    """CPU threads per training process: this machine's cores (those this process may use) shared equally
    among the processes of the runs that go at once; at least 1. 2 cores, one run of one process -> 2."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(cores // (num_processes * side_by_side), 1)


def accelerate_launcher(
    accelerate_config: str | None, num_processes: int, threads: int | None = None
) -> TrainFn:
    """Train a run as `accelerate launch [--config_file X] --num_processes N [--num_cpu_threads_per_process T]
    -m warpkit.loop.rl --config run.yaml`."""

    def train(spec: RunSpec, env: dict[str, str]) -> None:
        port = int(env.get("WARPKIT_PORT", "29500"))
        run_yaml = spec.output_dir / "warp_run.yaml"
        cmd = accelerate_command(accelerate_config, num_processes, port, run_yaml, threads=threads)
        log_path = spec.output_dir / "train.log"
        log.info("%s: %s\n         log: %s", spec.key, " ".join(cmd[2:]), log_path)
        with open(log_path, "ab") as out:
            proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RunFailedError(failure_message(spec.key, proc.returncode, log_path))

    return train


def prepare_run_dir(spec: RunSpec, inputs: str) -> None:
    """Keep an interrupted run of the same inputs (to resume it); wipe one of other inputs."""
    marker = spec.output_dir / FINGERPRINT_NAME
    if spec.output_dir.exists() and (not marker.is_file() or marker.read_text() != inputs):
        shutil.rmtree(spec.output_dir)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(inputs)
    (spec.output_dir / "warp_run.yaml").write_text(yaml.safe_dump(spec.run_config(), sort_keys=True))
    if spec.policy_dir.exists():  # a policy not in the manifest is not trusted
        shutil.rmtree(spec.policy_dir)


def _train_one(
    spec: RunSpec, step: Step, gpus: list[int], port_offset: int, train_fn: TrainFn
) -> dict[str, Any]:
    getattr(train_fn, "prepare", prepare_run_dir)(spec, step.inputs)  # a scheduler may re-attach instead
    env = {"WARPKIT_PORT": str(29500 + port_offset)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    log.info("%s: training from %s (data_seed=%s)", spec.key, spec.init, spec.data_seed)
    info = train_fn(spec, env) or {}  # what a launcher adds to the run's record (its jobs)
    if not any((spec.policy_dir / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise RuntimeError(f"{spec.key} ended without writing its policy to {spec.policy_dir}.")
    return {"data_seed": spec.data_seed, **info}


def train_runs(
    runs: Mapping[str, tuple[RunSpec, Step]], slots: list[list[int]], train_fn: TrainFn, manifest: Manifest
) -> None:
    """Train each (spec, step) the manifest does not vouch for, at most one per slot at a time (a slot is a
    disjoint GPU set and a port, held for the whole run); one slot means one run after another. An
    interrupted run of the same inputs resumes from its checkpoints (its folder is kept). The first failure
    stops the launching of further runs (runs already going side by side finish) and is raised."""
    todo = set(s.key for s in pending(manifest, [step for _, step in runs.values()]))
    free: queue.Queue[int] = queue.Queue()
    for n in range(len(slots)):
        free.put(n)
    failed = threading.Event()  # fail fast: once a run fails, no further run starts

    def train_in_slot(item: tuple[RunSpec, Step]) -> None:
        spec, step = item
        n = free.get()
        try:
            if failed.is_set():
                log.info("%s: not started, another run failed.", spec.key)
                return
            manifest.run(step, lambda: _train_one(spec, step, slots[n], n, train_fn), clear_outputs=False)
        except BaseException:
            failed.set()
            raise
        finally:
            free.put(n)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        try:
            list(pool.map(train_in_slot, [runs[k] for k in runs if k in todo]))
        except BaseException:
            failed.set()
            if hasattr(train_fn, "interrupt"):  # a scheduler's threads wait on jobs: stop them
                train_fn.interrupt()
            raise


def run_steps(specs: Sequence[RunSpec], fingerprints: Mapping[str, str]) -> dict[str, tuple[RunSpec, Step]]:
    """Each run with its manifest step (its policy folder is the step's output)."""
    return {s.key: (s, Step(s.key, fingerprints[s.key], [s.policy_dir])) for s in specs}

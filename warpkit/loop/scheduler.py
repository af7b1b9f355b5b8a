"""RL runs as SLURM jobs (`launcher: slurm`): submit, re-attach, poll, resubmit, cancel.

Plain `sbatch` / `squeue` / `sacct` / `scontrol` / `scancel` calls, not submitit: a run is already a shell
command (`accelerate launch ...`), so there is no Python callable to pickle, and re-attaching a restarted
driver to its jobs needs only their ids and names, which the manifest keeps (`Manifest.jobs`).

How the driver knows a job's end without accounting storage: the batch script writes the run's exit code to
`slurm-<job>.exit` in the run folder when its `srun` ends. Exit 0 there is success; a job that ends without
it was stopped from outside (cancelled, preempted, out of time, node failure) or failed, and is resubmitted;
the state `sacct` or `scontrol` gives (when they still know the job) is recorded and shown.

Never a second submission of one run: each job's name is unique to (output_dir, run, inputs), so a driver
killed between `sbatch` and writing the manifest finds its job in `squeue` by name. A queued or running job
of the same run with other inputs (a config changed after `--detach`, or after a crash) is cancelled before
the run's folder is touched: re-attaching to it would record its result as the new inputs'.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from warpkit.loop.launch import FINGERPRINT_NAME, RunFailedError, RunSpec, failure_message, prepare_run_dir
from warpkit.loop.manifest import Manifest
from warpkit.loop.slurm import EXIT_MARKER, SlurmConfig, batch_script

__all__ = ["LIVE_STATES", "SlurmError", "SlurmLauncher", "check_slurm", "job_state"]

log = logging.getLogger(__name__)

# squeue's states of a job that is not over yet
LIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}  # fmt: skip


class SlurmError(RunFailedError):
    """A scheduler command failed (e.g. sbatch refused a job): the command and what it printed; exit 1."""


def _slurm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    except FileNotFoundError as e:
        raise SlurmError(f"{args[0]} is not on PATH: launcher: slurm needs the SLURM client commands.") from e
    if check and done.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def check_slurm(config: SlurmConfig) -> None:
    """Before any submission: sbatch on PATH, the partition known to the scheduler. ValueError otherwise."""
    for command in ("sbatch", "squeue", "scancel"):
        if shutil.which(command) is None:
            raise ValueError(
                f"launcher: slurm, but {command} is not on PATH; run the driver on a SLURM login node (or use "
                "launcher: local)."
            )
    if config.partition is not None:
        done = _slurm("sinfo", "-h", "-o", "%R", check=False)
        known = sorted({p.strip() for p in done.stdout.split()})
        if done.returncode == 0 and config.partition not in known:
            raise ValueError(
                f"slurm.partition={config.partition!r} is not a partition of this cluster; choose one of "
                f"{known} (sinfo lists them)."
            )
    # The scheduler's own verdict on the whole request (account, qos, limits), without submitting anything.
    flags = config.sbatch_flags()
    done = _slurm("sbatch", "--test-only", *flags, "--wrap", "true", check=False)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise ValueError(
            f"sbatch --test-only refuses the slurm settings {' '.join(flags)}: {why}. Fix the slurm section "
            "(e.g. slurm.cpus_per_task, slurm.mem, slurm.account)."
        )


def job_state(job_id: str) -> str:
    """The scheduler's state of a job ("RUNNING", "COMPLETED", "CANCELLED", ...; "UNKNOWN" when neither
    squeue, sacct nor scontrol knows it any more)."""
    done = _slurm("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.split()[0]
    done = _slurm("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State", check=False)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.split()[0]
    done = _slurm("scontrol", "show", "job", "-o", job_id, check=False)
    for field in done.stdout.split() if done.returncode == 0 else []:
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


class SlurmLauncher:
    """The `TrainFn` of `launcher: slurm`: each call trains one run as a job and returns when it is over.

    Calls for the runs of an iteration go side by side (one thread each, `train_runs`); the manifest keeps
    every job of every run (`Manifest.jobs`), which is how a restarted driver re-attaches.
    """

    def __init__(
        self,
        config: SlurmConfig,
        accelerate_config: str | None,
        manifest: Manifest,
        workdir: Path,
        *,
        detach: bool = False,
    ) -> None:
        """`workdir`: the jobs' working folder; `detach`: an interrupted driver leaves its jobs running."""
        self.config, self.accelerate_config, self.manifest = config, accelerate_config, manifest
        self.workdir, self.detach = workdir, detach
        self.stopping = threading.Event()
        self.live: dict[str, str] = {}  # run key -> job id of a job this driver is waiting on
        self._states: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def run_prefix(spec: RunSpec) -> str:
        """`warpkit-<hash of output_dir>-iter_1-run_2-`: the names of a run's jobs (one prefix per WARP run
        up to the run key)."""
        out = spec.output_dir.resolve().parent.parent  # output_dir/iter_i/run_m, output_dir/baselines/name
        where = hashlib.sha256(str(out).encode()).hexdigest()[:8]
        return f"warpkit-{where}-{spec.key.replace('/', '-')}-"

    def job_name(self, spec: RunSpec, inputs: str) -> str:
        """`run_prefix` + a hash of the run's inputs: unique to the run and what it was started with."""
        return self.run_prefix(spec) + hashlib.sha256(inputs.encode()).hexdigest()[:8]

    def prepare(self, spec: RunSpec, inputs: str) -> None:
        """As the local launcher, but a run whose job is live or ended well keeps its folder untouched, and
        jobs of the run started with other inputs are cancelled first (they would write into it)."""
        self._cancel_stale(spec, inputs)
        if self._recorded_job(spec, inputs) is None:
            prepare_run_dir(spec, inputs)

    def _queued(self, spec: RunSpec) -> dict[str, str]:
        """job id -> name of the run's jobs in squeue (any inputs)."""
        listed = _slurm("squeue", "-h", "-o", "%i %j", check=False).stdout.splitlines()
        prefix = self.run_prefix(spec)
        return {i: n for i, n in (ln.split(maxsplit=1) for ln in listed if " " in ln) if n.startswith(prefix)}

    def _cancel_stale(self, spec: RunSpec, inputs: str, timeout: float = 120.0) -> None:
        stale = sorted(i for i, n in self._queued(spec).items() if n != self.job_name(spec, inputs))
        if not stale:
            return
        log.warning("%s: cancelling job(s) %s, started with other inputs (the config changed)", spec.key,
                    " ".join(stale))  # fmt: skip
        _slurm("scancel", *stale, check=False)
        end = time.monotonic() + timeout
        while set(stale) & set(self._queued(spec)):  # gone from squeue: it no longer writes to the folder
            if time.monotonic() > end:
                raise SlurmError(f"{spec.key}: job(s) {' '.join(stale)} of other inputs still in squeue "
                                 f"{timeout:.0f} s after scancel; wait for them to end, then run again.")  # fmt: skip
            time.sleep(min(self.config.poll_seconds, 1.0))

    def _recorded_job(self, spec: RunSpec, inputs: str) -> str | None:
        """The run's last recorded job, for these inputs, if it is still queued or running or ended well."""
        jobs = self.manifest.jobs.get(spec.key, [])
        last = jobs[-1] if jobs else {}
        if last.get("inputs") != inputs or last.get("failed"):
            return None
        alive = job_state(last["id"]) in LIVE_STATES
        return last["id"] if alive or _exit_code(spec, last["id"]) == 0 else None

    def __call__(self, spec: RunSpec, env: dict[str, str]) -> dict[str, Any]:
        inputs = (spec.output_dir / FINGERPRINT_NAME).read_text()
        failures = sum(
            1 for j in self.manifest.jobs.get(spec.key, []) if j.get("inputs") == inputs and j.get("failed")
        )
        job_id = self._existing_job(spec, inputs)
        while True:
            if job_id is None:
                job_id = self._submit(spec, inputs, attempt=failures + 1)
            state = self._wait(spec, job_id)
            if _exit_code(spec, job_id) == 0:
                self._record(spec, job_id, inputs, state="COMPLETED")
                return {"slurm_jobs": [j["id"] for j in self.manifest.jobs[spec.key]]}
            failures += 1
            self._record(spec, job_id, inputs, state=state, failed=True)
            if failures > self.config.max_retries:
                raise RunFailedError(
                    failure_message(f"{spec.key} (job {job_id}, {state})", _exit_code(spec, job_id) or 1,
                                    spec.output_dir / "train.log")
                    + f"\nafter {failures} attempts (slurm.max_retries={self.config.max_retries}); job output: "
                    + str(spec.output_dir / f"slurm-{job_id}.out")
                )  # fmt: skip
            log.warning("%s: job %s ended %s; resubmitting (%d of %d retries), it resumes from its last "
                        "checkpoint", spec.key, job_id, state, failures, self.config.max_retries)  # fmt: skip
            job_id = None

    def _existing_job(self, spec: RunSpec, inputs: str) -> str | None:
        """A job of this run still queued or running (recorded, or found by its unique name), or one that
        ended well while no driver watched: re-attach to it instead of submitting."""
        recorded = self._recorded_job(spec, inputs)
        if recorded is not None:
            log.info("%s: re-attached to job %s", spec.key, recorded)
            return recorded
        name = self.job_name(spec, inputs)
        found = sorted(i for i, n in self._queued(spec).items() if n == name)
        if found:
            log.info("%s: re-attached to job %s (found by name)", spec.key, found[0])
            self._record(spec, found[0], inputs, state="PENDING")
            return found[0]
        return None

    def _submit(self, spec: RunSpec, inputs: str, attempt: int) -> str:
        script = spec.output_dir / "slurm_job.sh"
        script.write_text(
            batch_script(
                self.config,
                self.job_name(spec, inputs),
                spec.output_dir,
                self.accelerate_config,
                self.workdir,
            )
        )
        job_id = _slurm("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
        self._record(spec, job_id, inputs, state="PENDING", attempt=attempt)
        log.info(
            "%s: submitted job %s (attempt %d), log %s",
            spec.key,
            job_id,
            attempt,
            spec.output_dir / "train.log",
        )
        return job_id

    def _wait(self, spec: RunSpec, job_id: str) -> str:
        """Poll until the job is over; returns its final state. KeyboardInterrupt once `interrupt` is called."""
        with self._lock:
            self.live[spec.key] = job_id
        try:
            while True:
                state = job_state(job_id)
                self._show(spec.key, job_id, state)
                if state not in LIVE_STATES:
                    return state
                if self.stopping.wait(self.config.poll_seconds):
                    raise KeyboardInterrupt
        finally:
            with self._lock:
                self.live.pop(spec.key, None)

    def _show(self, key: str, job_id: str, state: str) -> None:
        with self._lock:
            if self._states.get(key) == state:
                return
            self._states[key] = state
            line = ", ".join(f"{k} {s}" for k, s in sorted(self._states.items()))
        log.info("slurm jobs: %s (job %s of %s is %s)", line, job_id, key, state)

    def _record(self, spec: RunSpec, job_id: str, inputs: str, **fields: Any) -> None:
        self.manifest.record_job(
            spec.key, {"id": job_id, "inputs": inputs, "name": self.job_name(spec, inputs), **fields}
        )

    def interrupt(self) -> list[str]:
        """Stop waiting (Ctrl-C, SIGTERM) and scancel the jobs being waited on, unless `detach`. Returns their
        ids."""
        self.stopping.set()
        with self._lock:
            ids = sorted(self.live.values())
        if not self.detach and ids:
            _slurm("scancel", *ids, check=False)
            log.warning("cancelled jobs %s (pass --detach to leave them running)", " ".join(ids))
        elif ids:
            log.warning("left jobs %s running (--detach); run the same command to re-attach", " ".join(ids))
        return ids


def _exit_code(spec: RunSpec, job_id: str) -> int | None:
    """The exit code the job's batch script wrote, or None when it did not reach that line."""
    marker = spec.output_dir / EXIT_MARKER.format(job=job_id)
    try:
        return int(marker.read_text().strip())
    except (OSError, ValueError):
        return None

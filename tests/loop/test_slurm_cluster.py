"""`launcher: slurm` against a real one-node SLURM (`.ci/slurm-local start`; skipped where sbatch is absent):
the tiny WARP config through sbatch is bitwise the local run; a driver killed while its jobs run re-attaches
without a second submission; a job cancelled from outside (as a preemption) is resubmitted and resumes from
its checkpoint; a run that always fails stops the driver after max_retries; an unknown partition is refused
before any submission. One test runs with a `sacct` that answers as on a cluster without accounting storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.loop.conftest import REPO, warpkit_cli
from warpkit.testing import load_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="no SLURM here (sbatch not on PATH); CI starts a one-node cluster with .ci/slurm-local start",
    ),
]

# As many CPUs as the local launcher gives a lone run: the same thread count, so the same bits.
CPUS = str(len(os.sched_getaffinity(0)))
SLURM = ["--launcher", "slurm", "--slurm.poll_seconds", "0.5", "--slurm.cpus_per_task", CPUS]
ONE_ITERATION = ["--iterations", "1", "--baselines", "[]", "--frontier", "null", *SLURM]
SLOW_REWARD = ["--rl.reward_funcs", "[tests.loop.slurm_rewards:vader_reward]"]


@pytest.fixture(scope="module", autouse=True)
def cluster_answers():
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip(f"sbatch is here but the cluster does not answer: {done.stderr.strip()}")


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(tmp_path):
    """A test that fails mid-way leaves its jobs queued: cancel them, or a later session, whose tmp paths
    (so job names) repeat, would find them by name and re-attach to them."""
    yield
    prefix = _prefix(tmp_path / "warp")
    listed = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=60)
    left = [line.split()[0] for line in listed.stdout.splitlines() if line.split()[1].startswith(prefix)]
    if left:
        subprocess.run(["scancel", *left], timeout=60, check=False)


def _prefix(out: Path) -> str:
    """The job-name prefix of a WARP run writing to `out` (SlurmLauncher.job_name; the first test checks it)."""
    return f"warpkit-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}-"


def _jobs(out: Path) -> dict[str, list[str]]:
    """run key -> the ids of its jobs, as the manifest recorded them."""
    manifest = json.loads((out / "warp_manifest.json").read_text())
    return {key: [j["id"] for j in jobs] for key, jobs in manifest.get("jobs", {}).items()}


def _now() -> str:
    """The wall clock as sacct's -S reads it (local time, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _scheduler_count(names: list[str], since: str) -> dict[str, int]:
    """How many jobs sacct knows by each name, among those alive at or after `since`: the accounting
    database outlives a test session, and a second session on the same machine reuses the same tmp paths
    (so the same job names); jobs of an earlier session ended before `since`."""
    done = subprocess.run(["sacct", "-n", "-P", "-X", "-S", since, "--name", ",".join(names), "-o",
                           "JobName"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split()
    return {n: listed.count(n) for n in names}


def _same_next_init(out: Path, reference: Path) -> None:
    got, want = load_state(out / "iter_1" / "next_init"), load_state(reference / "iter_1" / "next_init")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_the_tiny_config_through_slurm_is_bitwise_the_local_run(warp_tiny_run, tmp_path):
    """The whole tiny config (I = 2, M = 2, a baseline, the frontier), each run a job: one job per run in
    sacct, the final init bitwise the local launcher's."""
    reference, finished, env = warp_tiny_run
    assert finished.returncode == 0, finished.stderr[-3000:]
    out, since = tmp_path / "warp", _now()
    done = warpkit_cli("train", "configs/warp_tiny.yaml", "--output_dir", str(out), *SLURM, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("iter_1/next_init", "iter_2/next_init"):
        got, want = load_state(out / name), load_state(reference / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    jobs = _jobs(out)
    runs = [f"iter_{i}/run_{m}" for i in (1, 2) for m in (1, 2)] + ["baselines/sft_anchor_beta0_1"]
    assert sorted(jobs) == sorted(runs) and all(len(ids) == 1 for ids in jobs.values())
    manifest = json.loads((out / "warp_manifest.json").read_text())
    names = [manifest["jobs"][k][0]["name"] for k in sorted(jobs)]
    assert all(n.startswith(_prefix(out)) for n in names), names
    assert _scheduler_count(names, since) == {n: 1 for n in names}  # sacct: one job per run
    assert all(manifest["steps"][k]["slurm_jobs"] == jobs[k] for k in jobs)
    assert (out / "frontier" / "frontier.json").is_file()


def _squeue(prefix: str) -> dict[str, str]:
    done = subprocess.run(["squeue", "-h", "-o", "%j %i %T"], capture_output=True, text=True, timeout=60)
    return {f"{line.split()[0]}": line.split()[2] for line in done.stdout.splitlines() if prefix in line}


def _wait(condition, timeout: float = 300, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _no_accounting(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """A PATH whose `sacct` answers like a cluster without accounting storage."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sacct = bin_dir / "sacct"
    sacct.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    sacct.chmod(0o755)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


def test_driver_killed_reattaches_and_a_cancelled_job_resumes_without_accounting(warp_tiny_run, tmp_path):
    reference, _, env = warp_tiny_run
    env = _no_accounting(tmp_path, {**env, "WARPKIT_TEST_REWARD_SLEEP": "1.5"})
    out, since = tmp_path / "warp", _now()
    cmd = [sys.executable, "-m", "warpkit.cli", "train", "configs/warp_tiny.yaml", "--output_dir", str(out),
           *ONE_ITERATION, *SLOW_REWARD]  # fmt: skip
    log = open(tmp_path / "driver.log", "ab")  # noqa: SIM115 - closed at the end
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    _wait(lambda: (out / "warp_manifest.json").is_file() and len(_jobs(out)) == 2, what="two submissions")
    prefix = json.loads((out / "warp_manifest.json").read_text())["jobs"]["iter_1/run_1"][0]["name"][:16]
    _wait(lambda: list(_squeue(prefix).values()) == ["RUNNING", "RUNNING"], what="both jobs running")
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies; its jobs go on
    driver.wait()
    first = _jobs(out)

    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    run_1 = out / "iter_1" / "run_1"
    _wait(lambda: (run_1 / "checkpoint-1" / "trainer_state.json").is_file(), what="run_1's first checkpoint")
    assert not (run_1 / "policy").exists(), "run_1 finished before it could be cancelled"
    subprocess.run(["scancel", first["iter_1/run_1"][0]], check=True, timeout=60)  # a preemption
    assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    log.close()

    jobs = _jobs(out)
    assert jobs["iter_1/run_2"] == first["iter_1/run_2"]  # re-attached: never submitted twice
    assert len(jobs["iter_1/run_1"]) == 2 and jobs["iter_1/run_1"][0] == first["iter_1/run_1"][0]
    names = {k: v[0]["name"] for k, v in json.loads((out / "warp_manifest.json").read_text())["jobs"].items()}
    counts = _scheduler_count(list(names.values()), since)  # the real sacct: what the scheduler ran
    assert counts == {names["iter_1/run_1"]: 2, names["iter_1/run_2"]: 1}
    info = json.loads((run_1 / "run_info.json").read_text())
    assert info["resumed_from"] is not None and "checkpoint-" in info["resumed_from"]
    driver_log = (tmp_path / "driver.log").read_text()
    assert "re-attached to job" in driver_log and "resubmitting" in driver_log
    _same_next_init(out, reference)


def test_a_run_that_always_fails_stops_the_driver_after_max_retries(warp_tiny_run, tmp_path):
    _, _, env = warp_tiny_run
    out = tmp_path / "warp"
    done = warpkit_cli(
        "train", "configs/warp_tiny.yaml", "--output_dir", str(out), *ONE_ITERATION, "--num_policies", "1",
        "--rl.reward_funcs", "[tests.loop.slurm_rewards:broken_reward]", "--slurm.max_retries", "1", env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "iter_1/run_1 (job" in done.stderr and "broken_reward always fails" in done.stderr
    assert "after 2 attempts (slurm.max_retries=1)" in done.stderr
    assert len(_jobs(out)["iter_1/run_1"]) == 2


def test_an_unknown_partition_is_refused_before_any_submission(warp_tiny_run, tmp_path):
    _, _, env = warp_tiny_run
    out = tmp_path / "warp"
    done = warpkit_cli("train", "configs/warp_tiny.yaml", "--output_dir", str(out), *ONE_ITERATION,
                       "--slurm.partition", "nope", env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "slurm.partition='nope' is not a partition of this cluster" in done.stderr
    assert not (out / "warp_manifest.json").exists()
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    done = warpkit_cli("train", "configs/warp_tiny.yaml", "--output_dir", str(out), *ONE_ITERATION,
                       "--slurm.cpus_per_task", str(cpus * 32), env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        "sbatch --test-only refuses the slurm settings" in done.stderr
        and "Fix the slurm section" in done.stderr
    )
    assert not (out / "warp_manifest.json").exists()


def test_sigterm_cancels_the_jobs_unless_detached(warp_tiny_run, tmp_path):
    """SIGTERM (or Ctrl-C) of the driver: its jobs are cancelled; with --detach they go on, and the next
    driver re-attaches to them. The result is still the local run's, bit for bit."""
    reference, _, env = warp_tiny_run
    env = {**env, "WARPKIT_TEST_REWARD_SLEEP": "1.5"}
    out = tmp_path / "warp"
    cmd = [sys.executable, "-m", "warpkit.cli", "train", "configs/warp_tiny.yaml", "--output_dir", str(out),
           *ONE_ITERATION, *SLOW_REWARD]  # fmt: skip

    def start_and_terminate(*extra: str) -> tuple[list[str], str]:
        """Start a driver, SIGTERM it once both jobs run; (the ids of those jobs, its stderr)."""
        known = {k: len(v) for k, v in _jobs(out).items()} if (out / "warp_manifest.json").is_file() else {}
        driver = subprocess.Popen([*cmd, *extra], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        _wait(lambda: (out / "warp_manifest.json").is_file()
              and all(len(v) > known.get(k, 0) for k, v in _jobs(out).items()) and len(_jobs(out)) == 2,
              what="two new submissions")  # fmt: skip
        ids = [v[-1] for v in _jobs(out).values()]
        _wait(lambda: all(_state(i) == "RUNNING" for i in ids), what="both jobs running")
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
        assert driver.returncode == 130 and "interrupted; run the same command again" in err, err[-3000:]
        return ids, err

    cancelled, err = start_and_terminate()
    assert "cancelled jobs" in err
    _wait(lambda: all(_state(i).startswith("CANCELLED") for i in cancelled), 60, "the jobs cancelled")
    detached, err = start_and_terminate("--detach")
    assert set(detached).isdisjoint(cancelled) and "left jobs" in err and "running (--detach)" in err
    assert all(_state(i) in ("RUNNING", "COMPLETING", "COMPLETED") for i in detached)
    done = warpkit_cli("train", "configs/warp_tiny.yaml", "--output_dir", str(out), *ONE_ITERATION,
                       *SLOW_REWARD, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [v[-1] for v in _jobs(out).values()] == detached and "re-attached to job" in done.stderr
    assert all(len(v) == 2 for v in _jobs(out).values())  # one cancelled, one detached and re-attached
    _same_next_init(out, reference)


def _state(job_id: str) -> str:
    from warpkit.loop.scheduler import job_state

    return job_state(job_id)


def test_jobs_left_running_with_other_inputs_are_cancelled_not_adopted(warp_tiny_run, tmp_path):
    """--detach leaves the jobs running; the same command with another learning rate must not re-attach to
    them (their result would be recorded as the new inputs'): it cancels them before it touches their
    folders, and trains its own jobs, named after the new inputs."""
    _, _, env = warp_tiny_run
    env = {**env, "WARPKIT_TEST_REWARD_SLEEP": "1.5"}
    out = tmp_path / "warp"
    cmd = [sys.executable, "-m", "warpkit.cli", "train", "configs/warp_tiny.yaml", "--output_dir", str(out),
           *ONE_ITERATION, *SLOW_REWARD]  # fmt: skip
    driver = subprocess.Popen([*cmd, "--detach"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (out / "warp_manifest.json").is_file() and len(_jobs(out)) == 2, what="two submissions")
    old = {k: v[-1] for k, v in _jobs(out).items()}
    _wait(lambda: all(_state(i) == "RUNNING" for i in old.values()), what="both jobs running")
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert "running (--detach)" in err, err[-3000:]

    done = subprocess.run([*cmd, "--rl.learning_rate", "3e-4"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started with other inputs" in done.stderr
    assert all(_state(i).startswith("CANCELLED") for i in old.values())
    manifest = json.loads((out / "warp_manifest.json").read_text())
    for key, old_id in old.items():
        first, last = manifest["jobs"][key][0], manifest["jobs"][key][-1]
        assert last["id"] != old_id and last["inputs"] != first["inputs"]
        # the same run's prefix, a new inputs hash
        assert last["name"] != first["name"] and last["name"][:-8] == first["name"][:-8]
        run = out / key
        assert (run / ".warpkit_fingerprint").read_text() == last["inputs"]
        assert float(yaml.safe_load((run / "warp_run.yaml").read_text())["learning_rate"]) == 3e-4
        assert not list(run.glob(f"slurm-{old_id}.*")), "the cancelled job wrote into the new run's folder"

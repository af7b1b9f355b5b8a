"""`launcher: slurm` without a cluster: the slurm section's checks, time limits, host lists, the batch script,
and each node's multi-node `accelerate launch` command from a given SLURM environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from warpkit._util.config import ConfigError
from warpkit.loop.config import WarpConfig, load_config
from warpkit.loop.launch import cpu_threads
from warpkit.loop.scheduler import check_slurm
from warpkit.loop.slurm import (
    SlurmConfig,
    accelerate_command,
    batch_script,
    expand_nodelist,
    job_port,
    node_command,
    parse_time,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 5400), ("5:30", 330), ("4:00:00", 14400), ("2-12", 216000), ("1-02:03", 93780),
     ("1-00:00:00", 86400), ("0:0:1", 1), ("UNLIMITED", 0), ("infinite", 0)],
)  # fmt: skip
def test_time_limits_parse_as_sbatch_reads_them(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1h", "4:00:00:00", "-5", "1-", "1.5", ""])
def test_a_time_limit_that_does_not_parse_is_refused_with_the_formats(text):
    with pytest.raises(ValueError, match=rf"^slurm\.time='{text}' is not a SLURM time limit; write minutes"):
        parse_time(text)


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        ({"nodes": 0}, r"^slurm\.nodes=0: a run needs at least one node"),
        ({"time": "tomorrow"}, r"^slurm\.time='tomorrow' is not a SLURM time limit"),
        ({"gpus_per_node": -1}, r"^slurm\.gpus_per_node=-1 must be >= 0"),
        ({"max_retries": -1}, r"^slurm\.max_retries=-1 must be >= 0"),
        ({"partiton": "gpu"}, r"^slurm: unknown field\(s\) \['partiton'\]"),
        ({"nodes": "two"}, r"slurm.*nodes"),
    ],
)
def test_bad_slurm_settings_are_refused_when_the_config_loads(slurm, message):
    with pytest.raises(ConfigError, match=message):
        WarpConfig(model_name_or_path="m", launcher="slurm", slurm=slurm)


def test_launcher_choice_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"^launcher='pbs': choose one of \['local', 'slurm'\]"):
        WarpConfig(model_name_or_path="m", launcher="pbs")
    with pytest.raises(ConfigError, match="a slurm section is set but launcher is local"):
        WarpConfig(model_name_or_path="m", slurm={"partition": "gpu"})
    path = tmp_path / "w.yaml"
    path.write_text("model_name_or_path: m\n")
    config = load_config(path, ["--launcher", "slurm", "--slurm.partition", "gpu", "--slurm.nodes", "2"])
    assert config.slurm_config() == SlurmConfig(partition="gpu", nodes=2)
    assert load_config(path).slurm_config() is None


def test_expand_nodelist_as_scontrol_show_hostnames():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_each_node_launches_with_its_rank_the_main_address_and_the_job_port():
    """2 nodes x 8 GPUs, job 123456 on gpu[07-08]: rank from SLURM_NODEID, main process on gpu07."""
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}  # fmt: skip
    cmd = node_command(env, "accelerate_configs/zero3.yaml", Path("run.yaml"), 8)
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "gpu07" and flags["--num_processes"] == "16"
    assert flags["--main_process_port"] == str(29500 + 123456 % 10000) == str(job_port("123456"))
    assert flags["--config_file"].endswith("accelerate_configs/zero3.yaml")
    assert cmd[-4:] == ["-m", "warpkit.loop.rl", "--config", "run.yaml"]
    rank0 = node_command({**env, "SLURM_NODEID": "0"}, None, Path("run.yaml"), 8)
    assert rank0[rank0.index("--machine_rank") + 1] == "0" and "--multi_gpu" in rank0


def test_one_node_runs_exactly_the_local_launchers_command():
    """Same command, same bits: a single-node job runs what `accelerate_launcher` runs locally, its CPU
    threads included (the task's CPUs, as the local launcher gives a lone run every core)."""
    env = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_ID": "7"}
    got = node_command({**env, "SLURM_CPUS_PER_TASK": "2"}, None, Path("r.yaml"), 1)
    local = accelerate_command(None, 1, job_port(7), Path("r.yaml"), threads=cpu_threads(1, 1, cores=2))
    assert got == local and got[got.index("--num_cpu_threads_per_process") + 1] == "2"
    assert "--machine_rank" not in got and "--main_process_ip" not in got
    # no --cpus-per-task: SLURM's default, and accelerate's; an OMP_NUM_THREADS the user set is kept
    assert "--num_cpu_threads_per_process" not in node_command(env, None, Path("r.yaml"), 1)
    kept = node_command({**env, "SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "3"}, None, Path("r.yaml"), 1)
    assert "--num_cpu_threads_per_process" not in kept
    eight = node_command({**env, "SLURM_CPUS_PER_TASK": "32"}, None, Path("r.yaml"), 8)  # 8 GPUs, 32 CPUs
    assert eight[eight.index("--num_cpu_threads_per_process") + 1] == "4"


def test_cpu_threads_share_the_cores_among_the_processes_that_run_at_once():
    assert cpu_threads(1, 1, cores=2) == 2  # one run after another: all the cores
    assert cpu_threads(2, 1, cores=2) == 1  # a 2-process DDP run on 2 cores
    assert cpu_threads(2, 4, cores=64) == 8  # 4 runs side by side, 2 processes each
    assert cpu_threads(4, 2, cores=2) == 1  # never fewer than one


def test_the_batch_script(tmp_path):
    config = SlurmConfig(partition="gpu", account="proj", qos="high", time="4:00:00", nodes=2, gpus_per_node=8,
                         cpus_per_task=32, mem="200G", extra_sbatch=["--exclusive"], setup="module load cuda",
                         python="/opt/venv/bin/python")  # fmt: skip
    script = batch_script(config, "warpkit-x-iter_1-run_1", tmp_path / "run_1", None, tmp_path)
    lines = script.splitlines()
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--partition=gpu", "--account=proj", "--qos=high",
                 "--time=4:00:00", "--cpus-per-task=32", "--mem=200G", "--gpus-per-node=8", "--exclusive",
                 "--job-name=warpkit-x-iter_1-run_1", f"--output={tmp_path}/run_1/slurm-%j.out"):  # fmt: skip
        assert f"#SBATCH {flag}" in lines, flag
    assert lines[0] == "#!/bin/bash" and "module load cuda" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert f"/opt/venv/bin/python -m warpkit.loop.slurm {tmp_path}/run_1/warp_run.yaml 8" in srun
    assert lines[-1] == "exit $rc" and "slurm-${SLURM_JOB_ID}.exit" in lines[-2]


def test_no_sbatch_on_path_is_refused_before_any_submission(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match=r"^launcher: slurm, but sbatch is not on PATH"):
        check_slurm(SlurmConfig())

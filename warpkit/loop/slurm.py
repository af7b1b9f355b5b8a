"""One RL run as one SLURM job: the `slurm:` section of a WARP config, the batch script, and the command each
node runs (`accelerate launch` with its machine rank, the main node's address and a port, from SLURM's
environment). Pure: nothing here talks to the scheduler (`warpkit.loop.scheduler` does).

A job of `nodes` nodes runs one task per node (`srun --ntasks-per-node=1`); each task starts
`accelerate launch --num_machines N --machine_rank $SLURM_NODEID --main_process_ip <first node>
--num_processes N * gpus_per_node`, which starts one training process per GPU. With one node the command is
exactly the local launcher's, so a run trains the same bits wherever it runs.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from warpkit._util.config import ConfigError

__all__ = [
    "EXIT_MARKER",
    "SlurmConfig",
    "accelerate_command",
    "batch_script",
    "expand_nodelist",
    "node_command",
    "parse_time",
]

EXIT_MARKER = "slurm-{job}.exit"  # written by the batch script when its srun ends: the run's exit code

_TIME = re.compile(
    r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # D-H, D-H:M, D-H:M:S
    r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$"  # M, M:S, H:M:S
)


def parse_time(value: str) -> int:
    """Seconds of a SLURM time limit ("30", "4:00:00", "2-12", "1-00:00:00"; sbatch's formats), or
    ValueError. "UNLIMITED"/"INFINITE" give 0 (no limit)."""
    text = str(value).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return 0
    m = _TIME.match(text)
    if not m:
        raise ValueError(
            f"slurm.time={value!r} is not a SLURM time limit; write minutes (90), H:MM:SS (4:00:00) or "
            "D-HH:MM:SS (1-00:00:00)."
        )
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        return ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    if "c" in g:  # H:M:S
        return (g["a"] * 60 + g["b"]) * 60 + g["c"]
    return g["a"] * 60 + g.get("b", 0)  # M or M:S


@dataclass
class SlurmConfig:
    """The `slurm:` section of a WARP config (`launcher: slurm`): where and how each RL run is submitted.

    Args:
        partition, account, qos: sbatch's `--partition`, `--account`, `--qos` (None: the cluster's default).
        time: each job's time limit in sbatch's format (`4:00:00`, `1-00:00:00`); a job stopped by it is
            resubmitted and resumes from its last checkpoint, so it may be shorter than the run.
        nodes: nodes per run (multi-node `accelerate launch` when > 1).
        gpus_per_node: GPUs per node (`--gpus-per-node`); one training process per GPU. 0: one CPU process.
        cpus_per_task: CPUs of each node's task (`--cpus-per-task`).
        mem: memory per node (`--mem`, e.g. `200G`).
        extra_sbatch: more sbatch flags, verbatim (e.g. `[--constraint=h100, --exclusive]`).
        setup: shell lines run on the node before the launch (`module load cuda; source .venv/bin/activate`).
        python: the Python that runs warpkit on the nodes (default: the driver's, on a shared file system).
        max_retries: how often a job that ends FAILED, TIMEOUT, PREEMPTED, NODE_FAIL or cancelled from
            outside is resubmitted (each resumes from the run's last complete checkpoint) before the driver
            stops with its log.
        poll_seconds: how often the driver asks the scheduler for the jobs' states.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    setup: str = ""
    python: str | None = None
    max_retries: int = 2
    poll_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"slurm.nodes={self.nodes}: a run needs at least one node (nodes >= 1).")
        if self.gpus_per_node < 0:
            raise ConfigError(f"slurm.gpus_per_node={self.gpus_per_node} must be >= 0 (0: CPU only).")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"slurm.cpus_per_task={self.cpus_per_task} must be >= 1 (or unset).")
        if self.max_retries < 0:
            raise ConfigError(f"slurm.max_retries={self.max_retries} must be >= 0.")
        if not self.poll_seconds > 0:
            raise ConfigError(f"slurm.poll_seconds={self.poll_seconds} must be > 0.")
        if self.time is not None:
            try:
                parse_time(self.time)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    def sbatch_flags(self) -> list[str]:
        """The `#SBATCH` flags of a run's job (job name, output and folder are added per run)."""
        flags = [f"--nodes={self.nodes}", "--ntasks-per-node=1"]
        for name, value in (
            ("partition", self.partition), ("account", self.account), ("qos", self.qos), ("time", self.time),
            ("cpus-per-task", self.cpus_per_task), ("mem", self.mem),
        ):  # fmt: skip
            if value is not None:
                flags.append(f"--{name}={value}")
        if self.gpus_per_node:
            flags.append(f"--gpus-per-node={self.gpus_per_node}")
        return flags + list(self.extra_sbatch)


def accelerate_command(
    accelerate_config: str | None,
    num_processes: int,
    port: int,
    run_yaml: Path,
    *,
    python: str | None = None,
    machine: tuple[int, int, str] | None = None,
    threads: int | None = None,
) -> list[str]:
    """`python -m accelerate.commands.launch ... -m warpkit.loop.rl --config run_yaml`, the command of every
    launcher. `machine` = (num_machines, machine_rank, main_process_ip) for a multi-node run; `threads`: CPU
    threads per process (accelerate's `--num_cpu_threads_per_process`, i.e. OMP_NUM_THREADS). Without it
    accelerate gives every CPU process one thread unless OMP_NUM_THREADS is set."""
    nodes, rank, address = machine or (1, 0, "")
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", str(Path(accelerate_config).resolve())]
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--multi_gpu"] if num_processes > 1 else []
    if not accelerate_config or nodes > 1:
        cmd += ["--num_machines", str(nodes)]
    if nodes > 1:
        cmd += ["--machine_rank", str(rank), "--main_process_ip", address]
    cmd += ["--num_processes", str(num_processes), "--main_process_port", str(port)]
    if threads is not None:
        cmd += ["--num_cpu_threads_per_process", str(threads)]
    return [*cmd, "-m", "warpkit.loop.rl", "--config", str(run_yaml)]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as names: "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03, gpu07, login1
    (zero padding kept). The same as `scontrol show hostnames`, without needing scontrol on the node."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)
            hosts += [f"{prefix}{n:0{width}d}" for n in range(int(low), int(high or low) + 1)]
    return hosts


def job_port(job_id: str | int) -> int:
    """The rendezvous port of a job: 29500 + (job id mod 10000), so two runs on one node differ."""
    return 29500 + int(str(job_id).split("_")[0]) % 10000


def node_command(
    env: Mapping[str, str], accelerate_config: str | None, run_yaml: Path, per_node: int
) -> list[str]:
    """The `accelerate launch` command of this node of a job, from SLURM's environment: SLURM_JOB_NUM_NODES
    machines, this one's rank SLURM_NODEID, the first host of SLURM_JOB_NODELIST as the main process, and
    `job_port(SLURM_JOB_ID)`. `per_node` processes per node (GPUs per node, or 1). Each process gets its share
    of the task's CPUs, SLURM_CPUS_PER_TASK / per_node (unless OMP_NUM_THREADS is set: accelerate keeps it)."""
    cpus = env.get("SLURM_CPUS_PER_TASK")
    threads = max(int(cpus) // per_node, 1) if cpus and "OMP_NUM_THREADS" not in env else None
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    rank = int(env.get("SLURM_NODEID", 0))
    address = expand_nodelist(env.get("SLURM_JOB_NODELIST", "localhost"))[0]
    return accelerate_command(
        accelerate_config, nodes * per_node, job_port(env.get("SLURM_JOB_ID", 0)), run_yaml,
        machine=(nodes, rank, address), threads=threads,
    )  # fmt: skip


def batch_script(
    config: SlurmConfig, name: str, run_dir: Path, accelerate_config: str | None, workdir: Path
) -> str:
    """The sbatch script of one run: its flags, the setup lines, one `warpkit.loop.slurm` task per node, and
    the exit marker (the run's exit code, for clusters without accounting). `name` is the job name."""
    python = config.python or sys.executable
    node = [
        python,
        "-m",
        "warpkit.loop.slurm",
        str(run_dir / "warp_run.yaml"),
        str(config.processes_per_node),
    ]
    if accelerate_config:
        node.append(str(Path(accelerate_config).resolve()))
    flags = [*config.sbatch_flags(), f"--job-name={name}", f"--output={run_dir / 'slurm-%j.out'}"]
    flags.append(f"--chdir={workdir}")
    marker = run_dir / EXIT_MARKER.format(job="${SLURM_JOB_ID}")
    lines = ["#!/bin/bash", *(f"#SBATCH {f}" for f in flags), config.setup or "", "export PYTHONUNBUFFERED=1"]
    lines += [
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {shlex.join(node)} >> {shlex.quote(str(run_dir / 'train.log'))} 2>&1",
        "rc=$?",
        f'echo "$rc" > "{marker}.tmp" && mv "{marker}.tmp" "{marker}"',
        "exit $rc",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def _node_main(argv: list[str]) -> int:
    """`python -m warpkit.loop.slurm RUN_YAML PER_NODE [ACCELERATE_CONFIG]`: exec this node's launch."""
    run_yaml, per_node = Path(argv[0]), int(argv[1])
    cmd = node_command(os.environ, argv[2] if len(argv) > 2 else None, run_yaml, per_node)
    os.execv(cmd[0], cmd)
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(_node_main(sys.argv[1:]))

"""BEMA and Elastic Reset across processes on CPU (gloo): BEMA under 2-process DDP and DeepSpeed ZeRO-3, Elastic
Reset under 2-process DDP (DeepSpeed is refused for it).

Each case launches tests/anchor/scripts/run_relatives.py with `accelerate launch`; every rank writes what it
holds and the float64 rule recomputed from its own gathered policy snapshots (`bema_reference`,
`elastic_reference` in tests/anchor/scripts/common.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.anchor.test_distributed import BACKENDS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "anchor" / "scripts" / "run_relatives.py"


@pytest.fixture(scope="module")
def launch(tiny_model_factory, tmp_path_factory):
    """`launch(kind, backend) -> [rank0, rank1]` result dicts, each case run once per module."""
    results: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {}

    def run(kind: str, backend: str) -> list[dict[str, torch.Tensor]]:
        if backend != "ddp":
            pytest.importorskip("deepspeed")
        if (kind, backend) not in results:
            out = tmp_path_factory.mktemp(f"{kind}-{backend}")
            env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            env.pop("CUDA_VISIBLE_DEVICES", None)
            cmd = [sys.executable, "-m", "accelerate.commands.launch", *BACKENDS[backend], str(SCRIPT)]
            cmd += [kind, str(tiny_model_factory("llama", True)), str(out)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (
                f"{kind} {backend} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
            results[kind, backend] = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
        return results[kind, backend]

    return run


def _max_diff(result: dict, a: str, b: str) -> float:
    names = [k.split(".", 1)[1] for k in result if k.startswith(f"{b}.")]
    return max(float((result[f"{a}.{n}"] - result[f"{b}.{n}"]).abs().max()) for n in names)


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_bema_anchor_is_float64_bema_on_every_rank(launch, backend):
    ranks = launch("bema", backend)
    for rank, result in enumerate(ranks):
        assert int(result["zero3"]) == (backend == "zero3"), "the ZeRO-3 run must take the partitioned path"
        assert float(result["moved"]) > 1e-3, "the policy did not move: the check below would be vacuous"
        assert _max_diff(result, "anchor", "expected") < 2e-6, f"rank {rank}"
        # what TRL's reference forward computes is the anchor (ZeRO-3: gathered from the updated slices)
        assert float((result["ref_logits"] - result["expected_logits"]).abs().max()) < 1e-5, f"rank {rank}"
    names = [k for k in ranks[0] if k.startswith("anchor.")]
    assert [k for k in names if not torch.equal(ranks[0][k], ranks[1][k])] == [], "ranks disagree"


def test_elastic_reset_under_ddp_on_every_rank(launch):
    """Resets after steps 2 and 4 of 5: every step's policy (after its reset), the EMA and the reference."""
    ranks = launch("elastic_reset", "ddp")
    for rank, result in enumerate(ranks):
        assert (int(result["resets"]), int(result["steps"])) == (2, 5)
        for t in range(6):
            assert _max_diff(result, f"post{t}", f"expected{t}") < 2e-6, f"rank {rank}, step {t}"
        assert _max_diff(result, "ema", "expected_ema") < 2e-6, f"rank {rank}: the EMA"
        assert _max_diff(result, "ref", "init") == 0.0, f"rank {rank}: the reference is the init"
        assert _max_diff(result, "post4", "init") > 1e-3, "the policy did not move: vacuous"
        assert _max_diff(result, "ema", "init") > 1e-4, "the EMA is the init: vacuous"
    names = [k for k in ranks[0] if k.startswith(("post", "ema."))]
    assert [k for k in names if not torch.equal(ranks[0][k], ranks[1][k])] == [], "ranks disagree"

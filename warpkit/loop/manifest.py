"""The content-addressed manifest that makes the WARP loop resumable: `warp_manifest.json`.

Every step of the loop (a run, a merge, a front point, the frontier) is recorded with a fingerprint of
its inputs (config and input hashes) and the sha256 of every output file. A step is done when its record
matches the inputs and its outputs still hash as recorded; anything else is redone. `Manifest.run` is the
one place that decides: skip, or clear the step's outputs, do the work, record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warpkit._util.files import tree_digest, write_atomic

__all__ = ["MANIFEST_NAME", "Manifest", "Step", "fingerprint", "pending"]

MANIFEST_NAME = "warp_manifest.json"
log = logging.getLogger(__name__)


def fingerprint(obj: Any) -> str:
    """A short, stable hash of JSON-able data (config values, input hashes): a step's input identity."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Step:
    """One unit of the loop: `key` (e.g. "iter_1/merge"), the fingerprint of its inputs, its output folders."""

    key: str
    inputs: str
    outputs: list[Path] = field(default_factory=list)


class Manifest:
    """`warp_manifest.json`: one record per finished step, rewritten atomically after each step."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, list[dict[str, Any]]] = {}  # run key -> its scheduler jobs (launcher: slurm)
        self._lock = threading.Lock()  # runs side by side record from several threads
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                self.steps, self.jobs = data["steps"], data.get("jobs", {})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path} is not a warpkit manifest ({e}); move it away to start over."
                ) from e

    def done(self, step: Step) -> bool:
        """True when `step` finished with these inputs and its outputs still hash as recorded."""
        record = self.steps.get(step.key)
        if record is None or record["inputs"] != step.inputs:
            return False
        return all(p.is_dir() and tree_digest(p) == record["outputs"].get(p.name) for p in step.outputs)

    def record(self, step: Step, **info: Any) -> None:
        """Record `step` as finished, with the sha256 of every file of its outputs."""
        hashes = {p.name: tree_digest(p) for p in step.outputs}
        with self._lock:
            self.steps[step.key] = {
                "inputs": step.inputs,
                "outputs": hashes,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **info,
            }
            self._write()

    def run(
        self, step: Step, work: Callable[[], dict[str, Any] | None], *, clear_outputs: bool = True
    ) -> bool:
        """Skip `step` if done; else remove its outputs (never trusted unless recorded; `clear_outputs`),
        call `work()` and record it with the info `work` returns. Returns whether the work ran."""
        if self.done(step):
            log.info("%s: done (manifest), skipping.", step.key)
            return False
        if clear_outputs:
            for folder in step.outputs:
                if folder.exists():
                    shutil.rmtree(folder)
        info = work() or {}
        self.record(step, **info)
        return True

    def record_job(self, key: str, job: dict[str, Any]) -> None:
        """Add or update (by its "id") one scheduler job of run `key`, written at once: a driver killed right
        after a submission re-attaches to the job instead of submitting it again."""
        with self._lock:
            jobs = self.jobs.setdefault(key, [])
            same = [j for j in jobs if j["id"] == job["id"]]
            if same:
                same[0].update(job)
            else:
                jobs.append(dict(job))
            self._write()

    def output_hash(self, key: str, name: str) -> str:
        """The fingerprint of output `name` of the recorded step `key` (the input identity of what uses it)."""
        return fingerprint(self.steps[key]["outputs"][name])

    def save(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        data = {"steps": self.steps, **({"jobs": self.jobs} if self.jobs else {})}
        write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))


def pending(manifest: Manifest, steps: Sequence[Step]) -> list[Step]:
    """The steps the manifest does not vouch for, logging the others as skipped."""
    todo = []
    for step in steps:
        if manifest.done(step):
            log.info("%s: done (manifest), skipping.", step.key)
        else:
            todo.append(step)
    return todo

"""The bad-input table: what a user may get wrong, and the one line warpkit answers with.

Each area (train, merge, frontier) declares its cases in `tests/<area>/test_bad_inputs.py` as `BadInput`
rows and runs them with `check_bad_input`: the command exits with code 2, prints exactly one line on
stderr naming the value and the fix (no traceback), and writes nothing outside its own temporaries, which
are gone afterwards. `docs/bad-inputs.md` is this table in Markdown (`python -m tests.bad_inputs` rewrites
it; a test keeps it equal to the cases).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from warpkit.cli import main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
AREAS = ("train", "merge", "frontier")


@dataclass(frozen=True)
class BadInput:
    """One row: `what` the user did, the `argv` of `warpkit` built in a fresh folder, and the regex its
    one-line answer must match. `says` is the answer as the table shows it (defaults to the regex)."""

    what: str
    argv: Callable[[Path], list[str]]
    message: str
    says: str = ""
    code: int = 2

    @property
    def shown(self) -> str:
        """The answer as the table shows it: `says`, or the regex read as text (`.*` as …, escapes undone)."""
        if self.says:
            return self.says
        text = self.message.removeprefix("^").removesuffix("$").replace(".*", "…")
        return re.sub(r"\\(.)", r"\1", text)


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def check_bad_input(case: BadInput, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run `warpkit <argv>` in `workdir` (prepared by `argv`) and check the answer and the file system."""
    argv = case.argv(workdir)
    before = _snapshot(workdir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # a usage error argparse reports itself
        code = e.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert len(errors) == 1, f"expected one line on stderr, got:\n{err}"
    assert re.search(case.message, errors[0]), f"{errors[0]!r} does not match {case.message!r}"
    after = _snapshot(workdir)
    assert after - before == set(), f"written despite the error: {sorted(after - before)}"


def all_cases() -> dict[str, list[BadInput]]:
    """Every area's cases, from its tests module (imported by name, so the table lists what is tested)."""
    modules = {"train": "tests.loop.test_bad_inputs", "merge": "tests.merge.test_bad_inputs"}
    modules["frontier"] = "tests.frontier.test_bad_inputs"
    return {area: importlib.import_module(modules[area]).CASES for area in AREAS}


def markdown() -> str:
    """docs/bad-inputs.md: one table per command."""
    parts = [
        "# Bad input: what warpkit says\n",
        "Each row is a test case (`tests/<area>/test_bad_inputs.py`): the command exits with code 2, prints one",
        "line on stderr (`warpkit: error: ...` or `warpkit <command>: ...`) naming the value and the fix, and",
        "writes nothing outside its own temporaries. Regenerate with `python -m tests.bad_inputs`.\n",
    ]
    for area, cases in all_cases().items():
        parts += [f"## warpkit {area}\n", "| input | warpkit says |", "| --- | --- |"]
        parts += [f"| {c.what} | {c.shown.replace('|', '&#124;')} |" for c in cases]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(markdown())
    print(DOC)

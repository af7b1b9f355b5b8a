"""Where a merge may write: the checks on its output folder, made before any input is read, and the guard
around the write itself.

`check_out` refuses an output that would destroy or corrupt something: one equal to, inside or holding an
input (resolved paths, so symlinks and `..` do not hide it), an existing folder that is not a warpkit
output (only a folder with `warpkit_merge.json` or `warpkit_soup.json` at its top may be replaced, and only
with overwrite), a file, or a place that cannot be written (its nearest existing parent is a file or
read-only). `writing` wraps the write: it first removes what an earlier, killed run left for the same
output (`remove_stale_temporaries`), and turns a full disk into one `OutputSpaceError` that names the output
and the fix, after the temporary is gone; parent folders it created are removed again on failure.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from warpkit._util.files import remove_stale_temporaries

__all__ = [
    "OUTPUT_MARKERS",
    "OutputSpaceError",
    "check_out",
    "check_writable_parent",
    "is_merge_output",
    "writing",
]

log = logging.getLogger(__name__)

# A folder holding one of these at its top was written by warpkit merge (or a soup): --overwrite may replace it.
OUTPUT_MARKERS = ("warpkit_merge.json", "warpkit_soup.json")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutputSpaceError(ValueError):
    """The disk (or quota) filled up while `out` was written; the partial output has been removed."""

    def __init__(self, out: Path, reason: str) -> None:
        self.out, self.reason = out, reason
        super().__init__(
            f"out={out}: no space left on the device while writing it ({reason}); the partial output was "
            f"removed. Free space on that file system or choose another out folder (CLI: --out)."
        )


def is_merge_output(path: str | Path) -> bool:
    """Whether `path` is a folder warpkit merge wrote (it holds one of `OUTPUT_MARKERS` at its top)."""
    path = Path(path)
    return path.is_dir() and any((path / m).is_file() for m in OUTPUT_MARKERS)


def check_out(out: str | Path, inputs: Sequence[str | Path], overwrite: bool, *, cli: bool = False) -> Path:
    """Refuse an output folder that would overwrite, delete or sit inside an input, that is not a warpkit
    output (when it exists), or that cannot be created. Returns `out` as a Path. Nothing is read or written.

    inputs: the init (if any) and every model. cli: spell the settings as flags (`--out`, `--overwrite`).
    """
    out = Path(out)
    flag = "--out" if cli else "out"
    again = "--overwrite" if cli else "overwrite=True (CLI: --overwrite)"
    target = out.resolve()
    for p in map(Path, inputs):
        source = p.resolve()
        if source == target:
            raise ValueError(
                f"{flag}={out} is the input {p}: the merge would replace a model it reads. Write it to a new "
                f"folder, e.g. {flag} {_sibling(out)}."
            )
        if source in target.parents:
            raise ValueError(
                f"{flag}={out} is inside the input {p}: the merge would write into a model folder it reads. "
                f"Choose an {flag} outside every input folder, e.g. {flag} {_sibling(p)}."
            )
        if target in source.parents:
            raise ValueError(
                f"{flag}={out} contains the input {p}: replacing it would delete that model. Choose an {flag} "
                f"that holds no input, e.g. {flag} {out / 'merged'}."
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(
                f"{flag}={out} is a file, not a merge output folder; warpkit replaces only its own outputs. "
                f"Remove the file yourself or choose another {flag}."
            )
        if not is_merge_output(out):
            markers = " or ".join(OUTPUT_MARKERS)
            raise ValueError(
                f"{flag}={out} already exists and is not a warpkit merge output (no {markers} at its top); "
                f"{'--overwrite' if cli else 'overwrite'} replaces only an earlier merge. Remove the folder "
                f"yourself or choose a new {flag}."
            )
        if not overwrite:
            raise ValueError(f"{flag}={out} already exists; remove it or pass {again}.")
    check_writable_parent(out, flag)
    return out


def _sibling(path: Path) -> Path:
    return path.with_name(f"{path.name or 'model'}-merged")


def check_writable_parent(out: Path, flag: str) -> None:
    """The nearest existing folder above `out` must be a folder this process may create entries in."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{flag}={out} cannot be created: {parent} is a file, not a folder. Choose an {flag} under a "
            "folder (or remove that file)."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag}={out} cannot be written: {parent} is read-only for this user. Choose an {flag} in a "
            "writable folder (or fix its permissions)."
        )


@contextlib.contextmanager
def writing(out: str | Path) -> Iterator[Path]:
    """Around the whole write of `out` (put `atomic_dir` inside it): stale temporaries of `out` left by dead
    processes are removed first; a full disk becomes `OutputSpaceError` naming `out` (an inner one, e.g. a
    greedy soup's candidate, is renamed to this `out`); parent folders created here are removed on failure."""
    out = Path(out)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in remove_stale_temporaries(out.parent, {out.name}):
        log.info("removed %s, a temporary of %s left by a process that no longer runs", p, out)
    try:
        yield out
    except BaseException as e:
        for p in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OutputSpaceError) and e.out != out:
            raise OutputSpaceError(out, e.reason) from e.__cause__
        if isinstance(e, OSError) and e.errno in _FULL:
            raise OutputSpaceError(out, e.strerror or str(e)) from e
        raise

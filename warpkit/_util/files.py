"""Outputs that appear complete or not at all, and the digests that vouch for them.

Every warpkit output (a merged model, a policy, a frontier, a manifest, an anchor state) is written under
a temporary name in the folder that will hold it, then renamed: a rename within one file system is
atomic, so a crash leaves either the old output, the new one, or a temporary named `.<name>.tmp-*` that
no reader mistakes for a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "TMP_MARK",
    "atomic_dir",
    "atomic_file",
    "file_lock",
    "publish_dir",
    "sha256_file",
    "staged_files",
    "tree_digest",
    "write_atomic",
]

TMP_MARK = ".tmp-"  # every temporary warpkit writes has this in its name: `.<final name>.tmp-<random>`


def publish_dir(tmp: str | Path, final: str | Path, *, overwrite: bool = False) -> Path:
    """Move the finished folder `tmp` to `final` (same file system), replacing `final` only if `overwrite`."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists; remove it or pass overwrite=True.")
        shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
    os.replace(tmp, final)
    return final


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; when the block ends without error it becomes `final`.

    On any error (or KeyboardInterrupt) the temporary folder is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    try:
        yield tmp
        publish_dir(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (e.g. with `save_file`); it replaces `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def staged_files(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary folder inside `folder`; on success each file in it replaces its namesake in `folder`.

    For outputs that share a folder with other files (e.g. frontier.json beside a user's notes): each file
    appears whole or not at all, and nothing else in `folder` is touched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}", dir=folder))
    try:
        yield tmp
        for p in sorted(tmp.iterdir()):
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in 16 MiB chunks into one reused buffer."""
    h, buffer = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def tree_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file below `folder`, keyed by relative POSIX path, sorted."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive inter-process lock on `path` (created if missing), held for the block.

    `flock` locks are released by the OS when the holder dies, so a killed process never leaves it stuck.
    Without fcntl (not POSIX) the block runs unlocked; callers keep atomic renames for correctness anyway.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

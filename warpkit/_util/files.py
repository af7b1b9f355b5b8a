"""Outputs that appear complete or not at all, and the digests that vouch for them.

Every warpkit output (a merged model, a policy, a frontier, a manifest, an anchor state) is written under
a temporary name in the folder that will hold it, then renamed: a rename within one file system is
atomic, so a crash leaves either the old output, the new one, or a temporary that no reader mistakes for a
result: `.<name>.tmp-<host>-<pid>-<random>`. The owner tag lets the next run remove what a dead process
left (`remove_stale_temporaries`) without touching a temporary another live process is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

__all__ = [
    "TMP_MARK",
    "OutputLocked",
    "atomic_dir",
    "atomic_file",
    "file_lock",
    "hold_lock",
    "publish_dir",
    "remove_stale_temporaries",
    "sha256_file",
    "staged_files",
    "temp_prefix",
    "tree_digest",
    "write_atomic",
]

TMP_MARK = (
    ".tmp-"  # every temporary warpkit writes has this in its name: `.<final name>.tmp-<owner>-<random>`
)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # which machine's pids the tag names
_OWNED = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")


def temp_prefix(name: str) -> str:
    """`.<name>.tmp-<host>-<pid>-`: the prefix of a temporary for output `name`, tagged with its owner."""
    return f".{name}{TMP_MARK}{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path, names: Collection[str] | None = None) -> list[Path]:
    """Remove the temporaries in `folder` (of outputs `names`, or all) whose owner process on this machine is
    gone: what a crash (kill -9, a full disk, a power cut) left behind. Returns what was removed.

    Temporaries of a live process, of another machine (a shared file system), or not written by warpkit
    (no owner tag) are left alone.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _OWNED.match(p.name)
        if not m or m["host"] != _HOST or (names is not None and m["name"] not in names):
            continue
        if int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
            missing_ok=True
        )
        removed.append(p)
    return removed


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
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=final.parent))
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
    tmp = path.with_name(f"{temp_prefix(path.name)}{os.urandom(4).hex()}")
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
    appears whole or not at all, and nothing else in `folder` is touched (but the staging folders of
    writers killed earlier, which are removed first).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, {folder.name})  # what a killed earlier writer of this folder left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), dir=folder))
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


class OutputLocked(ValueError):
    """Another live process holds the lock of an output folder."""


@contextlib.contextmanager
def hold_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock `path` for the block, or refuse at once (`OutputLocked`) naming its holder.

    The holder (pid, host, start time, command) is written into the lock file for the next one to read. The
    OS releases an `flock` when its holder dies, so a kill -9 never leaves `what` locked.
    """
    import fcntl
    import sys
    import time

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OutputLocked(
            f"{what} is in use by {holder}; wait for it to finish (or stop it), or choose another folder."
        ) from None
    try:
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
        info += f"({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

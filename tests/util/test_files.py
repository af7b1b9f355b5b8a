"""Atomic outputs: a folder or file appears complete or not at all; digests by hand."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from warpkit._util.files import (
    TMP_MARK,
    atomic_dir,
    atomic_file,
    file_lock,
    publish_dir,
    remove_stale_temporaries,
    sha256_file,
    staged_files,
    temp_prefix,
    tree_digest,
    write_atomic,
)


def test_atomic_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and TMP_MARK in tmp.name and not final.exists()
        (tmp / "a.txt").write_text("a")
    assert (final / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(tmp_path / "failed") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary, no failed output


def test_atomic_dir_refuses_or_replaces_an_existing_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"), atomic_dir(final) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]


def test_publish_dir_replaces_a_file_when_asked(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").write_text("a file")
    publish_dir(tmp_path / "src", tmp_path / "dst", overwrite=True)
    assert (tmp_path / "dst").is_dir() and not (tmp_path / "src").exists()


def test_atomic_file_and_write_atomic(tmp_path):
    path = tmp_path / "state.bin"
    write_atomic(path, b"one")
    with pytest.raises(ValueError), atomic_file(path) as tmp:
        tmp.write_bytes(b"two, half written")
        raise ValueError
    assert path.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
    write_atomic(path, "three")
    assert path.read_text() == "three"


def test_staged_files_replace_only_their_namesakes(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "frontier.json").write_text("old")
    with staged_files(tmp_path) as tmp:
        (tmp / "frontier.json").write_text("new")
        (tmp / "frontier.csv").write_text("new")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "notes.txt": "the user's", "frontier.json": "new", "frontier.csv": "new"
    }  # fmt: skip
    with pytest.raises(KeyError), staged_files(tmp_path) as tmp:
        (tmp / "frontier.json").write_text("never")
        raise KeyError
    assert (tmp_path / "frontier.json").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_digests_by_hand(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"bee")
    (tmp_path / "d" / "e" / "a.txt").write_bytes(b"")
    assert sha256_file(tmp_path / "d" / "b.txt") == hashlib.sha256(b"bee").hexdigest()
    assert tree_digest(tmp_path / "d") == {
        "b.txt": hashlib.sha256(b"bee").hexdigest(),
        "e/a.txt": hashlib.sha256(b"").hexdigest(),
    }
    big = tmp_path / "big"
    data = os.urandom(3 * 1024 + 7)
    big.write_bytes(data)
    assert sha256_file(big, chunk=1024) == hashlib.sha256(data).hexdigest()  # several reads, one digest


def test_file_lock_excludes_another_process_until_released(tmp_path):
    lock = tmp_path / "lock"
    probe = (
        "import fcntl, sys; f = open(sys.argv[1], 'w')\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
        "except BlockingIOError:\n    print('held')\n"
    )
    with file_lock(lock):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True)
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True)
    assert (held.stdout.strip(), free.stdout.strip()) == ("held", "free")


def test_file_lock_is_released_when_the_holder_is_killed(tmp_path):
    lock = tmp_path / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from warpkit._util.files import file_lock\nimport time\n"
         f"with file_lock({str(lock)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with file_lock(lock):
        assert time.monotonic() - start < 5


def test_staged_files_remove_what_a_killed_writer_left(tmp_path):
    """`warpkit frontier` killed while writing frontier.json leaves its staging folder; the next write removes it."""
    folder = tmp_path / "frontier"
    folder.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "from warpkit._util.files import temp_prefix; print(temp_prefix('frontier'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (folder / f"{dead}abc").mkdir()
    (folder / f"{dead}abc" / "frontier.json").write_text("{half")
    (folder / "notes.txt").write_text("the user's")
    with staged_files(folder) as tmp:
        (tmp / "frontier.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["frontier.json", "notes.txt"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """A temporary is tagged with its owner; only a dead owner's (on this machine) is removed."""
    dead = subprocess.run(
        [sys.executable, "-c", "from warpkit._util.files import temp_prefix; print(temp_prefix('out'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (tmp_path / f"{dead}abc").mkdir()  # a merge killed mid-write
    (tmp_path / f"{dead}abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f"{dead.replace('.out.', '.other.')}xyz").write_text("a file temporary")
    mine = tmp_path / f"{temp_prefix('out')}live"  # this process's: still in use
    mine.mkdir()
    other_host = tmp_path / ".out.tmp-00000000-1-foreign"  # another machine on a shared file system
    other_host.mkdir()
    user = tmp_path / ".out.tmp-mine"  # not warpkit's (no owner tag)
    user.mkdir()
    assert remove_stale_temporaries(tmp_path, names={"out"}) == [tmp_path / f"{dead}abc"]
    assert remove_stale_temporaries(tmp_path) == [tmp_path / f"{dead.replace('.out.', '.other.')}xyz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_host.name, user.name])
    assert remove_stale_temporaries(tmp_path / "missing") == []

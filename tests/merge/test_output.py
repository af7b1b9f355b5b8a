"""Where a merge may write (`warpkit.merge.output`): never over, into or around an input, replacing only an
earlier warpkit output, refused up front when the place cannot be written; a full disk is one clear error
with nothing left behind; what a killed merge left is removed by the next merge into the same output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from warpkit._util.files import tree_digest
from warpkit.cli import main
from warpkit.merge import folders
from warpkit.merge.folders import merge_folders
from warpkit.merge.output import check_out
from warpkit.merge.soups import greedy_soup, uniform_soup, warm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runs(tiny_model_factory, tmp_path) -> list[Path]:
    """init, a and b: copies of three tiny llamas in tmp_path/runs, so outputs can be put around them."""
    names = (("init", 0), ("a", 1), ("b", 2))
    return [
        Path(shutil.copytree(tiny_model_factory("llama", True, s), tmp_path / "runs" / n)) for n, s in names
    ]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _no_reads(monkeypatch) -> None:
    """Fail the test if merge_folders opens any input: the refusal must come before anything is read."""

    def boom(*args, **kwargs):
        raise AssertionError("an input was opened before the output was checked")

    monkeypatch.setattr(folders, "Checkpoint", boom)
    monkeypatch.setattr(folders, "open_checkpoint", boom)


# ----------------------------------------------------------------------------- never over, into or around an input


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            lambda t, init: t / "runs",
            r"contains the input .*/runs/init: replacing it would delete that model",
        ),
        (lambda t, init: t, r"contains the input .*/runs/init: replacing it would delete that model"),
        (lambda t, init: init, r"is the input .*/runs/init: the merge would replace a model it reads"),
        (lambda t, init: init / "merged", r"is inside the input .*/runs/init: the merge would write into"),
        (lambda t, init: t / "runs" / "a" / ".." / "init", r"is the input"),  # resolved, not compared as text
    ],
    ids=["parent of the inputs", "grandparent", "the init", "inside the init", "the init via .."],
)
def test_overwrite_never_deletes_or_writes_into_an_input(runs, tmp_path, monkeypatch, where, message):
    """The reported bug: `--out DIR --overwrite` with the inputs in DIR deleted them and exited 0."""
    init, a, b = runs
    before = tree_digest(tmp_path)
    _no_reads(monkeypatch)
    with pytest.raises(ValueError, match=message):
        merge_folders("slerp", init, [a, b], where(tmp_path, init), overwrite=True, progress=False)
    with pytest.raises(SystemExit, match=message) as exit_:
        main(["merge", "--init", str(init), "--models", str(a), str(b), "--out", str(where(tmp_path, init)),
              "--overwrite", "--no-progress"])  # fmt: skip
    assert exit_.value.code == 2
    assert tree_digest(tmp_path) == before


def test_a_symlink_to_an_input_is_that_input(runs, tmp_path):
    init, a, b = runs
    (tmp_path / "link").symlink_to(a, target_is_directory=True)
    with pytest.raises(ValueError, match=r"out=.*/link is the input .*/runs/a"):
        merge_folders("slerp", init, [a, b], tmp_path / "link", overwrite=True, progress=False)
    assert (a / "model.safetensors").is_file()


def test_soups_and_warm_refuse_the_same_outputs_before_scoring(runs, tmp_path):
    _, a, b = runs
    before = tree_digest(tmp_path)
    calls = []
    for run in (
        lambda out: uniform_soup([a, b], out, overwrite=True, progress=False),
        lambda out: greedy_soup([a, b], lambda f: calls.append(f) or 0.0, out, overwrite=True),
        lambda out: warm([a, b], out, overwrite=True, progress=False),  # refused for out before the RM checks
    ):
        with pytest.raises(ValueError, match=r"out=.*/runs contains the input .*/runs/a"):
            run(tmp_path / "runs")
        with pytest.raises(ValueError, match=r"out=.*/runs/b/soup is inside the input .*/runs/b"):
            run(b / "soup")
    assert calls == [] and tree_digest(tmp_path) == before
    with pytest.raises(SystemExit, match=r"--out=.*/runs contains the input"):
        main(["merge", "--method", "soup", "--models", str(a), str(b), "--out", str(tmp_path / "runs"),
              "--overwrite"])  # fmt: skip


# ----------------------------------------------------------------------------- replace only a warpkit output


def test_overwrite_replaces_only_an_earlier_warpkit_output(runs, tmp_path, monkeypatch):
    init, a, b = runs
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out=.*/notes already exists and is not a warpkit merge output \(no "
                       r"warpkit_merge\.json or warpkit_soup\.json at its top\); overwrite replaces only an "
                       r"earlier merge\. Remove the folder yourself or choose a new out\."):  # fmt: skip
        merge_folders("slerp", init, [a, b], notes, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="already exists and is not a warpkit merge output"):
        merge_folders("slerp", init, [a, b], notes, progress=False)
    assert (notes / "todo.txt").read_text() == "mine" and sorted(os.listdir(notes)) == ["todo.txt"]

    merged = merge_folders("slerp", init, [a, b], tmp_path / "merged", progress=False).out
    with pytest.raises(ValueError, match=r"out=.*/merged already exists; remove it or pass overwrite=True"):
        merge_folders("lerp", init, [a, b], merged, progress=False)
    merge_folders("lerp", init, [a, b], merged, overwrite=True, progress=False)
    assert json.loads((merged / "warpkit_merge.json").read_text())["method"] == "lerp"
    # a greedy soup that kept one model holds only warpkit_soup.json: a warpkit output too
    single = greedy_soup([a, b], lambda f: 0.0, tmp_path / "soup", scores=[1.0, 0.5])
    assert not (single.out / "warpkit_merge.json").exists()
    merge_folders("slerp", init, [a, b], single.out, overwrite=True, progress=False)
    assert _temporaries(tmp_path) == []


def test_a_file_or_an_unwritable_place_is_refused_before_anything_is_read(runs, tmp_path, monkeypatch):
    init, a, b = runs
    _no_reads(monkeypatch)
    (tmp_path / "merged.safetensors").write_bytes(b"not mine to delete")
    with pytest.raises(ValueError, match=r"out=.*/merged\.safetensors is a file, not a merge output folder.*"
                       r"Remove the file yourself or choose another out\."):  # fmt: skip
        merge_folders("slerp", init, [a, b], tmp_path / "merged.safetensors", overwrite=True, progress=False)
    assert (tmp_path / "merged.safetensors").read_bytes() == b"not mine to delete"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"out=.*/notes\.txt/sub/merged cannot be created: .*/notes\.txt is a "
                       r"file, not a folder\. Choose an out under a folder"):  # fmt: skip
        merge_folders("slerp", init, [a, b], tmp_path / "notes.txt" / "sub" / "merged", progress=False)


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a chmod 555 folder; see the read-only mount test"
)
def test_a_read_only_parent_is_refused(runs, tmp_path, monkeypatch):
    init, a, b = runs
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        _no_reads(monkeypatch)
        with pytest.raises(
            ValueError, match=r"out=.*/locked/merged cannot be written: .*/locked is read-only"
        ):
            merge_folders("slerp", init, [a, b], locked / "merged", progress=False)
    finally:
        locked.chmod(0o755)


def _mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs at `folder`, or skip the test saying why (needs root and mount permission)."""
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot run mount here ({e}); the monkeypatched tests cover the same code path")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); the monkeypatched "
                    "tests cover the same code path")  # fmt: skip


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield lambda folder, options: _mount_tmpfs(folder, options) or mounted.append(folder) or folder
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


def test_a_read_only_file_system_is_refused_up_front(runs, tmp_path, mounts, monkeypatch):
    init, a, b = runs
    ro = mounts(tmp_path / "ro", "ro,size=1m")
    _no_reads(monkeypatch)
    with pytest.raises(ValueError, match=r"out=.*/ro/merged cannot be written: .*/ro is read-only"):
        merge_folders("slerp", init, [a, b], ro / "merged", progress=False)


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_clear_line_and_leaves_nothing(runs, tmp_path, mounts, capsys):
    """A real 2 MB file system: the 6 MB embedding does not fit."""
    init, a, b = runs
    small = mounts(tmp_path / "small", "size=2m")
    out = small / "deep" / "merged"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--init", str(init), "--models", str(a), str(b), "--out", str(out), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"warpkit merge: out={out}: no space left on the device while writing it (")
    assert err[0].endswith("Free space on that file system or choose another out folder (CLI: --out).")
    assert os.listdir(small) == []  # the temporary, and the parent folder the merge created, are gone
    assert shutil.disk_usage(small).used < 256 * 1024  # and their space is free: no file left open
    with pytest.raises(ValueError, match=r"no space left on the device"):
        merge_folders("slerp", init, [a, b], out, progress=False)
    assert os.listdir(small) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else 0


@pytest.mark.parametrize("failure", ["short write then ENOSPC", "no progress", "EDQUOT"])
def test_a_short_write_or_enospc_is_reported_for_the_output(runs, tmp_path, monkeypatch, failure):
    """The same path as the real full disk, deterministic: os.pwrite fails after the first few writes."""
    init, a, b = runs
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(len(data))
        if len(calls) < 4:
            return real(fd, data, offset)
        if failure == "short write then ENOSPC" and len(calls) == 4:
            return real(fd, memoryview(data)[: len(data) // 2], offset)
        if failure == "no progress":
            return 0
        raise OSError(errno.EDQUOT if failure == "EDQUOT" else errno.ENOSPC, os.strerror(errno.ENOSPC))

    fds = _open_fds()
    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "outs" / "merged"
    with pytest.raises(ValueError, match=rf"^out={out}: no space left on the device while writing it \(.+\); "
                       r"the partial output was removed\. Free space .* or choose another out folder"):  # fmt: skip
        merge_folders("slerp", init, [a, b], out, progress=False)
    assert not (tmp_path / "outs").exists()  # created for the merge, removed with it
    assert _open_fds() == fds
    if failure == "short write then ENOSPC":
        assert calls[4] == calls[3] - calls[3] // 2  # the rest of the short write was retried


def test_a_full_disk_during_a_greedy_soup_names_the_soup(runs, tmp_path, monkeypatch):
    _, a, b = runs

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(ValueError, match=rf"^out={tmp_path / 'soup'}: no space left"):
        greedy_soup([a, b], lambda f: 1.0, tmp_path / "soup", scores=[1.0, 0.5])
    assert _temporaries(tmp_path) == [] and not (tmp_path / "soup").exists()


# ----------------------------------------------------------------------------- kill -9


_KILLED_CHILD = """
import os, signal, sys
from warpkit.merge.folders import merge_folders
from warpkit.merge.writer import ShardedWriter

real = ShardedWriter.write

def write(self, *args):  # die like kill -9 right after the first rows reach the output
    real(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)

ShardedWriter.write = write
merge_folders("slerp", sys.argv[1], sys.argv[2:4], sys.argv[4], progress=False)
"""


def test_the_next_merge_removes_what_a_killed_merge_left(runs, tmp_path):
    init, a, b = runs
    out = tmp_path / "outs" / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(init), str(a), str(b), str(out)],
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    (left,) = [p for p in out.parent.iterdir()]
    assert left.name.startswith(".merged.tmp-") and not out.exists()
    assert (left / "model.safetensors").stat().st_size > 6_000_000  # a model-sized temporary
    # A temporary of the same output owned by a live process (this one) is another merge's: left alone.
    mine = out.parent / f".merged.tmp-{left.name.split('-')[1]}-{os.getpid()}-x"
    mine.mkdir()

    assert (
        main(["merge", "--init", str(init), "--models", str(a), str(b), "--out", str(out), "--no-progress"])
        == 0
    )
    assert sorted(p.name for p in out.parent.iterdir()) == [mine.name, "merged"]
    reference = merge_folders("slerp", init, [a, b], tmp_path / "reference", progress=False).out
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_check_out_spells_flags_for_the_cli(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match=r"^--out=.*/x already exists and is not a warpkit merge output .*"
                       r"--overwrite replaces only an earlier merge\. .* choose a new --out\.$"):  # fmt: skip
        check_out(tmp_path / "x", [], True, cli=True)
    assert check_out(tmp_path / "new" / "deeper", [tmp_path / "a"], False) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check writes nothing

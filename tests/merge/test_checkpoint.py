"""Streaming safetensors I/O: headers parsed by hand match the safetensors library, sharded writes
round-trip through it, and broken files are refused with a message."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from warpkit._util.files import sha256_file
from warpkit.merge.checkpoint import Checkpoint, check_weights
from warpkit.merge.writer import ShardedWriter, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(4, dtype=torch.int64),
        "d.mask": torch.tensor([True, False, True]),
        "e.half": torch.randn(2, 2, 2, generator=g).half(),
    }


def test_rows_read_by_hand_match_the_library(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(tmp_path)
    for name, t in tensors.items():
        info = ckpt.tensors[name]
        assert info.dtype == t.dtype and info.shape == tuple(t.shape)
        whole = ckpt.raw_rows(name, 0, info.rows)
        assert torch.equal(whole.view(t.shape), t), name
        if info.rows > 2:  # a row range in the middle, into a caller's buffer
            buffer = torch.empty(1000, dtype=torch.uint8)
            part = ckpt.raw_rows(name, 1, 3, buffer)
            assert torch.equal(part, t[1:3].flatten()) and part.data_ptr() == buffer.data_ptr()
    assert torch.equal(ckpt.rows("b.bias", 2, 5, torch.float32), tensors["b.bias"][2:5].float())
    ckpt.close()


def test_sharded_writer_round_trips_in_any_row_order(tmp_path):
    tensors = _tensors()
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=64)  # forces several shards
    for name, t in reversed(tensors.items()):
        rows = t.shape[0]
        writer.write(name, rows // 2, t[rows // 2 :].flatten())  # second half first
        writer.write(name, 0, t[: rows // 2].flatten())
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded |= load_file(tmp_path / file)
    assert len(set(index["weight_map"].values())) > 1
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


def test_broken_files_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        Checkpoint(tmp_path)
    save_file({"w": torch.ones(1000)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated: its header describes 4\d+ bytes but the file has"):
        Checkpoint(tmp_path)  # refused on open, from the header and the size alone
    with pytest.raises(ValueError, match="truncated"):
        check_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data)
    ckpt = Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:-100])  # cut short after it was opened
    with pytest.raises(ValueError, match="truncated"):
        ckpt.raw_rows("w", 0, 1000)
    ckpt.close()
    (tmp_path / "model.safetensors").write_bytes(data)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "gone.safetensors"}})
    )
    with pytest.raises(ValueError, match="missing"):
        Checkpoint(tmp_path)


def test_parse_size_and_sha256(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five gigs")
    blob = bytes(range(256)) * 100_000
    (tmp_path / "f").write_bytes(blob)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(blob).hexdigest()

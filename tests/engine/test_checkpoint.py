"""Fault injection: non-finite losses (also on one rank of a 2-process gloo DDP run), out-of-memory,
truncated checkpoints, a full disk, a checkpoint from another model configuration, pickled code."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from svqmae import config as C
from svqmae.engine.checkpoint import (
    AtomicCheckpointIO,
    TrainingAborted,
    check_resume,
    latest_checkpoint,
    load_checkpoint,
    sidecar,
)
from svqmae.model import CheckpointError
from svqmae.tasks.pretrain import model_differences, pretrain
from tests.tasks.test_pretrain import tiny_cfg, write_audio


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("ckpt") / "audio")


def save(path: Path, step: int, cfg: C.Config | None = None) -> Path:
    ckpt = {"global_step": step, "state_dict": {"w": torch.full((64,), float(step))},
            "svqmae_config": C.to_dict(cfg or tiny_cfg())}
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    return path


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, capfd):
    a, b = save(tmp_path / "checkpoints" / "step00000004.ckpt", 4), save(tmp_path / "checkpoints" / "step00000008.ckpt", 8)
    assert json.loads(sidecar(b).read_text())["bytes"] == b.stat().st_size
    assert latest_checkpoint(tmp_path) == b
    with open(b, "r+b") as f:
        f.truncate(b.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(b)
    assert latest_checkpoint(tmp_path) == a
    assert "step00000008.ckpt is truncated" in capfd.readouterr().err
    assert (tmp_path / "checkpoints" / "step00000008.ckpt.corrupt").is_file()  # set aside, never picked again
    assert load_checkpoint(a)["global_step"] == 4
    # same size, flipped bytes: the checksum catches it
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0xFF
    a.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) is None


def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    prev = save(tmp_path / "step00000004.ckpt", 4)

    def no_space(self, checkpoint, f):
        f.write(b"x" * 1000)  # part of it got written before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(AtomicCheckpointIO, "_write", no_space)
    with pytest.raises(TrainingAborted, match="disk full.*earlier checkpoints.*intact"):
        save(tmp_path / "step00000008.ckpt", 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004.ckpt", "step00000004.ckpt.sha256.json"]
    assert load_checkpoint(prev)["global_step"] == 4


def test_checkpoint_from_another_model_config_is_refused_with_the_fields(tmp_path, audio):
    out = tmp_path / "run"
    save(out / "checkpoints" / "step00000004.ckpt", 4, tiny_cfg("model.encoder.layers=2"))
    with pytest.raises(CheckpointError, match=r"model.encoder.layers: 2 != 1") as e:
        check_resume(out / "checkpoints" / "step00000004.ckpt", "svqmae_config", model_differences(tiny_cfg()))
    assert "step00000004.ckpt" in str(e.value)
    check_resume(out / "checkpoints" / "step00000004.ckpt", "svqmae_config",
                 model_differences(tiny_cfg("model.encoder.layers=2", "train.lr=1")))
    with pytest.raises(CheckpointError, match="another configuration"):
        pretrain([str(audio)], out, tiny_cfg())  # refused before any training


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_unpickles_code(tmp_path):
    torch.save({"global_step": 1, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt: unreadable checkpoint"):
        load_checkpoint(tmp_path / "evil.ckpt")

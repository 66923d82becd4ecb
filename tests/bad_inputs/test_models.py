"""Family 4, model folders and checkpoints: every way a model breaks x every command that loads one.

Each is one line naming the folder or file, exit status 2, before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest

from svqmae.engine.checkpoint import latest_checkpoint
from tests.bad_inputs.conftest import assert_refused, run_cli, snapshot

BROKEN = ["no_weights", "truncated_weights", "garbage_config", "foreign_config", "bad_value_config", "empty_weights",
          "empty_folder", "missing", "text_file", "truncated_ckpt", "foreign_ckpt"]


def _command(name: str, model, world, out):
    return {
        "extract": ["extract", "--model", model, "--data", world.audio, "--out", out, "--quiet"],
        "export-onnx": ["export-onnx", "--model", model, "--out", out / "enc.onnx"],
        "export-hf": ["export-hf", "--model", model, "--out", out],
        "evaluate": ["evaluate", "--model", model, "--task", "classify", "--train", world.labelled, "--out", out,
                     "--quiet"],
        "finetune": ["finetune", "--model", model, "--train", world.spelled, "--dev", world.spelled, "--out", out],
    }[name]


@pytest.mark.parametrize("command", ["extract", "export-onnx", "export-hf", "evaluate", "finetune"])
@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_model_is_one_line_naming_it(tmp_path, capsys, world, command, broken):
    model = world.broken[broken]
    before = snapshot(world.root / "broken")
    out = tmp_path / "out"
    res = run_cli(capsys, *_command(command, model, world, out))
    assert_refused(res, model)
    assert not out.exists() and snapshot(world.root / "broken") == before
    assert not any(" error: " in line and line[-1:] == "(" for line in res.err.splitlines())


def _broken_recognizer(world, tmp_path, how: str):
    d = tmp_path / "rec"
    shutil.copytree(world.recognizer / "model", d)
    if how == "plain_model":
        (d / "ctc.json").unlink()
    elif how == "garbage_ctc_json":
        (d / "ctc.json").write_text("{", encoding="utf-8")
    elif how == "no_units":
        (d / "units.txt").unlink()
    elif how == "truncated_weights":
        w = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(w[:100])
    elif how == "other_format":
        meta = json.loads((d / "ctc.json").read_text())
        (d / "ctc.json").write_text(json.dumps(dict(meta, format="not-ctc")))
    return d


@pytest.mark.parametrize("command", ["transcribe", "score"])
@pytest.mark.parametrize("how", ["plain_model", "garbage_ctc_json", "no_units", "truncated_weights", "other_format"])
def test_a_broken_recognizer_is_one_line_naming_it(tmp_path, capsys, world, command, how):
    rec = _broken_recognizer(world, tmp_path, how)
    argv = (["transcribe", "--model", rec, world.audio / "utt00.wav", "--out", tmp_path / "t.json"]
            if command == "transcribe" else ["score", "--model", rec, "--data", world.spelled, "--out",
                                             tmp_path / "s.json"])
    res = run_cli(capsys, *argv)
    assert_refused(res, rec)
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "s.json").exists()


def test_a_truncated_checkpoint_message_is_whole_sentences(tmp_path, capsys, world):
    res = run_cli(capsys, "extract", "--model", world.broken["truncated_ckpt"], "--data", world.audio,
                  "--out", tmp_path / "x")
    assert_refused(res, world.broken["truncated_ckpt"])
    assert res.error.endswith((")", ".")) and "If you are seeing this error" not in res.error


def test_a_corrupt_checkpoint_with_no_earlier_one_says_so(tmp_path, capsys):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step00000010.ckpt").write_bytes(b"\0" * 100)
    (ckpts / "step00000010.ckpt.sha256.json").write_text(json.dumps({"sha256": "0" * 64, "bytes": 5000}))
    assert latest_checkpoint(tmp_path / "run") is None
    err = capsys.readouterr().err
    assert "step00000010.ckpt is truncated" in err and "previous checkpoint" not in err
    assert "no earlier checkpoint" in err and (ckpts / "step00000010.ckpt.corrupt").exists()

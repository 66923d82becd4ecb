"""Family 5, output paths: every command that writes x every ``--out`` that cannot take its output.

A file where a folder is meant (or the reverse), a path under a file, a read-only file system and an
output of another kind are each one line naming the path, before any work, and nothing there changes.
Rerunning into an output of the same kind works, and leaves nothing stale beside the new results."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import yaml

from tests.bad_inputs.conftest import TINY_RUN, assert_refused, run_cli, snapshot

FOLDER_WRITERS = {  # command -> argv with OUT for the output folder
    "pretrain": lambda w, out: ["pretrain", "--data", w.audio, "--out", out, *TINY_RUN],
    "finetune": lambda w, out: ["finetune", "--model", w.model, "--train", w.spelled, "--dev", w.spelled,
                                "--out", out, "--max-steps", "2"],
    "extract": lambda w, out: ["extract", "--model", w.model, "--data", w.audio, "--out", out, "--quiet"],
    "evaluate": lambda w, out: ["evaluate", "--model", "fbank", "--task", "classify", "--train", w.labelled,
                                "--out", out, "--quiet", "--epochs", "2"],
    "export-hf": lambda w, out: ["export-hf", "--model", w.model, "--out", out],
    "data shard": lambda w, out: ["data", "shard", w.audio, "--out", out, "--quiet"],
    "data synth": lambda w, out: ["data", "synth", "--out", out, "--minutes", "0.2"],
    "data prepare": lambda w, out: ["data", "prepare", "folder", w.audio, "--out", out],
    "data download": lambda w, out: ["data", "download", "speechcommands", "--out", out],  # refused before any download
    "demo": lambda w, out: ["demo", "--out", out, "--quick"],
}
FILE_WRITERS = {  # command -> (argv with OUT for the output file, the file name it takes)
    "export-onnx": (lambda w, out: ["export-onnx", "--model", w.model, "--out", out, "--no-check"], "enc.onnx"),
    "transcribe": (lambda w, out: ["transcribe", "--model", w.recognizer, w.audio / "utt00.wav", "--out", out],
                   "text.tsv"),
    "score": (lambda w, out: ["score", "--model", w.recognizer, "--data", w.spelled, "--out", out], "score.json"),
    "data check --json": (lambda w, out: ["data", "check", w.audio, "--json", out], "check.json"),
    "evaluate (.json)": (lambda w, out: ["evaluate", "--model", "fbank", "--task", "classify", "--train",
                                         w.labelled, "--out", out, "--quiet", "--epochs", "2"], "report.json"),
}


def _pretrain_run(folder):
    """What a pre-training run folder looks like (its config and a checkpoint folder)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"preset": "tiny", "model": {}, "train": {}}))
    (folder / "checkpoints" / "step00000100.ckpt").write_bytes(b"weights")
    return folder


def _other_kind(tmp_path, command):
    if command == "pretrain":  # a folder of extracted features
        d = tmp_path / "features_out"
        (d / "features").mkdir(parents=True)
        (d / "index.tsv").write_text("id\tfile\n")
        (d / "features.json").write_text("{}")
        return d
    return _pretrain_run(tmp_path / "run")


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """``tmp_path/ro`` behaves as a read-only file system (the tests run as root, which chmod cannot stop)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old.txt").write_text("kept")
    access, statvfs = os.access, os.statvfs

    def fake_access(path, mode, *a, **k):
        if str(path).startswith(str(ro)) and mode & os.W_OK:
            return False
        return access(path, mode, *a, **k)

    def fake_statvfs(path):
        st = statvfs(path)
        if str(path).startswith(str(ro)):
            return SimpleNamespace(f_flag=st.f_flag | os.ST_RDONLY)
        return st

    monkeypatch.setattr(os, "access", fake_access)
    monkeypatch.setattr(os, "statvfs", fake_statvfs)
    return ro


@pytest.mark.parametrize("command", sorted(FOLDER_WRITERS))
@pytest.mark.parametrize("case", ["a_file", "under_a_file", "read_only", "another_kind"])
def test_a_folder_out_that_cannot_take_the_output_is_one_line(tmp_path, capsys, world, read_only, command, case):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("precious\n")
    out = {"a_file": blocker, "under_a_file": blocker / "run", "read_only": read_only / "run",
           "another_kind": None}[case] or _other_kind(tmp_path, command)
    before = snapshot(tmp_path)
    res = run_cli(capsys, *FOLDER_WRITERS[command](world, out))
    assert_refused(res, out, max_lines=1)
    assert {"a_file": "is an existing file", "under_a_file": "is a file", "read_only": "read-only file system",
            "another_kind": "already holds"}[case] in res.error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", sorted(FILE_WRITERS))
@pytest.mark.parametrize("case", ["a_folder", "under_a_file", "read_only", "another_kind"])
def test_a_file_out_that_cannot_take_the_output_is_one_line(tmp_path, capsys, world, read_only, command, case):
    argv, name = FILE_WRITERS[command]
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("precious\n")
    manifest = tmp_path / name  # a file of the right name that holds something else: a manifest, notes
    manifest.write_text("path\tlabel\nutt00.wav\tyes\n")
    folder = tmp_path / "folder" / name  # a folder of the name the file would take
    folder.mkdir(parents=True)
    out = {"a_folder": folder, "under_a_file": blocker / name, "read_only": read_only / name,
           "another_kind": manifest}[case]
    before = snapshot(tmp_path)
    res = run_cli(capsys, *argv(world, out))
    assert_refused(res, out, max_lines=1)
    assert {"a_folder": "is a folder", "under_a_file": "is a file", "read_only": "read-only file system",
            "another_kind": "is an existing file that is not"}[case] in res.error
    assert snapshot(tmp_path) == before


def test_extract_again_into_its_own_folder_leaves_nothing_stale(tmp_path, capsys, world):
    out = tmp_path / "x"
    args = ["extract", "--model", world.model, "--out", out, "--quiet", "--workers", "0"]
    assert run_cli(capsys, *args, "--data", world.audio).code == 0
    assert len(list((out / "features").glob("*.npy"))) == 12
    few = tmp_path / "few"
    few.mkdir()
    (few / "bad.wav").write_bytes(b"RIFF")
    for i in range(2):
        (few / f"utt{i:02d}.wav").write_bytes((world.audio / f"utt{i:02d}.wav").read_bytes())
    assert run_cli(capsys, *args, "--data", few).code == 0
    assert sorted(p.name for p in (out / "features").glob("*.npy")) == ["utt00.npy", "utt01.npy"]
    assert (out / "skipped_files.tsv").exists()
    (few / "bad.wav").unlink()
    assert run_cli(capsys, *args, "--data", few).code == 0
    assert not (out / "skipped_files.tsv").exists()  # the earlier run's list of bad files is gone too


@pytest.mark.parametrize("name", ["t.tsv", "t.json"])
def test_transcribe_again_into_its_own_file(tmp_path, capsys, world, name):
    out = tmp_path / name
    for _ in range(2):
        res = run_cli(capsys, "transcribe", "--model", world.recognizer, world.audio / "utt00.wav", "--out", out)
        assert res.code == 0, res.err
    assert "utt00.wav" in out.read_text()


def test_score_and_check_again_into_their_own_files(tmp_path, capsys, world):
    for _ in range(2):
        assert run_cli(capsys, "score", "--model", world.recognizer, "--data", world.spelled,
                       "--out", tmp_path / "s.json").code == 0
        assert run_cli(capsys, "data", "check", world.audio, "--json", tmp_path / "c.json").code == 0


def test_data_shard_again_continues_its_own_folder(tmp_path, capsys, world):
    out = tmp_path / "shar"
    for _ in range(2):
        res = run_cli(capsys, "data", "shard", world.audio, "--out", out, "--quiet")
        assert res.code == 0, res.err
    assert (out / "shar_index.json").is_file()


def test_evaluate_again_into_its_own_folder_leaves_no_plot_of_the_earlier_task(tmp_path, capsys, world):
    out = tmp_path / "ev"
    res = run_cli(capsys, "evaluate", "--model", "fbank", "--task", "classify", "--train", world.labelled,
                  "--test", world.labelled, "--out", out, "--quiet", "--epochs", "2")
    assert res.code == 0, res.err
    assert (out / "report_confusion.png").is_file()
    res = run_cli(capsys, "evaluate", "--model", "fbank", "--task", "asr", "--train", world.spelled, "--test",
                  world.spelled, "--dev", world.spelled, "--out", out, "--quiet", "--asr-epochs", "1")
    assert res.code == 0, res.err
    assert (out / "report_layers.png").is_file() and not (out / "report_confusion.png").exists()

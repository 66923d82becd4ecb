"""Family 6, tiny corpora and data that lies: corpora too small for what a command needs, files whose
manifest promises more audio than they hold, and items listed twice, x the commands that train,
evaluate and write.

Too small is one line with the number needed; a lying file is skipped and listed in training and an
error naming it in evaluation; a repeated item is used once everywhere."""

from __future__ import annotations

import logging

import pytest
import soundfile as sf

from tests.bad_inputs.conftest import TINY_RUN, assert_refused, run_cli
from tests.conftest import harmonic_tone, write_wav

DEFAULTS = ["--preset", "tiny", "--max-steps", "1", "--set", "train.num_workers=0"]  # val_items 32, 10 buckets


def _corpus(folder, n, seconds=1.0):
    for i in range(n):
        write_wav(folder / f"u{i:02d}.wav", harmonic_tone(seconds, f0=110 + 20 * i, seed=i))
    return folder


@pytest.mark.parametrize("n,extra,need", [(12, [], 36), (1, [], 36), (3, ["--set", "train.val_items=0"], 4),
                                          (6, ["--set", "train.val_items=8"], 12)])
def test_pretraining_on_a_corpus_too_small_says_how_many_it_needs(tmp_path, capsys, n, extra, need):
    data = _corpus(tmp_path / "data", n)
    out = tmp_path / "run"
    res = run_cli(capsys, "pretrain", "--data", data, "--out", out, *DEFAULTS, *extra)
    assert_refused(res, data, f"{n} usable utterance(s)", f"need at least {need}")
    assert not out.exists()


def test_pretraining_on_utterances_all_too_short(tmp_path, capsys):
    data = _corpus(tmp_path / "data", 5, seconds=0.3)
    res = run_cli(capsys, "pretrain", "--data", data, "--out", tmp_path / "run", *DEFAULTS)
    assert_refused(res, data, "no utterance of at least 0.5 s")
    assert not (tmp_path / "run").exists()


def test_pretraining_skips_and_lists_a_lying_file_and_uses_a_repeated_one_once(tmp_path, capsys, caplog):
    data = _corpus(tmp_path / "data", 8)
    sf.write(str(data / "cut.wav"), harmonic_tone(2.58, seed=9), 16000)
    b = (data / "cut.wav").read_bytes()
    (data / "cut.wav").write_bytes(b[: len(b) // 3])  # 0.86 s left; the manifest says 2.58
    rows = [f"u{i:02d}.wav\t1.000" for i in range(8)] + ["u00.wav\t1.000", "cut.wav\t2.580"]
    (data / "m.tsv").write_text("path\tseconds\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        res = run_cli(capsys, "pretrain", "--data", data / "m.tsv", "--out", out, *TINY_RUN)
    assert res.code == 0, res.err
    assert "data: 7 utterances" in res.err  # 9 distinct pieces of audio, 2 held out (the lying one among them)
    assert "1 repeated item(s) dropped" in caplog.text
    skipped = (out / "skipped_files.tsv").read_text()
    assert str(data / "cut.wav") in skipped and "the manifest says 2.58 s" in skipped
    assert len([line for line in skipped.splitlines() if "cut.wav" in line]) == 1 and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("lie,needle", [("truncated", "truncated audio"), ("wrong_seconds", "'seconds' is 2.58")])
def test_a_lying_file_in_an_evaluation_set_is_an_error_naming_it(tmp_path, capsys, world, lie, needle):
    folder = tmp_path / "test"
    folder.mkdir()
    sf.write(str(folder / "cut.wav"), harmonic_tone(2.58 if lie == "truncated" else 1.0, seed=9), 16000)
    if lie == "truncated":
        b = (folder / "cut.wav").read_bytes()
        (folder / "cut.wav").write_bytes(b[: len(b) // 3])
    (folder / "t.tsv").write_text(f"path\tseconds\tlabel\tspeaker\ncut.wav\t2.58\tlo\tx\n"
                                  f"{world.labelled.parent / 'audio' / 's1_hi_0.wav'}\t0.6\thi\tx\n")
    res = run_cli(capsys, "evaluate", "--model", "fbank", "--task", "classify", "--train", world.labelled,
                  "--test", folder / "t.tsv", "--out", tmp_path / "eval", "--quiet")
    assert_refused(res, folder / "cut.wav", needle)
    assert not (tmp_path / "eval").exists()


def test_finetuning_on_two_utterances_trains(tmp_path, capsys, world):
    rows = world.spelled.read_text().splitlines()
    two = tmp_path / "two.tsv"
    two.write_text("\n".join(rows[:3]).replace("audio/", f"{world.spelled.parent}/audio/") + "\n")
    res = run_cli(capsys, "finetune", "--model", world.model, "--train", two, "--dev", two, "--out", tmp_path / "ft",
                  "--max-steps", "2", "--set", "train.num_workers=0", "--set", "train.max_batch_seconds=8",
                  "--set", "train.max_utt_seconds=4", "--set", "specaug.freq_mask_width=8")
    assert res.code == 0, res.err
    assert (tmp_path / "ft" / "model" / "ctc.json").is_file()


def test_a_failed_finetune_leaves_nothing_behind(tmp_path, capsys, world):
    notext = tmp_path / "notext.tsv"
    notext.write_text("path\n" + "\n".join(str(p) for p in sorted(world.audio.glob("*.wav"))[:3]) + "\n")
    out = tmp_path / "ft"
    res = run_cli(capsys, "finetune", "--model", world.model, "--train", notext, "--dev", notext, "--out", out)
    assert_refused(res, notext, "no transcripts")
    assert not out.exists()


def test_evaluation_on_too_few_items_for_a_dev_split(tmp_path, capsys, world):
    rows = world.labelled.read_text().splitlines()
    few = tmp_path / "few.tsv"
    few.write_text("\n".join(rows[:3]).replace("audio/", f"{world.labelled.parent}/audio/") + "\n")
    res = run_cli(capsys, "evaluate", "--model", "fbank", "--task", "classify", "--train", few, "--test", few,
                  "--out", tmp_path / "eval", "--quiet")
    assert_refused(res, "too few items (2)", "--dev")


@pytest.mark.parametrize("command", ["extract", "data shard", "data check"])
def test_a_one_file_corpus_is_enough_for_what_does_not_train(tmp_path, capsys, world, command):
    data = _corpus(tmp_path / "data", 1)
    out = tmp_path / "out"
    argv = {"extract": ["extract", "--model", world.model, "--data", data, "--out", out, "--quiet", "--workers", "0"],
            "data shard": ["data", "shard", data, "--out", out, "--quiet"],
            "data check": ["data", "check", data]}[command]
    res = run_cli(capsys, *argv)
    assert res.code == 0, res.err

"""svqmae.recipes: manifests from small directory trees laid out like the real corpora."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from svqmae import cli
from svqmae.data import DataError, cut_fields, load_source
from svqmae.data.recipes import DOWNLOADS, KS_CLASSES, download, prepare
from tests.conftest import harmonic_tone, write_wav


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _tone(path: Path, seconds: float = 0.5, sr: int = 16000, seed: int = 0) -> None:
    write_wav(path, harmonic_tone(seconds, sr=sr, seed=seed), sr)


def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech"
    for part, spk, chap in (("dev-clean", "1272", "128104"), ("train-clean-100", "19", "198")):
        d = root / part / spk / chap
        lines = []
        for u in range(2):
            uid = f"{spk}-{chap}-{u:04d}"
            _tone(d / f"{uid}.flac", 0.4 + 0.1 * u, seed=u)
            lines.append(f"{uid} HELLO WORLD NUMBER {u}")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    summary = prepare("librispeech", tmp_path, tmp_path / "out")  # the parent of LibriSpeech/ works too
    assert set(summary) == {"dev-clean", "train-clean-100"}
    rows = _rows(tmp_path / "out" / "dev-clean.tsv")
    assert [(r["speaker"], r["text"]) for r in rows] == [("1272", "HELLO WORLD NUMBER 0"), ("1272", "HELLO WORLD NUMBER 1")]
    assert float(rows[1]["seconds"]) == pytest.approx(0.5)
    # both written forms load, and point at the real files
    for name in ("dev-clean.tsv", "dev-clean_cuts.jsonl.gz"):
        cuts = load_source(tmp_path / "out" / name)
        assert sorted(cut_fields(c)["text"] for c in cuts) == ["HELLO WORLD NUMBER 0", "HELLO WORLD NUMBER 1"]


def test_aishell(tmp_path):
    base = tmp_path / "data_aishell"
    lines = []
    for part, spk in (("train", "S0002"), ("dev", "S0724"), ("test", "S0764")):
        for u in range(2):
            uid = f"BAC009{spk}W{u:04d}"
            _tone(base / "wav" / part / spk / f"{uid}.wav", seed=u)
            lines.append(f"{uid} 而 对 楼市 成交 {u}")
    (base / "transcript").mkdir(parents=True)
    (base / "transcript" / "aishell_transcript_v0.8.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = prepare("aishell", base, tmp_path / "out")
    assert {k: v["utterances"] for k, v in summary.items()} == {"train": 2, "dev": 2, "test": 2}
    rows = _rows(tmp_path / "out" / "train.tsv")
    assert {r["speaker"] for r in rows} == {"S0002"}
    assert sorted(r["text"] for r in rows) == ["而对楼市成交0", "而对楼市成交1"]  # characters, no spaces


def _speech_commands(tmp_path: Path) -> Path:
    src = tmp_path / "speech_commands_v0.01"
    files = {"yes": ["aaa_nohash_0", "bbb_nohash_0", "ccc_nohash_0"], "no": ["aaa_nohash_1", "ddd_nohash_0"],
             "bed": ["eee_nohash_0", "fff_nohash_0"]}
    for word, names in files.items():
        for i, n in enumerate(names):
            _tone(src / word / f"{n}.wav", 1.0, seed=i)
    write_wav(src / "_background_noise_" / "white_noise.wav",
              (0.1 * np.random.default_rng(0).standard_normal(16000 * 10 + 500)).astype(np.float32))
    (src / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\nbed/fff_nohash_0.wav\n")
    (src / "testing_list.txt").write_text("yes/ccc_nohash_0.wav\n")
    test = tmp_path / "speech_commands_test_set_v0.01"
    for label in ("yes", "_unknown_", "_silence_"):
        _tone(test / label / f"ggg_nohash_{label.strip('_')}.wav", 1.0)
    return src


def test_speechcommands_superb_ks(tmp_path):
    src = _speech_commands(tmp_path)
    summary = prepare("speechcommands", src, tmp_path / "out")
    train, dev, test = (_rows(tmp_path / "out" / f"{s}.tsv") for s in ("train", "dev", "test"))
    words = [(r["path"].split("/")[-2], r["label"], r["speaker"]) for r in train if r["label"] != "_silence_"]
    assert sorted(words) == [("bed", "_unknown_", "eee"), ("no", "no", "aaa"), ("no", "no", "ddd"),
                             ("yes", "yes", "aaa")]
    # _silence_: 1 s segments of the noise file, every 10th to dev
    sil_train = [r for r in train if r["label"] == "_silence_"]
    sil_dev = [r for r in dev if r["label"] == "_silence_"]
    assert (len(sil_train), len(sil_dev)) == (9, 1)
    assert all(float(r["end"]) - float(r["start"]) == pytest.approx(1.0) for r in sil_train + sil_dev)
    assert sorted(r["label"] for r in dev if r["label"] != "_silence_") == ["_unknown_", "yes"]
    # test = SUPERB's test list (the separate test archive), not testing_list.txt
    assert sorted(r["label"] for r in test) == ["_silence_", "_unknown_", "yes"]
    assert all("speech_commands_test_set_v0.01" in r["path"] for r in test)
    assert set(summary["train"]["labels"]) <= set(KS_CLASSES)
    segs = load_source(tmp_path / "out" / "train.tsv")
    assert sum(cut_fields(c)["label"] == "_silence_" for c in segs) == 9


def test_speechcommands_without_the_test_archive_falls_back_to_testing_list(tmp_path):
    src = _speech_commands(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "speech_commands_test_set_v0.01")
    prepare("speechcommands", src, tmp_path / "out")
    assert [r["label"] for r in _rows(tmp_path / "out" / "test.tsv")] == ["yes"]


def test_iemocap_four_classes_and_session_folds(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    emos = {"F000": "neu", "F001": "exc", "M000": "ang", "M001": "sad", "F002": "fru", "M002": "hap"}
    for s in (1, 2):
        dialog = f"Ses0{s}F_impro01"
        ev, tr = [], []
        for k, (suffix, emo) in enumerate(emos.items()):
            utt = f"{dialog}_{suffix}"
            _tone(root / f"Session{s}" / "sentences" / "wav" / dialog / f"{utt}.wav", 0.5, seed=k)
            ev.append(f"[{k:.4f} - {k + 0.5:.4f}]\t{utt}\t{emo}\t[2.5000, 2.5000, 2.5000]")
            tr.append(f"{utt} [{k:07.4f}-{k + 0.5:07.4f}]: words number {k}.")
        d = root / f"Session{s}" / "dialog"
        (d / "EmoEvaluation").mkdir(parents=True)
        (d / "EmoEvaluation" / f"{dialog}.txt").write_text("% header\n\n" + "\n\n".join(ev) + "\n")
        (d / "transcriptions").mkdir()
        (d / "transcriptions" / f"{dialog}.txt").write_text("\n".join(tr) + "\n")
    summary = prepare("iemocap", tmp_path, tmp_path / "out")
    assert set(summary) == {"all", "fold1_train", "fold1_test", "fold2_train", "fold2_test"}
    assert summary["all"]["labels"] == {"ang": 2, "hap": 4, "neu": 2, "sad": 2}  # exc merged, fru dropped
    test1 = _rows(tmp_path / "out" / "fold1_test.tsv")
    assert {r["speaker"] for r in test1} == {"Ses01F", "Ses01M"}
    assert all("Session1" in r["path"] for r in test1)
    assert all("Session2" in r["path"] for r in _rows(tmp_path / "out" / "fold1_train.tsv"))
    f001 = next(r for r in test1 if r["path"].endswith("_F001.wav"))
    assert (f001["label"], f001["text"]) == ("hap", "words number 1.")


def test_folder_with_labels_from_folders(tmp_path, capsys):
    for label in ("cat", "dog"):
        for i in range(2):
            _tone(tmp_path / "src" / label / f"{i}.wav", seed=i)
    assert cli.main(["data", "prepare", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                     "--label-from-folder"]) == 0
    assert "all" in capsys.readouterr().out
    rows = _rows(tmp_path / "out" / "all.tsv")
    assert sorted(r["label"] for r in rows) == ["cat", "cat", "dog", "dog"]
    assert (tmp_path / "out" / rows[0]["path"]).is_file()  # relative to the manifest's folder


def test_wrong_layouts_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for corpus in ("librispeech", "aishell", "speechcommands", "iemocap"):
        assert cli.main(["data", "prepare", corpus, str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("svqmae data: error:") and str(tmp_path / "empty") in err and "\n" not in err


def test_download_table_has_checksums_and_refuses_what_it_cannot_fetch(tmp_path):
    for parts in DOWNLOADS.values():
        for a in parts.values():
            assert a.url.startswith("http") and (a.digest is None or a.digest.split(":")[0] in ("md5", "sha256"))
    assert sum(a.digest is not None for parts in DOWNLOADS.values() for a in parts.values()) >= 9
    with pytest.raises(DataError, match="not publicly downloadable"):
        download("iemocap", tmp_path)
    with pytest.raises(DataError, match="unknown part"):
        download("librispeech", tmp_path, ["train-clean-9000"])

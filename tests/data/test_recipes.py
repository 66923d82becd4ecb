"""svqmae.recipes: manifests from small directory trees laid out like the real corpora."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from svqmae import cli
from svqmae.data import DataError, cut_fields, load_source
from svqmae.data.recipes import (
    DOWNLOADS,
    KS_CLASSES,
    download,
    prepare,
    prepare_s3prl,
    s3prl_ks_bucket,
    s3prl_ks_speaker,
)
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


def _iemocap(tmp_path: Path) -> Path:
    """Sessions 1 and 2 of IEMOCAP_full_release, one dialog each: neu, exc, ang, sad, fru (dropped), hap."""
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
    return root


def test_iemocap_four_classes_and_session_folds(tmp_path):
    _iemocap(tmp_path)
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


# --------------------------------------------------------------------------- s3prl's layouts


def test_s3prl_ks_bucket_is_s3prls_speaker_hash_split():
    # s3prl's split_dataset: sha1 of the part before _nohash_, mod 2**27, as a percentage
    names = [f"{i:08x}_nohash_{i % 3}.wav" for i in range(3000)]
    buckets = [s3prl_ks_bucket(n) for n in names]
    share = {b: buckets.count(b) / len(buckets) for b in ("dev", "discarded", "train")}
    assert abs(share["dev"] - 0.1) < 0.02 and abs(share["discarded"] - 0.1) < 0.02
    assert s3prl_ks_bucket("0a2b400e_nohash_0.wav") == s3prl_ks_bucket("0a2b400e_nohash_4.wav")  # per speaker
    for spk in ("en+Marco", "en-029+f2", "x"):
        for bucket in ("train", "dev"):
            name = s3prl_ks_speaker(spk, bucket)
            assert s3prl_ks_bucket(f"{name}_nohash_7.wav") == bucket and name.isalnum()


def _s3prl_ks_corpus(tmp_path: Path) -> Path:
    """Speech Commands v0.01 with speakers named into s3prl's train and dev buckets, and its test set."""
    src = tmp_path / "speech_commands_v0.01"
    spk = {b: s3prl_ks_speaker(b, b) for b in ("train", "dev")}
    for word, bucket in (("yes", "train"), ("yes", "dev"), ("bed", "train"), ("no", "train")):
        _tone(src / word / f"{spk[bucket]}_nohash_0.wav", 1.0)
    write_wav(src / "_background_noise_" / "white_noise.wav",
              (0.1 * np.random.default_rng(0).standard_normal(16000 * 3)).astype(np.float32))
    _tone(tmp_path / "speech_commands_test_set_v0.01" / "_silence_" / "a_nohash_0.wav", 1.0)
    _tone(tmp_path / "speech_commands_test_set_v0.01" / "yes" / "b_nohash_0.wav", 1.0, sr=8000)  # converted
    return src


def test_speechcommands_in_s3prls_layout(tmp_path, capsys):
    src = _s3prl_ks_corpus(tmp_path)
    out = tmp_path / "ks"
    assert cli.main(["data", "prepare", "speechcommands", str(tmp_path), "--out", str(out), "--layout", "s3prl"]) == 0
    printed = capsys.readouterr().out
    assert f"-c {out / 'speech_commands.yaml'}" in printed
    train = out / "train"
    assert sorted(p.relative_to(train).as_posix() for p in train.rglob("*.wav")) == sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*.wav"))
    assert next((train / "yes").iterdir()).resolve().parent == (src / "yes").resolve()  # linked, not copied
    converted = out / "test" / "yes" / "b_nohash_0.wav"
    assert not converted.is_symlink() and sf.info(str(converted)).samplerate == 16000
    config = yaml.safe_load((out / "speech_commands.yaml").read_text())
    assert config["downstream_expert"]["datarc"]["speech_commands_root"] == str(train.resolve())
    assert config["downstream_expert"]["datarc"]["speech_commands_test_root"] == str((out / "test").resolve())
    summary = prepare_s3prl("speechcommands", src, out)  # again: replaces its links
    assert summary["dev"]["labels"] == {"_silence_": 1, "yes": 1}
    assert summary["train"]["labels"] == {"_silence_": 1, "_unknown_": 1, "no": 1, "yes": 1}
    assert summary["test"]["labels"] == {"_silence_": 1, "yes": 1}


def test_s3prl_layout_refuses_what_s3prl_would_misread(tmp_path):
    src = _s3prl_ks_corpus(tmp_path)
    (src / "forward").mkdir()
    with pytest.raises(DataError, match="forward: this is Speech Commands v0.02"):
        prepare_s3prl("speechcommands", src, tmp_path / "a")
    (src / "forward").rmdir()
    noise = src / "_background_noise_" / "white_noise.wav"
    write_wav(noise, np.zeros(8000, np.float32))
    with pytest.raises(DataError, match="white_noise.wav: background noise shorter than 1 s"):
        prepare_s3prl("speechcommands", src, tmp_path / "b")
    write_wav(noise, np.zeros(16000, np.float32))
    for f in (src / "yes").glob(f"{s3prl_ks_speaker('dev', 'dev')}_*"):
        f.unlink()
    with pytest.raises(DataError, match="no training file falls in s3prl's dev split"):
        prepare_s3prl("speechcommands", src, tmp_path / "c")
    import shutil

    shutil.rmtree(tmp_path / "speech_commands_test_set_v0.01")
    with pytest.raises(DataError, match="no speech_commands_test_set_v0.01"):
        prepare_s3prl("speechcommands", src, tmp_path / "d")
    with pytest.raises(DataError, match="--layout s3prl: not for 'aishell'"):
        prepare_s3prl("aishell", src, tmp_path / "e")


def test_iemocap_in_s3prls_layout(tmp_path):
    root = _iemocap(tmp_path)
    out = tmp_path / "er"
    summary = prepare_s3prl("iemocap", tmp_path, out)
    assert {k: v["utterances"] for k, v in summary.items()} == {
        "fold1_train": 5, "fold1_test": 5, "fold2_train": 5, "fold2_test": 5}
    # as s3prl's IEMOCAP_preprocess.py writes it: paths from the corpus root, exc as hap, fru dropped
    test1 = json.loads((out / "meta_data" / "Session1" / "test_meta_data.json").read_text())
    assert test1["labels"] == {"neu": 0, "hap": 1, "ang": 2, "sad": 3}
    assert sorted((m["path"], m["label"], m["speaker"]) for m in test1["meta_data"]) == [
        (f"Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_{u}.wav", lab, "Ses01F")
        for u, lab in (("F000", "neu"), ("F001", "hap"), ("M000", "ang"), ("M001", "sad"), ("M002", "hap"))]
    train1 = json.loads((out / "meta_data" / "Session1" / "train_meta_data.json").read_text())
    assert {m["path"].split("/")[0] for m in train1["meta_data"]} == {"Session2"}
    assert all((root / m["path"]).is_file() for m in train1["meta_data"] + test1["meta_data"])
    datarc = yaml.safe_load((out / "emotion.yaml").read_text())["downstream_expert"]["datarc"]
    assert (datarc["root"], datarc["meta_data"]) == (str(root.resolve()), str((out / "meta_data").resolve()))

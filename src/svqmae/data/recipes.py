"""Corpus recipes: ``svqmae data prepare NAME SRC_DIR --out DIR`` and ``svqmae data download NAME --out DIR``.

Every recipe turns a corpus laid out as it is distributed into named splits, and writes each split
twice into ``DIR``: ``SPLIT.tsv`` (the manifest form every command reads: ``path`` relative to
``DIR``, ``seconds``, ``speaker``, ``label``, ``text``, ``start``/``end``) and ``SPLIT_cuts.jsonl.gz``
(a lhotse CutSet, the label in ``supervision.custom["label"]``).

- ``librispeech`` and ``aishell`` use lhotse's own recipes; splits are the corpus parts
  (``train-clean-100``, ``dev-clean``, ... / ``train``, ``dev``, ``test``).
- ``speechcommands`` is SUPERB KS: Speech Commands v0.01, 12 classes (ten words, ``_unknown_`` for
  every other word, ``_silence_`` cut into 1 s segments from ``_background_noise_``); ``train`` /
  ``dev`` from ``validation_list.txt`` and ``testing_list.txt``; ``test`` is SUPERB's test list, the
  separate ``speech_commands_test_set_v0.01`` archive.
- ``iemocap`` is SUPERB ER: 4 classes (neu, hap with exc merged into it, ang, sad), the five
  leave-one-session-out folds ``fold1_train`` / ``fold1_test`` ... and ``all``.
- ``folder``: every audio file under SRC_DIR as ``all`` (labels from the parent folder's name with
  ``--label-from-folder``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lhotse import CutSet, SupervisionSegment

from .sources import DataError, Problems, _probe_all, cut_fields, cuts_to_rows, scan_folder, write_manifest

KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KS_CLASSES = (*KS_WORDS, "_unknown_", "_silence_")
ER_CLASSES = ("neu", "hap", "ang", "sad")
ER_MERGE = {"exc": "hap"}


def _with_supervision(rec, label: str = "", speaker: str = "", text: str = "", start: float = 0.0,
                      duration: float | None = None, cut_id: str | None = None):
    """A cut over ``rec`` (or a segment of it) carrying one supervision with our fields."""
    duration = rec.duration - start if duration is None else duration
    cut = rec.to_cut()
    if start > 0 or duration < rec.duration:
        cut = cut.truncate(offset=start, duration=duration, preserve_id=True)
    cut.id = cut_id or rec.id
    cut.supervisions = [SupervisionSegment(
        id=cut.id, recording_id=rec.id, start=0.0, duration=duration, speaker=speaker or None,
        text=text or None, custom={"label": label} if label else None)]
    return cut


def _probe(files: list[tuple[str, Path]], what: str) -> dict:
    """Probe audio headers; a corpus file that cannot be read is an error naming it."""
    problems = Problems()
    recs = _probe_all(files, problems)
    if len(problems):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{what}: {problems.items[0][1]}{more}")
    return recs


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: not found ({what})")
    return path


# --------------------------------------------------------------------------- librispeech, aishell (lhotse)


def _from_lhotse(manifests: dict, src: Path) -> dict[str, CutSet]:
    out = {}
    for part, m in sorted(manifests.items()):
        if len(m["recordings"]) == 0:
            continue
        out[part] = CutSet.from_manifests(recordings=m["recordings"], supervisions=m["supervisions"])
    if not out:
        raise DataError(f"{src}: no audio found in the expected layout")
    return out


def prepare_librispeech(src: Path, **_) -> dict[str, CutSet]:
    """``LibriSpeech/{part}/{speaker}/{chapter}/*.flac`` + ``*.trans.txt``; SRC may be the
    ``LibriSpeech`` folder or its parent."""
    from lhotse.recipes import prepare_librispeech as lhotse_prepare

    if not any((src / p).is_dir() for p in LIBRISPEECH_PARTS) and (src / "LibriSpeech").is_dir():
        src = src / "LibriSpeech"
    if not any((src / p).is_dir() for p in LIBRISPEECH_PARTS):
        raise DataError(f"{src}: no LibriSpeech part folder (e.g. train-clean-100, dev-clean) found")
    return _from_lhotse(lhotse_prepare(src, dataset_parts="auto", num_jobs=4), src)


def prepare_aishell(src: Path, **_) -> dict[str, CutSet]:
    """``data_aishell/wav/{train,dev,test}/{speaker}/*.wav`` + ``data_aishell/transcript/
    aishell_transcript_v0.8.txt``; SRC holds ``data_aishell`` (or is it). Text: characters, no spaces."""
    from lhotse.recipes import prepare_aishell as lhotse_prepare

    if src.name == "data_aishell":
        src = src.parent
    transcript = src / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt"
    if not transcript.is_file():
        raise DataError(f"{transcript}: not found (expected the AISHELL-1 layout under {src})")
    return _from_lhotse(lhotse_prepare(src), src)


# --------------------------------------------------------------------------- speech commands (SUPERB KS)


def _ks_label(word: str) -> str:
    return word if word in KS_WORDS else "_unknown_"


def _silence_cuts(noise_dir: Path, dev_every: int = 10) -> tuple[list, list]:
    """1 s ``_silence_`` segments cut from the background-noise files: every ``dev_every``-th
    segment of each file goes to dev, the rest to train."""
    files = sorted(noise_dir.glob("*.wav"))
    recs = _probe([(f"_background_noise_/{f.stem}", f) for f in files], "speech commands background noise")
    train, dev = [], []
    for rid in sorted(recs):
        rec = recs[rid]
        for k in range(int(rec.duration)):
            cut = _with_supervision(rec, "_silence_", "_background_noise_", start=float(k), duration=1.0,
                                    cut_id=f"{rid}#{k:04d}")
            (dev if k % dev_every == dev_every - 1 else train).append(cut)
    return train, dev


def _find_ks_test(src: Path, test_dir: Path | None) -> Path | None:
    if test_dir is not None:
        return _need_dir(test_dir, "the speech_commands_test_set_v0.01 folder given by --test-dir")
    for cand in (src / "speech_commands_test_set_v0.01", src.parent / "speech_commands_test_set_v0.01"):
        if cand.is_dir():
            return cand
    return None


def prepare_speechcommands(src: Path, test_dir: Path | None = None, **_) -> dict[str, CutSet]:
    """SUPERB KS on Speech Commands v0.01. SRC is the extracted v0.01 archive (word folders,
    ``_background_noise_``, ``validation_list.txt``, ``testing_list.txt``) or a folder holding it as
    ``speech_commands_v0.01``; the test set is ``speech_commands_test_set_v0.01`` beside or inside
    it, or ``--test-dir``. Without it, ``test`` falls back to ``testing_list.txt`` (not SUPERB's)."""
    if not (src / "_background_noise_").is_dir() and (src / "speech_commands_v0.01").is_dir():
        src = src / "speech_commands_v0.01"
    noise = _need_dir(src / "_background_noise_", "the Speech Commands v0.01 layout")
    lists = {}
    for name in ("validation_list.txt", "testing_list.txt"):
        f = src / name
        if not f.is_file():
            raise DataError(f"{f}: not found (the Speech Commands v0.01 layout)")
        lists[name] = {line.strip() for line in f.read_text().splitlines() if line.strip()}
    words = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("_")
                   and d.name != "speech_commands_test_set_v0.01")
    files = [(f"{w}/{f.name}", f) for w in words for f in sorted((src / w).glob("*.wav"))]
    recs = _probe([(rid[:-4], f) for rid, f in files], str(src))
    splits: dict[str, list] = {"train": [], "dev": [], "test": []}
    for rid, _ in files:
        word, name = rid.split("/")
        split = "dev" if rid in lists["validation_list.txt"] else "test" if rid in lists["testing_list.txt"] else "train"
        cut = _with_supervision(recs[rid[:-4]], _ks_label(word), name.split("_nohash_")[0], word)
        splits[split].append(cut)
    sil_train, sil_dev = _silence_cuts(noise)
    splits["train"] += sil_train
    splits["dev"] += sil_dev
    test_root = _find_ks_test(src, test_dir)
    if test_root is not None:
        splits["test"] = _ks_test_set(test_root)
    else:
        logging.warning(f"{src}: no speech_commands_test_set_v0.01 found; 'test' is testing_list.txt "
                        f"(not SUPERB's test set, and without _silence_)")
    return {k: CutSet.from_cuts(v) for k, v in splits.items() if v}


def _ks_test_set(root: Path) -> list:
    """SUPERB's KS test list: the v0.01 test archive, one folder per class (``_silence_`` and
    ``_unknown_`` included), 1 s clips."""
    files = [(f"{d.name}/{f.stem}", f) for d in sorted(root.iterdir()) if d.is_dir()
             for f in sorted(d.glob("*.wav"))]
    unknown = sorted({rid.split("/")[0] for rid, _ in files} - set(KS_CLASSES))
    if unknown:
        raise DataError(f"{root}: unexpected class folders {', '.join(unknown)} (expected {', '.join(KS_CLASSES)})")
    recs = _probe(files, str(root))
    cuts = []
    for rid, f in files:
        label = rid.split("/")[0]
        speaker = f.stem.split("_nohash_")[0] if "_nohash_" in f.stem else ""
        cuts.append(_with_supervision(recs[rid], label, speaker, "" if label == "_silence_" else label,
                                      cut_id=f"test/{rid}"))
    return cuts


# --------------------------------------------------------------------------- IEMOCAP (SUPERB ER)

_EMO_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(Ses\w+)\s+(\w+)\s")
_TEXT_LINE = re.compile(r"^(Ses\w+)\s+\[[^\]]*\]:\s*(.*)$")


def _iemocap_root(src: Path) -> Path:
    if not (src / "Session1").is_dir() and (src / "IEMOCAP_full_release").is_dir():
        src = src / "IEMOCAP_full_release"
    return src


def _iemocap_items(src: Path) -> list[tuple[str, str, str, Path, str]]:
    """(session, utterance, label, wav, text) of every utterance labelled with one of the 4 classes
    (exc merged into hap), sessions and label files in sorted order; a labelled file that is missing
    is an error naming it."""
    sessions = sorted(d for d in src.glob("Session[1-5]") if d.is_dir())
    if not sessions:
        raise DataError(f"{src}: no Session1..Session5 folders (the IEMOCAP_full_release layout)")
    items = []  # (session, utt, label, wav, text)
    for sess in sessions:
        texts = {}
        for t in sorted((sess / "dialog" / "transcriptions").glob("*.txt")):
            for line in t.read_text(errors="replace").splitlines():
                m = _TEXT_LINE.match(line.strip())
                if m:
                    texts[m.group(1)] = m.group(2).strip()
        evals = sorted((sess / "dialog" / "EmoEvaluation").glob("*.txt"))
        if not evals:
            raise DataError(f"{sess / 'dialog' / 'EmoEvaluation'}: no label files")
        for ev in evals:
            for line in ev.read_text(errors="replace").splitlines():
                m = _EMO_LINE.match(line)
                if not m:
                    continue
                utt, emo = m.group(3), ER_MERGE.get(m.group(4), m.group(4))
                if emo not in ER_CLASSES:
                    continue
                wav = sess / "sentences" / "wav" / ev.stem / f"{utt}.wav"
                items.append((sess.name, utt, emo, wav, texts.get(utt, "")))
    if not items:
        raise DataError(f"{src}: no utterance labelled {'/'.join(ER_CLASSES)} (or exc) found")
    missing = [str(w) for _, _, _, w, _ in items if not w.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: file not found (labelled in EmoEvaluation; {len(missing)} missing)")
    return items


def prepare_iemocap(src: Path, **_) -> dict[str, CutSet]:
    """``IEMOCAP_full_release/Session{1-5}/sentences/wav/{dialog}/{utt}.wav`` with labels from
    ``Session{n}/dialog/EmoEvaluation/{dialog}.txt`` and text from ``dialog/transcriptions``.
    4 classes (exc merged into hap); fold k tests on session k and trains on the other four."""
    src = _iemocap_root(src)
    items = _iemocap_items(src)
    recs = _probe([(utt, wav) for _, utt, _, wav, _ in items], str(src))
    by_session: dict[str, list] = {}
    for sess, utt, emo, _, text in items:
        speaker = f"{utt[:5]}{utt.rsplit('_', 1)[-1][0]}"  # Ses01 + F/M of the utterance's speaker
        by_session.setdefault(sess, []).append(_with_supervision(recs[utt], emo, speaker, text))
    splits = {"all": CutSet.from_cuts(c for s in sorted(by_session) for c in by_session[s])}
    for sess in sorted(by_session):
        fold = int(sess[-1])
        splits[f"fold{fold}_test"] = CutSet.from_cuts(by_session[sess])
        splits[f"fold{fold}_train"] = CutSet.from_cuts(c for s in sorted(by_session) if s != sess
                                                       for c in by_session[s])
    return splits


# --------------------------------------------------------------------------- folder


def prepare_folder(src: Path, label_from_folder: bool = False, **_) -> dict[str, CutSet]:
    """Every audio file under SRC (recursively) as ``all``; unreadable files are errors."""
    problems = Problems()
    cuts = scan_folder(_need_dir(src, "a folder of audio"), problems)
    if len(problems):
        raise DataError(f"{problems.items[0][1]} ({len(problems)} unreadable files; see svqmae data check)")
    out = []
    for cut in cuts:
        label = Path(cut.recording.sources[0].source).parent.name if label_from_folder else ""
        out.append(_with_supervision(cut.recording, label))
    return {"all": CutSet.from_cuts(out)}


# --------------------------------------------------------------------------- driver

RECIPES: dict[str, Callable[..., dict[str, CutSet]]] = {
    "librispeech": prepare_librispeech,
    "aishell": prepare_aishell,
    "speechcommands": prepare_speechcommands,
    "iemocap": prepare_iemocap,
    "folder": prepare_folder,
}

LIBRISPEECH_PARTS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other",
                     "test-clean", "test-other", "dev-clean-2", "train-clean-5")


def prepare(name: str, src: str | Path, out: str | Path, **options) -> dict[str, dict]:
    """Run recipe ``name`` on ``src``; write ``out/SPLIT.tsv`` and ``out/SPLIT_cuts.jsonl.gz``.
    Returns {split: {"utterances", "hours", "labels"}}."""
    if name not in RECIPES:
        raise DataError(f"unknown corpus '{name}' (choose from {', '.join(RECIPES)})")
    src, out = Path(src).resolve(), Path(out)
    _need_dir(src, f"the {name} corpus folder")
    splits = RECIPES[name](src, **options)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, cuts in splits.items():
        cuts = cuts.to_eager()
        cuts.to_file(out / f"{split}_cuts.jsonl.gz")
        write_manifest(cuts_to_rows(cuts, out), out / f"{split}.tsv")
        labels: dict[str, int] = {}
        for c in cuts:
            lab = cut_fields(c)["label"]
            if lab:
                labels[lab] = labels.get(lab, 0) + 1
        summary[split] = {"utterances": len(cuts), "hours": sum(c.duration for c in cuts) / 3600,
                          "labels": dict(sorted(labels.items()))}
    return summary


# --------------------------------------------------------------------------- s3prl's layouts (SUPERB with s3prl)
# ``svqmae data prepare speechcommands|iemocap SRC --out DIR --layout s3prl``: the folders and files that
# s3prl 0.4.18's run_downstream.py reads for -d speech_commands / -d emotion, and a config for it.

KS_V002_WORDS = ("backward", "follow", "forward", "learn", "visual")  # only in Speech Commands v0.02
S3PRL_KS_CONFIG = "speech_commands.yaml"
S3PRL_ER_CONFIG = "emotion.yaml"


def s3prl_ks_bucket(name: str) -> str:
    """Where s3prl's Speech Commands recipe puts a training file, by its name alone (``split_dataset``
    in ``s3prl/downstream/speech_commands/expert.py``; ``validation_list.txt`` is not read): the sha1
    of the speaker hash before ``_nohash_`` as a percentage, < 10 ``dev``, < 20 ``discarded`` (the
    original paper's test part), else ``train``."""
    max_per_class = 2**27 - 1
    speaker = re.sub(r"_nohash_.*$", "", name)
    pct = (int(hashlib.sha1(speaker.encode("utf-8")).hexdigest(), 16) % (max_per_class + 1)) * (100.0 / max_per_class)
    return "dev" if pct < 10 else "discarded" if pct < 20 else "train"


def s3prl_ks_speaker(speaker: str, bucket: str) -> str:
    """A file-name speaker id for ``speaker`` (its letters and digits and a 3-digit suffix) that s3prl
    puts in ``bucket`` (``train`` or ``dev``): for audio that is not Speech Commands, whose speakers
    would otherwise fall where their names hash, a tenth of them discarded."""
    stem = re.sub(r"[^A-Za-z0-9]", "", speaker) or "spk"
    for k in range(1000):
        if s3prl_ks_bucket(f"{stem}{k:03d}") == bucket:
            return f"{stem}{k:03d}"
    raise ValueError(f"no name for speaker {speaker!r} in s3prl's {bucket!r} bucket")  # never: p ~ 0.8^1000


def _place_wav(src: Path, dest: Path) -> None:
    """``dest`` (.wav) as a link to ``src`` if that is already 16 kHz mono WAV, else converted to it."""
    import soundfile as sf

    from .audio import read_audio, write_audio

    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        info = sf.info(str(src))
    except Exception as e:
        raise DataError(f"{src}: unreadable audio ({e})") from None
    if info.format == "WAV" and info.samplerate == 16000 and info.channels == 1:
        dest.symlink_to(src.resolve())
    else:
        write_audio(dest, read_audio(src, 16000), 16000)


def write_s3prl_ks(out: str | Path, train: list[tuple[str, str, Path]], noise: list[Path],
                   test: list[tuple[str, str, Path]]) -> dict[str, dict]:
    """Write s3prl's Speech Commands layout into ``out``: ``train/WORD/NAME.wav`` (``train``:
    (word, name, audio); words outside the ten are s3prl's ``_unknown_``), ``train/_background_noise_/``
    (``noise``: s3prl's ``_silence_``, 1 s crops of files >= 1 s), ``test/CLASS/NAME.wav`` (``test``:
    (class, name, audio), the 12 classes as folder names), all 16 kHz WAV (links where the source is
    one), and ``speech_commands.yaml``. Names are ``SPEAKER_nohash_N``; s3prl splits train and dev by
    the speaker part (:func:`s3prl_ks_bucket`). Returns {split: {utterances, hours, labels}} for
    s3prl's train / dev / discarded / test."""
    out = Path(out)
    summary: dict[str, dict] = {}

    def count(split: str, label: str, path: Path) -> None:
        import soundfile as sf

        s = summary.setdefault(split, {"utterances": 0, "hours": 0.0, "labels": {}})
        s["utterances"] += 1
        s["hours"] += sf.info(str(path)).duration / 3600
        s["labels"][label] = s["labels"].get(label, 0) + 1

    bad = sorted({c for c, _, _ in test} - set(KS_CLASSES))
    if bad:
        raise DataError(f"test classes {', '.join(bad)}: s3prl's Speech Commands test folders are {', '.join(KS_CLASSES)}")
    if not noise:
        raise DataError(f"{out}: no _background_noise_ audio (s3prl's _silence_ class comes only from it)")
    for word, name, path in train:
        dest = out / "train" / word / f"{name}.wav"
        _place_wav(path, dest)
        count(s3prl_ks_bucket(dest.name), _ks_label(word), dest)
    for path in noise:
        dest = out / "train" / "_background_noise_" / f"{path.stem}.wav"
        _place_wav(path, dest)
        import soundfile as sf

        if sf.info(str(dest)).frames < 16000:
            raise DataError(f"{path}: background noise shorter than 1 s (s3prl crops 1 s of it)")
        for split in ("train", "dev"):  # s3prl adds every noise file to both
            count(split, "_silence_", dest)
    for cls, name, path in test:
        dest = out / "test" / cls / f"{name}.wav"
        _place_wav(path, dest)
        count("test", cls, dest)
    if not summary.get("dev", {}).get("labels", {}).keys() - {"_silence_"}:
        raise DataError(f"{out}: no training file falls in s3prl's dev split (speaker hash < 10%); "
                        "name speakers with svqmae.data.recipes.s3prl_ks_speaker")
    config = _S3PRL_KS_YAML.format(train=(out / "train").resolve(), test=(out / "test").resolve())
    (out / S3PRL_KS_CONFIG).write_text(config)
    for s in summary.values():
        s["labels"] = dict(sorted(s["labels"].items()))
    return {k: summary[k] for k in ("train", "dev", "discarded", "test") if k in summary}


def s3prl_speechcommands(src: Path, out: Path, test_dir: Path | None = None, **_) -> dict[str, dict]:
    """SUPERB KS for s3prl from the public archives: Speech Commands v0.01 (not v0.02, whose extra
    words s3prl would count as _unknown_) and its separate test set, both required."""
    if not (src / "_background_noise_").is_dir() and (src / "speech_commands_v0.01").is_dir():
        src = src / "speech_commands_v0.01"
    noise = sorted(_need_dir(src / "_background_noise_", "the Speech Commands v0.01 layout").glob("*.wav"))
    words = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("_")
                   and d.name != "speech_commands_test_set_v0.01")
    v2 = [w for w in words if w in KS_V002_WORDS]
    if v2:
        raise DataError(f"{src}: has folders {', '.join(v2)}: this is Speech Commands v0.02; SUPERB's KS "
                        "(and s3prl's recipe) uses v0.01 (svqmae data download speechcommands)")
    test_root = _find_ks_test(src, test_dir)
    if test_root is None:
        raise DataError(f"{src}: no speech_commands_test_set_v0.01 beside or inside it (s3prl's test set; "
                        "pass --test-dir)")
    train = [(w, f.stem, f) for w in words for f in sorted((src / w).glob("*.wav"))]
    test = [(d.name, f.stem, f) for d in sorted(test_root.iterdir()) if d.is_dir() for f in sorted(d.glob("*.wav"))]
    return write_s3prl_ks(out, train, noise, test)


def s3prl_iemocap(src: Path, out: Path, **_) -> dict[str, dict]:
    """SUPERB ER for s3prl: ``meta_data/Session{k}/{train,test}_meta_data.json`` as s3prl's
    ``IEMOCAP_preprocess.py`` writes them (paths relative to the corpus root, the 4 labels, exc merged
    into hap, speaker = the dialog's session and gender), and ``emotion.yaml`` with the corpus as
    ``root``. The audio stays where it is."""
    src = _iemocap_root(src)
    items = _iemocap_items(src)
    by_session: dict[str, list[dict]] = {}
    for sess, _utt, emo, wav, _text in items:
        rel = wav.relative_to(src).as_posix()
        by_session.setdefault(sess, []).append({"path": rel, "label": emo, "speaker": wav.name.split("_")[0]})
    labels = {c: i for i, c in enumerate(ER_CLASSES)}
    summary = {}
    for sess in sorted(by_session):
        d = out / "meta_data" / sess
        d.mkdir(parents=True, exist_ok=True)
        train = [m for s in sorted(by_session) if s != sess for m in by_session[s]]
        for split, meta in (("train", train), ("test", by_session[sess])):
            (d / f"{split}_meta_data.json").write_text(json.dumps({"labels": labels, "meta_data": meta}))
            counts: dict[str, int] = {}
            for m in meta:
                counts[m["label"]] = counts.get(m["label"], 0) + 1
            summary[f"fold{sess[-1]}_{split}"] = {"utterances": len(meta), "hours": float("nan"),
                                                 "labels": dict(sorted(counts.items()))}
    config = _S3PRL_ER_YAML.format(root=src.resolve(), meta=(out / "meta_data").resolve())
    (out / S3PRL_ER_CONFIG).write_text(config)
    return summary


S3PRL_LAYOUTS: dict[str, Callable[..., dict[str, dict]]] = {
    "speechcommands": s3prl_speechcommands,
    "iemocap": s3prl_iemocap,
}
S3PRL_CONFIGS = {"speechcommands": S3PRL_KS_CONFIG, "iemocap": S3PRL_ER_CONFIG}


def prepare_s3prl(name: str, src: str | Path, out: str | Path, **options) -> dict[str, dict]:
    """Write corpus ``name`` in the layout s3prl's run_downstream.py reads, with its config
    (``out/speech_commands.yaml`` or ``out/emotion.yaml``: pass it with ``-c``)."""
    if name not in S3PRL_LAYOUTS:
        raise DataError(f"--layout s3prl: not for '{name}' (only {', '.join(S3PRL_LAYOUTS)})")
    src, out = Path(src).resolve(), Path(out)
    _need_dir(src, f"the {name} corpus folder")
    out.mkdir(parents=True, exist_ok=True)
    return S3PRL_LAYOUTS[name](src, out, **options)


# s3prl 0.4.18's downstream/{speech_commands,emotion}/config.yaml (not in its PyPI package), data paths
# filled in and num_workers 2 (s3prl's 8 / 6 are for its cluster).
def _s3prl_runner_yaml(total: int, accumulate: int, log: int, evaluate: int) -> str:
    return f"""runner:
  total_steps: {total}
  gradient_clipping: 1
  gradient_accumulate_steps: {accumulate}
  log_step: {log}
  eval_step: {evaluate}
  save_step: 1000
  max_keep: 1
  eval_dataloaders:
    - dev
    - test

optimizer:
  name: TorchOptim
  torch_optim_name: Adam
  lr: 1.0e-4
"""


_S3PRL_KS_YAML = ("# s3prl 0.4.18 downstream/speech_commands/config.yaml with this folder's data; written by "
                  "svqmae data prepare\n" + _s3prl_runner_yaml(200000, 1, 100, 5000)
                  + """
downstream_expert:
  datarc:
    speech_commands_root: {train}
    speech_commands_test_root: {test}
    num_workers: 2
    batch_size: 32

  modelrc:
    projector_dim: 256
    select: UtteranceLevel
    UtteranceLevel:
      pooling: MeanPooling
""")

_S3PRL_ER_YAML = ("# s3prl 0.4.18 downstream/emotion/config.yaml with this corpus; written by svqmae data prepare\n"
                  + _s3prl_runner_yaml(30000, 8, 500, 1000) + """
downstream_expert:
  datarc:
    root: {root}
    meta_data: {meta}
    test_fold: fold1
    pre_load: True
    train_batch_size: 4
    eval_batch_size: 4
    num_workers: 2
    valid_ratio: 0.2

  modelrc:
    projector_dim: 256
    select: UtteranceLevel

    UtteranceLevel:
      pooling: MeanPooling

    DeepModel:
      model_type: CNNSelfAttention
      hidden_dim: 80
      kernel_size: 5
      padding: 2
      pooling: 5
      dropout: 0.4
""")


# --------------------------------------------------------------------------- download


@dataclass(frozen=True)
class Archive:
    url: str
    digest: str | None  # "sha256:..." or "md5:..."; None where no checksum is published
    into: str  # folder under --out to extract into


_LS = "https://www.openslr.org/resources/12"
DOWNLOADS: dict[str, dict[str, Archive]] = {
    "librispeech": {
        part: Archive(f"{_LS}/{part}.tar.gz", f"sha256:{digest}", ".")
        for part, digest in {
            "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
            "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
            "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
            "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
            "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
            "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
            "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
        }.items()
    },
    "aishell": {
        "data": Archive("https://www.openslr.org/resources/33/data_aishell.tgz",
                        "md5:2f494334227864a8a8fec932999db9d8", "."),
        "resource": Archive("https://www.openslr.org/resources/33/resource_aishell.tgz",
                            "md5:957d480a0fcac85fc18e550756f624e5", "."),
    },
    "speechcommands": {
        "train": Archive("http://download.tensorflow.org/data/speech_commands_v0.01.tar.gz",
                         "sha256:743935421bb51cccdb6bdd152e04c5c70274e935c82119ad7faeec31780d811d",
                         "speech_commands_v0.01"),
        "test": Archive("http://download.tensorflow.org/data/speech_commands_test_set_v0.01.tar.gz", None,
                        "speech_commands_test_set_v0.01"),
    },
}
DEFAULT_PARTS = {"librispeech": ("dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100")}


def download(name: str, out: str | Path, parts: list[str] | None = None, log=print) -> Path:
    """Download, verify and extract a public corpus into ``out``; returns the folder to give to
    ``prepare``. Archives already verified are not fetched again."""
    if name == "iemocap":
        raise DataError("iemocap: not publicly downloadable; request it from https://sail.usc.edu/iemocap/ "
                        "and run `svqmae data prepare iemocap IEMOCAP_full_release --out DIR`")
    if name not in DOWNLOADS:
        raise DataError(f"no download for '{name}' (choose from {', '.join([*DOWNLOADS, 'iemocap'])})")
    table = DOWNLOADS[name]
    parts = list(parts or DEFAULT_PARTS.get(name, table))
    bad = [p for p in parts if p not in table]
    if bad:
        raise DataError(f"{name}: unknown part(s) {', '.join(bad)} (choose from {', '.join(table)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        a = table[part]
        archive = out / "archives" / a.url.rsplit("/", 1)[-1]
        _fetch(a, archive, log)
        dest = out / a.into
        log(f"extracting {archive.name} into {dest}")
        _extract(archive, dest)
    if name == "aishell":  # AISHELL-1 ships one tarball per speaker inside data_aishell/wav
        for inner in sorted((out / "data_aishell" / "wav").glob("*.tar.gz")):
            _extract(inner, inner.parent)
            inner.unlink()
    return {"librispeech": out / "LibriSpeech", "aishell": out, "speechcommands": out}[name]


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(a: Archive, dest: Path, log) -> None:
    algo, want = (a.digest.split(":") if a.digest else ("sha256", None))
    if dest.is_file() and (want is None or _digest(dest, algo) == want):
        log(f"{dest}: already downloaded")
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    log(f"downloading {a.url}")
    h = hashlib.new(algo)
    with urllib.request.urlopen(a.url) as r, open(tmp, "wb") as f:
        total, done = int(r.headers.get("Content-Length") or 0), 0
        for block in iter(lambda: r.read(1 << 20), b""):
            f.write(block)
            h.update(block)
            done += len(block)
            if total and sys.stderr.isatty():
                print(f"\r  {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB", end="", file=sys.stderr)
    got = h.hexdigest()
    if want is not None and got != want:
        tmp.unlink()
        raise DataError(f"{a.url}: checksum mismatch ({algo} {got}, expected {want}); download removed")
    tmp.replace(dest)
    log(f"{dest}: {algo} {got}" + (" (verified)" if want else " (no published checksum to verify against)"))


def _extract(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, links out of dest, devices
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive}: cannot extract ({e})") from None


def remove_archives(out: str | Path) -> None:
    shutil.rmtree(Path(out) / "archives", ignore_errors=True)


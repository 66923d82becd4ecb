"""svqmae.synth: the eSpeak NG demo corpus is deterministic, speaker-disjoint and labelled as documented."""

from __future__ import annotations

import csv
import ctypes
import re
import statistics
from pathlib import Path

import pytest

from svqmae import cli
from svqmae.data import load_source
from svqmae.data.synth import KS_CLASSES, LABELS, STYLES, TASKS, VARIANTS, ESpeak, plan, synthesize


def _variants(setting: str) -> list[str]:
    """Our voice variants whose eSpeak NG voice file has the line ``setting`` (e.g. ``klatt 6``)."""
    import espeakng_loader

    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    pattern = re.compile(rf"^\s*{re.escape(setting)}\s*$", re.M)
    return [v for v in VARIANTS if pattern.search((folder / v).read_text(encoding="utf-8", errors="replace"))]


def _disturb_process() -> None:
    """What other code in a long-lived process (the test session, a notebook) may do between two runs:
    draw from and reseed the C library's rand() (where the ``klatt 6`` voices take their noise), and
    synthesize with eSpeak NG itself."""
    libc = ctypes.CDLL(None)
    libc.srand(12345)
    libc.rand()
    with ESpeak() as engine:
        for voice in ("en-us+caleb", "en-us+m3"):
            engine.say("stop", voice, 160, 50, 50, 100, seed=1)


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    assert cli.main(["data", "synth", "--out", str(out), "--minutes", "0.5", "--seed", "7"]) == 0
    return out


def test_same_seed_gives_identical_manifests_and_audio(corpus, tmp_path):
    klatt6 = _variants("klatt 6")
    assert klatt6 and any(u.voice.split("+")[1] in klatt6 for u in plan(0.5, seed=7) if not u.silence)
    _disturb_process()  # this used to change the klatt 6 files (keywords-00027, caleb) and most others
    again = tmp_path / "b"
    synthesize(again, minutes=0.5, seed=7, workers=1, log=lambda m: None)  # another worker count
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(f.suffix == ".flac" for f in files)
    differ = [str(f) for f in files if (corpus / f).read_bytes() != (again / f).read_bytes()]
    assert not differ, f"{len(differ)} of {len(files)} files differ: {differ[:5]}"


def test_engine_output_depends_only_on_what_it_rendered():
    """Every fresh engine renders the same utterances to the same samples, whatever the process did in
    between: covers the voices whose noise comes from the C library's rand() (``klatt 6``), the other
    Klatt voices and a plain one, each rendered several times in one process."""
    klatt6 = _variants("klatt 6")
    assert klatt6
    voices = [f"en-us+{v}" for v in (*klatt6, "klatt2", "klatt4", "edward", "m3")]

    def renders(engine):
        return [engine.say(word, v, 175, 50, 50, 100, seed=1000 + i).tobytes()
                for i, v in enumerate(voices) for word in ("left", "seven")]

    with ESpeak() as first:
        ref = renders(first)
        for _ in range(3):
            _disturb_process()
            renders(first)  # another engine in the process keeps going
            with ESpeak() as engine:
                got = renders(engine)
            differ = sorted({voices[i // 2] for i, (a, b) in enumerate(zip(ref, got)) if a != b})
            assert not differ, f"renders changed for {differ}"


def test_layout_labels_and_speaker_disjoint_splits(corpus):
    for task in TASKS:
        train, test = _rows(corpus / task / "train.tsv"), _rows(corpus / task / "test.tsv")
        assert train and test
        spk_train = {r["speaker"] for r in train if r.get("speaker")}
        spk_test = {r["speaker"] for r in test if r.get("speaker")}
        assert spk_test and not spk_train & spk_test, task
        variants = lambda spk: {s.split("+")[1] for s in spk}  # noqa: E731
        assert not variants(spk_train) & variants(spk_test), task  # test voices unheard in training
    kw = _rows(corpus / "keywords" / "train.tsv") + _rows(corpus / "keywords" / "test.tsv")
    assert {r["label"] for r in kw} == set(KS_CLASSES)
    assert all(float(r["seconds"]) == 1.0 for r in kw)
    assert {r["label"] for r in _rows(corpus / "styles" / "test.tsv")} == set(STYLES)
    zh = _rows(corpus / "mandarin" / "train.tsv")
    assert all(r["text"] and all("\u4e00" <= ch <= "\u9fff" for ch in r["text"]) for r in zh)
    en = _rows(corpus / "english" / "train.tsv")
    assert all(r["text"] == r["text"].upper() and " " in r["text"] for r in en)
    # pretrain.tsv: every train file of every task, loadable as a source
    pre = load_source(corpus / "pretrain.tsv")
    assert len(pre) == sum(len(_rows(corpus / t / "train.tsv")) for t in TASKS)


def test_styles_differ_in_rate_as_designed():
    items = [u for u in plan(20, seed=1) if u.task == "styles"]
    rate = {s: statistics.mean(u.rate for u in items if u.label == s) for s in STYLES}
    pitch = {s: statistics.mean(u.pitch for u in items if u.label == s) for s in STYLES}
    assert rate["sad"] < rate["neutral"] < rate["happy"] < rate["angry"]
    assert pitch["sad"] < pitch["neutral"] < pitch["happy"]


def test_plan_depends_on_seed_and_scales_with_minutes():
    a, b = plan(5, seed=0), plan(5, seed=1)
    assert a == plan(5, seed=0) and a != b
    assert len(plan(20, seed=0)) > 3 * len(a)


def test_reuses_a_finished_corpus(corpus, capsys):
    synthesize(corpus, minutes=0.5, seed=7)
    assert "reusing" in capsys.readouterr().out


def test_more_test_items_leave_the_planned_corpus_alone():
    base, more = plan(5, seed=0), plan(5, seed=0, test_items=100)
    assert more[: len(base)] == base  # the pre-training set and the planned test items are the same
    added = more[len(base):]
    assert {u.task for u in added} == set(LABELS) and all(u.split == "test" for u in added)
    assert len({u.path for u in more}) == len(more)
    train_variants = {u.voice.split("+")[1] for u in base if u.split == "train"}
    for task, labels in LABELS.items():
        test = [u for u in more if u.task == task and u.split == "test"]
        assert len(test) >= 100
        extra = [u for u in added if u.task == task]
        assert statistics.pvariance([sum(u.label == c for u in extra) for c in labels]) == 0  # classes balanced
        assert not {u.voice.split("+")[1] for u in test} & train_variants  # still unseen voices
        # more voices than the planned test split had
        assert len({u.voice for u in test}) > 2 * len({u.voice for u in base if u.task == task and u.split == "test"})


def test_synthesized_test_items_add_files_and_change_none(corpus, tmp_path):
    more = tmp_path / "more"
    summary = synthesize(more, minutes=0.5, seed=7, log=lambda m: None, test_items=24)
    assert summary["test_items"] == 24
    for task in TASKS:
        assert _rows(more / task / "train.tsv") == _rows(corpus / task / "train.tsv")
        test, before = _rows(more / task / "test.tsv"), _rows(corpus / task / "test.tsv")
        assert test[: len(before)] == before
        assert len(test) >= 24 if task in LABELS else test == before
    assert (more / "pretrain.tsv").read_bytes() == (corpus / "pretrain.tsv").read_bytes()
    shared = [p.relative_to(corpus) for p in corpus.rglob("*.flac")]
    assert shared and all((more / f).read_bytes() == (corpus / f).read_bytes() for f in shared)
    assert synthesize(more, minutes=0.5, seed=7, log=lambda m: None, test_items=24) == summary  # reused

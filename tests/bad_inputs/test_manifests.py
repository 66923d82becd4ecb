"""Family 2, manifests and lhotse files: generated manifests (hypothesis) mixing good rows with every
way a row lies or breaks, read as an evaluation set (strict), as training data (lenient) and by
``data check``; and a table of broken lhotse files x the commands that read them.

What a generated manifest must give: an evaluation read either the good rows, each piece of audio
once, or a DataError naming the manifest or the file at fault; a training read the good rows, the
others listed (or found when read, then an AudioError naming the file); ``data check`` the good rows'
count, every bad file listed, and no traceback."""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svqmae.data import AudioError, DataError, Problems, load_cut, load_source
from tests.bad_inputs.conftest import FUZZ, assert_refused, run_cli, snapshot
from tests.conftest import harmonic_tone, write_wav

GOOD_SECONDS = 1.0

# row kind -> (is it usable, how the row is written: (path, seconds, start, end) for file k of the pool)
ROWS = {
    "good": (True, lambda k: (f"good{k}.wav", f"{GOOD_SECONDS:.3f}", "", "")),
    "good_no_seconds": (True, lambda k: (f"good{k}.wav", "", "", "")),
    "good_segment": (True, lambda k: (f"good{k}.wav", "", "0.2", "0.7")),
    "subfolder_path": (True, lambda k: (f"./sub/../good{k}.wav", "1.0", "", "")),
    "missing_file": (False, lambda k: (f"missing{k}.wav", "1.0", "", "")),
    "garbage_file": (False, lambda k: ("garbage.wav", "1.0", "", "")),
    "lying_seconds": (False, lambda k: (f"good{k}.wav", "2.58", "", "")),
    "end_past_file": (False, lambda k: (f"good{k}.wav", "", "0.2", "3.5")),
    "empty_segment": (False, lambda k: (f"good{k}.wav", "", "0.7", "0.2")),
}
MALFORMED = {  # a value no read can use: a DataError naming the manifest's row, in every mode
    "text_seconds": ("good0.wav", "abc", "", ""),
    "negative_seconds": ("good0.wav", "-1", "", ""),
    "nan_seconds": ("good0.wav", "nan", "", ""),
    "empty_path": ("", "1.0", "", ""),
    "huge_seconds": ("good0.wav", "1e308", "", ""),
    "not_utf8": ("caf\u00e9.wav", "1.0", "", ""),  # the manifest is written in Latin-1
}


@pytest.fixture(scope="module")
def pool(world):
    folder = world.root / "pool"
    for k in range(4):
        write_wav(folder / f"good{k}.wav", harmonic_tone(GOOD_SECONDS, f0=120 + 30 * k, seed=k))
    (folder / "garbage.wav").write_bytes(b"RIFF....WAVEfmt " + bytes(40))
    (folder / "sub").mkdir()
    return folder


manifests = st.fixed_dictionaries({
    "rows": st.lists(st.tuples(st.sampled_from(sorted(ROWS)), st.integers(0, 3)), min_size=1, max_size=8),
    "repeat": st.lists(st.integers(0, 7), max_size=3),  # rows written again (duplicates)
    "malformed": st.one_of(st.none(), st.sampled_from(sorted(MALFORMED))),
    "delimiter": st.sampled_from(["\t", ","]),
    "bom": st.booleans(),
    "crlf": st.booleans(),
    "extra_column": st.booleans(),
    "blank_lines": st.booleans(),
})


def _write(folder: Path, spec: dict) -> tuple[Path, list[tuple], set]:
    """The manifest of ``spec`` in ``folder`` -> (its path, written rows, the keys of usable audio)."""
    rows = [(kind, ROWS[kind][1](k)) for kind, k in spec["rows"]]
    rows += [rows[i] for i in spec["repeat"] if i < len(rows)]
    if spec["malformed"]:
        rows.insert(len(rows) // 2, ("malformed", MALFORMED[spec["malformed"]]))
    d = spec["delimiter"]
    header = ["path", "seconds", "start", "end"] + (["note"] if spec["extra_column"] else [])
    lines = [d.join(header)]
    for _, values in rows:
        lines.append(d.join(list(values) + (["x"] if spec["extra_column"] else [])))
        if spec["blank_lines"]:
            lines.append("")
    nl = "\r\n" if spec["crlf"] else "\n"
    path = folder / "m.tsv"
    latin = spec["malformed"] == "not_utf8"
    path.write_text(("\ufeff" if spec["bom"] and not latin else "") + nl.join(lines) + nl,
                    encoding="latin-1" if latin else "utf-8")
    usable = set()
    for kind, (rel, _, start, end) in rows:
        if kind != "malformed" and ROWS[kind][0]:
            p = (folder / rel).resolve()
            usable.add((str(p), float(start or 0), float(end or GOOD_SECONDS) - float(start or 0)))
    return path, rows, usable


@contextmanager
def _generated(pool: Path, spec: dict):
    """A fresh folder holding the pool's audio and the manifest of ``spec``:
    -> (folder, manifest, written rows, usable audio keys)."""
    with tempfile.TemporaryDirectory(dir=pool) as tmp:
        folder = Path(tmp)
        for f in pool.glob("*.wav"):
            (folder / f.name).symlink_to(f)
        (folder / "sub").mkdir()
        yield (folder, *_write(folder, spec))


def _key(cut):
    return str(Path(cut.recording.sources[0].source).resolve()), round(cut.start, 3), round(cut.duration, 3)


def _bad_names(rows) -> set[str]:
    return {rel for kind, (rel, *_) in rows if kind != "malformed" and not ROWS[kind][0]}


@settings(FUZZ, max_examples=25)
@given(spec=manifests)
def test_a_generated_manifest_read_for_evaluation(pool, spec):
    with _generated(pool, spec) as (folder, path, rows, usable):
        try:
            cuts = load_source(path)
        except DataError as e:
            msg = str(e)
            assert "\n" not in msg and (str(path) in msg or any(n.lstrip("./") in msg for n in _bad_names(rows)))
            assert spec["malformed"] or _bad_names(rows), msg
            return
        assert not spec["malformed"] and not _bad_names(rows)
        keys = [_key(c) for c in cuts]
        assert len(keys) == len(set(keys)), "a repeated row was kept twice"
        assert set(keys) == {(p, round(s, 3), round(d, 3)) for p, s, d in usable}


@settings(FUZZ, max_examples=25)
@given(spec=manifests)
def test_a_generated_manifest_read_for_training(pool, spec):
    with _generated(pool, spec) as (folder, path, rows, usable):
        problems = Problems()
        try:
            cuts = list(load_source(path, problems))
        except DataError as e:
            assert "\n" not in str(e) and (spec["malformed"] or not usable), str(e)
            return
        assert not spec["malformed"]
        keys = [_key(c) for c in cuts]
        assert len(keys) == len(set(keys)), "a repeated row was kept twice"
        used = set()
        for cut in cuts:  # what training reads: good audio, or an AudioError naming the file
            try:
                load_cut(cut)
                used.add(_key(cut))
            except AudioError as e:
                assert Path(cut.recording.sources[0].source).name in str(e)
        assert used == {(p, round(s, 3), round(d, 3)) for p, s, d in usable}
        assert len({p for p, _ in problems.items}) == len(problems.items), "a file listed twice"


@settings(FUZZ, max_examples=8)
@given(spec=manifests)
def test_data_check_of_a_generated_manifest(pool, spec, capsys):
    with _generated(pool, spec) as (folder, path, rows, usable):
        before = snapshot(folder)
        res = run_cli(capsys, "data", "check", path)
        assert snapshot(folder) == before
        if spec["malformed"]:
            assert_refused(res, path)
            return
        if not usable:
            assert res.code in (0, 2) and "Traceback" not in res.err
            return
        assert res.code == 0, res.err
        assert f": {len(usable)} usable utterances" in res.out
        problem_lines = res.out.split("problem files:")[1]
        for name in _bad_names(rows):
            assert Path(name).name in problem_lines, (name, res.out)


def test_repeated_rows_are_reported_by_data_check_and_counted_once_by_evaluation(tmp_path, capsys, world, caplog):
    rows = (world.labelled.read_text().splitlines())
    dup = tmp_path / "dup.tsv"
    dup.write_text("\n".join(rows + rows[1:3]).replace("audio/", f"{world.labelled.parent}/audio/") + "\n")
    res = run_cli(capsys, "data", "check", dup)
    assert res.code == 0 and f": {len(rows) - 1} usable utterances" in res.out
    assert "repeated items (counted once, used once by training and evaluation): 2" in res.out
    assert "listed 2 times" in res.out
    assert run_cli(capsys, "data", "check", dup, "--strict").code == 2
    from svqmae.tasks.evaluate.items import load_items

    assert len(load_items(dup, "classify")) == len(rows) - 1
    assert "2 repeated item(s) dropped" in caplog.text


def test_two_files_that_would_share_an_id_are_both_kept(tmp_path, world):
    (tmp_path / "a.wav").write_bytes((world.audio / "utt00.wav").read_bytes())
    (tmp_path / "a.flac").write_bytes(b"")
    import soundfile as sf

    x, sr = sf.read(str(world.audio / "utt01.wav"), dtype="float32")
    sf.write(str(tmp_path / "a.flac"), x, sr)
    cuts = load_source(tmp_path)
    assert sorted(c.id for c in cuts) == ["a.flac", "a.wav"]


def test_a_missing_file_is_listed_once_however_often_it_is_read(tmp_path, world):
    (tmp_path / "m.tsv").write_text(f"path\tseconds\n{world.audio / 'utt00.wav'}\t1.0\ngone.wav\t1.0\n")
    problems = Problems()
    cuts = list(load_source(tmp_path / "m.tsv", problems))
    from svqmae.data import WaveformBatches

    for epoch in range(3):  # every epoch meets it again
        batch = WaveformBatches()[(epoch, 0, cuts)]
        for path, reason in batch["failed"]:
            problems.add(path, reason)
    assert [p for p, _ in problems.items] == [str(tmp_path / "gone.wav")]


def _lhotse_cases(folder: Path, world) -> dict[str, Path]:
    good = world.audio / "utt00.wav"
    out = {}
    out["garbage_gz"] = folder / "cuts.jsonl.gz"
    out["garbage_gz"].write_bytes(b"\x1f\x8b not really gzip")
    out["empty_jsonl"] = folder / "empty_cuts.jsonl"
    out["empty_jsonl"].write_text("")
    out["wrong_schema"] = folder / "odd_cuts.jsonl"
    out["wrong_schema"].write_text('{"id": "x", "hello": "world"}\n')
    out["supervisions_alone"] = folder / "x_supervisions.jsonl.gz"
    with gzip.open(out["supervisions_alone"], "wt") as f:
        f.write('{"id": "s", "recording_id": "r", "start": 0, "duration": 1, "channel": 0}\n')
    out["recordings_of_missing_files"] = folder / "y_recordings.jsonl"
    out["recordings_of_missing_files"].write_text(
        '{"id": "r", "sources": [{"type": "file", "channels": [0], "source": "' + str(folder / "gone.wav")
        + '"}], "sampling_rate": 16000, "num_samples": 16000, "duration": 1.0}\n')
    out["truncated_gz"] = folder / "cut_cuts.jsonl.gz"
    with gzip.open(out["truncated_gz"], "wt") as f:
        f.write('{"id": "r", "sources": [{"type": "file", "channels": [0], "source": "' + str(good)
                + '"}], "sampling_rate": 16000, "num_samples": 16000, "duration": 1.0}\n' * 50)
    out["truncated_gz"].write_bytes(out["truncated_gz"].read_bytes()[:60])
    return out


LHOTSE = ["garbage_gz", "empty_jsonl", "wrong_schema", "supervisions_alone", "recordings_of_missing_files",
          "truncated_gz"]


@pytest.mark.parametrize("command", ["data check", "extract", "evaluate", "pretrain"])
@pytest.mark.parametrize("case", LHOTSE)
def test_a_broken_lhotse_file_is_one_line_naming_it(tmp_path, capsys, world, command, case):
    src = _lhotse_cases(tmp_path, world)[case]
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    argv = {"data check": ["data", "check", src],
            "extract": ["extract", "--model", world.model, "--data", src, "--out", out, "--quiet"],
            "evaluate": ["evaluate", "--model", "fbank", "--task", "classify", "--train", src, "--out", out],
            "pretrain": ["pretrain", "--data", src, "--out", out, "--preset", "tiny", "--max-steps", "1"]}[command]
    res = run_cli(capsys, *argv)
    if command == "data check" and case == "recordings_of_missing_files":  # lists the file, as for any source
        assert res.code == 0 and "gone.wav: file not found" in res.out
        return
    name = "gone.wav" if case == "recordings_of_missing_files" else src
    assert_refused(res, name)
    before.pop(str(out), None)
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(str(out))} == before


@pytest.mark.parametrize("command", ["score", "evaluate"])
def test_an_empty_seconds_cell_is_read_by_score_as_by_evaluate(tmp_path, capsys, world, command):
    rows = world.spelled.read_text().splitlines()
    cells = [r.split("\t") for r in rows[1:]]
    root = world.spelled.parent
    gap = tmp_path / "gap.tsv"
    gap.write_text("path\tseconds\tspeaker\ttext\n" + "".join(
        f"{root / p}\t{'' if i == 1 else s}\t{spk}\t{t}\n" for i, (p, s, spk, t) in enumerate(cells)))
    argv = {"score": ["score", "--model", world.recognizer, "--data", gap, "--out", tmp_path / "s.json"],
            "evaluate": ["evaluate", "--model", "fbank", "--task", "asr", "--train", gap, "--test", gap, "--dev", gap,
                         "--out", tmp_path / "e.json", "--asr-epochs", "1", "--quiet"]}[command]
    res = run_cli(capsys, *argv)
    assert res.code == 0, res.err
    report = json.loads((tmp_path / ("s.json" if command == "score" else "e.json")).read_text())
    assert report.get("utterances", report.get("n_test")) == len(cells)


def test_a_large_manifest_read_lazily_drops_repeats_on_every_pass_and_reports_them_once(tmp_path, world, caplog,
                                                                                      monkeypatch):
    from svqmae.data import sources

    monkeypatch.setattr(sources, "LAZY_MANIFEST_BYTES", 10)
    rows = [f"{world.audio / f'utt{i:02d}.wav'}\t1.000" for i in (0, 1, 2, 1, 0, 1)]
    (tmp_path / "big.tsv").write_text("path\tseconds\n" + "\n".join(rows) + "\n")
    problems = Problems()
    cuts = load_source(tmp_path / "big.tsv", problems)
    assert cuts.is_lazy
    with caplog.at_level(logging.WARNING):
        passes = [[c.id for c in cuts] for _ in range(3)]  # three epochs
    assert all(len(p) == 3 for p in passes) and passes[0] == passes[2]
    assert len(problems.repeated) == 2 and caplog.text.count("repeated item(s) dropped") == 1


@pytest.mark.parametrize("command", ["data check", "extract", "evaluate"])
@pytest.mark.parametrize("case", ["not_utf8", "gzip_bytes", "huge_seconds"])
def test_a_manifest_that_is_no_utf8_text_or_gives_absurd_times_is_one_line(tmp_path, capsys, world, command, case):
    m = tmp_path / "m.tsv"
    good = world.audio / "utt00.wav"
    if case == "not_utf8":
        m.write_bytes(f"path\tlabel\n{good}\tcaf\u00e9\n".encode("latin-1"))
    elif case == "gzip_bytes":
        m.write_bytes(gzip.compress(f"path\n{good}\n".encode()))
    else:
        m.write_text(f"path\tseconds\tlabel\n{good}\t1e308\tx\n")
    argv = {"data check": ["data", "check", m],
            "extract": ["extract", "--model", world.model, "--data", m, "--out", tmp_path / "x", "--quiet"],
            "evaluate": ["evaluate", "--model", "fbank", "--task", "classify", "--train", m, "--test", m,
                         "--out", tmp_path / "e", "--quiet"]}[command]
    res = run_cli(capsys, *argv)
    assert_refused(res, m, "not UTF-8" if case != "huge_seconds" else "'seconds' must be")

"""The --out guard: each kind of output is recognised by what it writes; a file, a path under a file and
another kind are refused naming the path; the same kind passes; a sweep removes what a rerun left."""

from __future__ import annotations

import json

import pytest

from svqmae.tasks.outputs import KINDS, OutputError, file_kind, folder_kind, output_file, output_folder, sweep

FOLDERS = {  # kind -> files that make it
    "demo": ["corpus/corpus.json", "pretrain/config.yaml", "results.md"],
    "corpus": ["corpus.json", "pretrain.tsv", "keywords/train.tsv"],
    "finetune": ["units.txt", "config.yaml", "checkpoints/step00000010.ckpt"],
    "pretrain": ["checkpoints/step00000010.ckpt", "metrics.jsonl"],
    "hf": ["config.json", "preprocessor_config.json", "model.safetensors"],
    "model": ["config.json", "model.safetensors", "README.md"],
    "extract": ["features.json", "index.tsv", "features/a.npy"],
    "shar": ["shar_index.json", "cuts.000000.jsonl.gz"],
    "evaluate": ["results.md", "ks_model/report.json"],
    "manifests": ["train.tsv", "train_cuts.jsonl.gz"],
}


@pytest.mark.parametrize("kind", sorted(FOLDERS))
def test_each_kind_of_folder_is_recognised_and_guards_against_the_others(tmp_path, kind):
    for name in FOLDERS[kind]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert folder_kind(tmp_path) == kind
    assert output_folder(tmp_path, kind) == tmp_path  # the same kind: a rerun
    other = "extract" if kind != "extract" else "pretrain"
    with pytest.raises(OutputError, match=f"already holds {KINDS[kind]}"):
        output_folder(tmp_path, other)


def test_a_pretraining_config_tells_a_run_from_a_finetuning_one(tmp_path):
    (tmp_path / "config.yaml").write_text("preset: tiny\nmodel: {}\ntrain: {}\n")
    assert folder_kind(tmp_path) == "pretrain"
    (tmp_path / "config.yaml").write_text("preset: tiny\nmodel: {}\ntrain: {}\nctc: {}\n")
    assert folder_kind(tmp_path) == "finetune"
    (tmp_path / "config.yaml").write_text("someone: else\n")
    assert folder_kind(tmp_path) is None  # a user's own config.yaml is no run


def test_an_unknown_or_empty_folder_and_a_new_path_pass_and_nothing_is_created(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert output_folder(tmp_path, "extract") == tmp_path
    assert output_folder(tmp_path / "new" / "deeper", "pretrain") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


def test_files_where_folders_are_meant_and_the_reverse(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(OutputError, match="f.txt: --out is an existing file"):
        output_folder(f, "extract")
    with pytest.raises(OutputError, match=r"f.txt/run: --out cannot be created: .*f.txt is a file"):
        output_folder(f / "run", "extract")
    with pytest.raises(OutputError, match="--json is a folder"):
        output_file(tmp_path, "check", "--json")
    with pytest.raises(OutputError, match=r"must end in \.json or \.tsv"):
        output_file(tmp_path / "t.csv", "transcripts", suffixes=(".json", ".tsv"))


def test_a_file_is_overwritten_only_by_its_own_kind(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("path\tseconds\ttext\na.wav\t1.0\thi\n")
    assert file_kind(tsv) == "transcripts" and output_file(tsv, "transcripts") == tsv
    js = tmp_path / "t.json"
    js.write_text(json.dumps([{"path": "a.wav", "seconds": 1.0, "text": "hi"}]))
    assert file_kind(js) == "transcripts"
    (tmp_path / "s.json").write_text(json.dumps({"cer": 0.1, "wer": 0.2}))
    assert file_kind(tmp_path / "s.json") == "score"
    (tmp_path / "r.json").write_text(json.dumps({"task": "ks", "metric": "accuracy"}))
    assert file_kind(tmp_path / "r.json") == "evaluate"
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\tlabel\na.wav\tyes\n")
    with pytest.raises(OutputError, match="m.tsv: --out is an existing file that is not transcripts"):
        output_file(manifest, "transcripts")
    (tmp_path / "empty.tsv").write_text("")
    assert output_file(tmp_path / "empty.tsv", "transcripts")  # nothing there to lose


def test_a_read_only_place_is_refused(tmp_path, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p) == str(tmp_path) else real(p, m))
    with pytest.raises(OutputError, match="is not writable|read-only file system"):
        output_folder(tmp_path / "run", "pretrain")
    with pytest.raises(OutputError, match="is not writable|read-only file system"):
        output_file(tmp_path / "enc.onnx", "onnx")


def test_sweep_removes_what_this_run_did_not_write(tmp_path):
    for name in ("a.npy", "sub/b.npy", "sub/c.npy", "keep.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sweep(tmp_path, [tmp_path / "sub" / "b.npy"], "*.npy") == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["keep.txt",
                                                                                               "sub/b.npy"]

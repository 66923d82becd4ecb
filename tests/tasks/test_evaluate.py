"""SUPERB-style evaluation: cached features, weighted layers, linear / BiLSTM-CTC heads, reports."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from svqmae import cli
from svqmae.config import ConfigError
from svqmae.data import DataError, load_cut
from svqmae.tasks.evaluate import bootstrap_ci, evaluate
from svqmae.tasks.evaluate.features import FeatureStore
from svqmae.tasks.evaluate.items import Item, load_items, make_folds, split_dev
from svqmae.tasks.evaluate.upstreams import get_upstream
from tests.conftest import harmonic_tone, write_labelled_set, write_spelled_set, write_wav
from tests.tasks.test_upstreams import tiny_wav2vec2

F0S = {"low": 110.0, "mid": 190.0, "high": 330.0}
FAST = dict(epochs=30, patience=8, bootstrap=300, progress=False)


@pytest.fixture(scope="module")
def pitch(tmp_path_factory):
    """Three classes that differ in pitch; train and test speakers are disjoint."""
    root = tmp_path_factory.mktemp("pitch")
    train = write_labelled_set(root / "train", F0S, ["s1", "s2", "s3", "s4"], per_class=4, seed=1)
    test = write_labelled_set(root / "test", F0S, ["t1", "t2"], per_class=4, seed=2)
    return {"train": str(train), "test": str(test), "cache": str(root / "cache"), "root": root}


def test_fbank_classify_report_plots_and_interval(pitch, tmp_path):
    out = tmp_path / "report.json"
    r = evaluate("fbank", "classify", pitch["train"], pitch["test"], out=str(out), cache=pitch["cache"], **FAST)
    assert r["value"] >= 0.8  # chance is 1/3
    on_disk = json.loads(out.read_text())
    for k in ("task", "metric", "value", "ci95", "n_test", "upstream", "layer_weights"):
        assert on_disk[k] == r[k]
    assert r["task"] == "classify" and r["metric"] == "accuracy" and r["n_test"] == 24
    assert r["upstream"]["name"] == "fbank" and r["layer_weights"] == [1.0]
    lo, hi = r["ci95"]
    assert lo <= r["value"] <= hi
    assert np.array(r["confusion"]).sum() == 24
    assert (tmp_path / "report_confusion.png").stat().st_size > 1000
    assert (tmp_path / "report_layers.png").stat().st_size > 1000
    # the dev set was held out by speaker: none of its speakers trained the head
    assert r["runs"][0]["dev_split"] == "speaker"


def test_head_learning_rate_is_chosen_on_dev_from_the_grid_or_given(pitch):
    from svqmae.tasks.evaluate.heads import LR_GRID

    auto = evaluate("fbank", "classify", pitch["train"], pitch["test"], cache=pitch["cache"], **FAST)
    run = auto["runs"][0]
    assert set(run["lr_search"]) == {f"{lr:g}" for lr in LR_GRID["utterance"]}
    best = max(run["lr_search"].values())
    assert run["lr"] in LR_GRID["utterance"] and run["lr_search"][f"{run['lr']:g}"] == best
    assert run["dev_accuracy"] == best and auto["head_lr"] == [run["lr"]]
    fixed = evaluate("fbank", "classify", pitch["train"], pitch["test"], cache=pitch["cache"], lr=3e-3, **FAST)
    assert fixed["head_lr"] == [3e-3] and "lr_search" not in fixed["runs"][0]
    for bad in ("fast", -1):
        with pytest.raises(ConfigError, match="lr must be"):
            evaluate("fbank", "classify", pitch["train"], pitch["test"], cache=pitch["cache"], lr=bad, **FAST)


def test_features_are_cached_and_results_reproducible(pitch):
    a = evaluate("fbank", "ks", pitch["train"], pitch["test"], cache=pitch["cache"], **FAST)
    b = evaluate("fbank", "ks", pitch["train"], pitch["test"], cache=pitch["cache"], **FAST)
    assert b["features"] == {**b["features"], "extracted": 0, "from_cache": 72}
    assert (a["value"], a["ci95"]) == (b["value"], b["ci95"])


def test_random_upstream_layer_weights_sum_to_one(pitch, tmp_path):
    r = evaluate("random", "classify", pitch["train"], pitch["test"], out=str(tmp_path), cache=pitch["cache"],
                 **FAST)
    assert len(r["layer_weights"]) == r["upstream"]["layers"] == 6  # level, input embedding, 4 blocks
    assert sum(r["layer_weights"]) == pytest.approx(1.0, abs=1e-4)
    assert r["upstream"]["name"] == "random:tiny" and (tmp_path / "report.json").is_file()


def test_hf_upstream(pitch, tmp_path):
    model = tiny_wav2vec2(tmp_path / "w2v")
    r = evaluate(f"hf:{model}", "classify", pitch["train"], pitch["test"], cache=str(tmp_path / "c"), **FAST)
    assert len(r["layer_weights"]) == 3 and 0.0 <= r["value"] <= 1.0


@pytest.mark.parametrize("model", ["fbank", "hf-group-norm"])
def test_cached_features_do_not_depend_on_the_batch(model, tmp_path):
    """A file's cached features are the same whether it was extracted alone or padded in a batch (wav2vec 2.0
    BASE-style models, which take no attention mask, see one utterance at a time)."""
    if model != "fbank":
        model = f"hf:{tiny_wav2vec2(tmp_path / 'w2v', norm='group')}"
    up = get_upstream(model)
    items = load_items(write_spelled_set(tmp_path / "var", n=5, seed=3), "asr")  # lengths differ
    assert len({it.cut.duration for it in items}) > 1
    together = FeatureStore(tmp_path / "a", up, progress=False).get(items, "mean")
    alone = [FeatureStore(tmp_path / "b", up, progress=False).get([it], "mean")[0] for it in items]
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-4)


def test_stats_baseline_pools_mean_and_std_of_each_files_real_frames(tmp_path):
    """fbank-stats' cached vector is [mean, std] of the file's own filterbank frames, extracted alone, even when
    the file was padded in a batch; its first half is what fbank caches."""
    st = get_upstream("fbank-stats")
    items = load_items(write_spelled_set(tmp_path / "var", n=5, seed=3), "asr")  # lengths differ: one padded batch
    assert len({it.cut.duration for it in items}) > 1
    pooled = FeatureStore(tmp_path / "a", st, progress=False).get(items, "mean")
    means = FeatureStore(tmp_path / "a", get_upstream("fbank"), progress=False).get(items, "mean")
    for it, vec, mean in zip(items, pooled, means):
        wave = torch.from_numpy(load_cut(it.cut, 16000))
        frames, n = st(wave[None], torch.tensor([len(wave)]))
        f = frames[0, 0, : int(n[0])].numpy()
        assert vec.shape == (1, 480)
        np.testing.assert_allclose(vec[0], np.concatenate([f.mean(0), f.std(0)]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(vec[:, :240], mean, atol=1e-5)


def _steady_or_pulsing(root: Path, n_per_class: int, seed: int) -> Path:
    """Two classes with the same mean log level: a steady tone, or one alternating 8 dB above and below it
    (which half first is random); every file has its own random gain, so the mean level tells nothing."""
    rng = np.random.default_rng(seed)
    rows = ["path\tspeaker\tlabel"]
    for label in ("steady", "pulsing"):
        for i in range(n_per_class):
            x = harmonic_tone(0.8, f0=float(rng.uniform(140, 220)), seed=int(rng.integers(1 << 30)))
            x = x / (np.abs(x).max() + 1e-9) * 0.1
            if label == "pulsing":
                db = np.repeat(rng.permutation([8.0, -8.0]), len(x) // 2 + 1)[: len(x)]
                x = x * 10 ** (db / 20)
            x = (x * 10 ** (rng.uniform(-8, 8) / 20)).astype(np.float32)
            write_wav(root / f"audio/{label}{i}.wav", x)
            rows.append(f"audio/{label}{i}.wav\tspk{i % 4}\t{label}")
    (root / "manifest.tsv").write_text("\n".join(rows) + "\n")
    return root / "manifest.tsv"


def test_stats_baseline_sees_the_spread_that_mean_pooling_hides(tmp_path):
    train, test = _steady_or_pulsing(tmp_path / "tr", 24, seed=1), _steady_or_pulsing(tmp_path / "te", 12, seed=2)
    kw = dict(cache=str(tmp_path / "c"), lr=1e-2, **FAST)
    mean = evaluate("fbank", "classify", str(train), str(test), **kw)
    stats = evaluate("fbank-stats", "classify", str(train), str(test), **kw)
    assert stats["upstream"]["pooling"] == "mean+std" and stats["n_test"] == 24
    assert stats["value"] >= 0.9 and stats["value"] >= mean["value"] + 0.2, (mean["value"], stats["value"])


def test_label_absent_from_train_is_a_clear_error(pitch, tmp_path):
    test = write_labelled_set(tmp_path / "odd", {"low": 110.0, "squeak": 600.0}, ["x1"], per_class=1)
    with pytest.raises(DataError, match=r"'squeak'.*do not occur in the training data"):
        evaluate("fbank", "classify", pitch["train"], str(test), cache=pitch["cache"], **FAST)


def test_bad_audio_file_is_an_error_naming_it(pitch, tmp_path):
    write_wav(tmp_path / "ok.wav", np.zeros(8000, np.float32))
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio")
    (tmp_path / "m.tsv").write_text("path\tlabel\nok.wav\tlow\nbroken.wav\tmid\n")
    with pytest.raises(DataError, match="broken.wav"):
        evaluate("fbank", "classify", pitch["train"], str(tmp_path / "m.tsv"), **FAST)


def test_speaker_folds_cover_every_item_once(pitch):
    r = evaluate("fbank", "er", pitch["train"], cache=pitch["cache"], folds=2, **FAST)  # no session column
    assert r["folds"] == 2 and r["n_test"] == 48 and len(r["runs"]) == 2
    items = load_items(pitch["train"], "classify")
    folds = make_folds(items, 2, "speaker", 0, "train")
    assert sorted(i for f in folds for i in f) == list(range(48))
    spk = [{items[i].speaker for i in f} for f in folds]
    assert not spk[0] & spk[1]


def test_dev_split_is_speaker_disjoint(pitch):
    items = load_items(pitch["train"], "classify")
    train, dev, how = split_dev(items, 0.25, seed=0)
    assert how == "speaker" and len(train) + len(dev) == len(items)
    assert not {i.speaker for i in train} & {i.speaker for i in dev}


def test_dev_split_of_items_without_speakers_does_not_depend_on_where_the_data_lies():
    def items(root, stamp):  # the same 40 segments below another folder, with other cache keys (file times)
        return [Item(cut=SimpleNamespace(start=0.5 * (i % 2), duration=1.0), path=f"{root}/audio/{i // 2}.wav",
                     label="silence", text=None, speaker=None, key=f"{stamp}{i}") for i in range(40)]

    def held(root, stamp, seed=0):
        _, dev, how = split_dev(items(root, stamp), 0.25, seed=seed)
        assert how == "random" and len(dev) == 10
        return sorted((Path(it.path).name, it.cut.start) for it in dev)

    assert held("/data/a", "x") == held("/elsewhere/copy/b", "y")
    assert held("/data/a", "x") != held("/data/a", "x", seed=1)


def test_asr_reports_cer_and_wer(tmp_path):
    train = write_spelled_set(tmp_path / "train", n=8, seed=1)
    test = write_spelled_set(tmp_path / "test", n=4, seed=2)
    r = evaluate("fbank", "asr", str(train), str(test), out=str(tmp_path / "asr.json"), asr_hidden=24,
                 asr_epochs=2, bootstrap=100, progress=False)
    assert r["metric"] == "cer" and r["value"] == r["cer"] >= 0.0
    assert "wer" in r and r["n_test"] == 4 and len(r["examples"]) == 4
    assert sum(r["layer_weights"]) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "asr_layers.png").is_file()


def test_cli_several_models_give_a_markdown_table(pitch, tmp_path, capsys):
    rc = cli.main(["evaluate", "--model", "fbank", "--model", "random", "--task", "classify", "--task", "ks",
                   "--train", pitch["train"], "--test", pitch["test"], "--out", str(tmp_path),
                   "--cache", pitch["cache"], "--epochs", "5", "--quiet"])
    assert rc == 0
    table = (tmp_path / "results.md").read_text()
    assert "| fbank |" in table and "| random |" in table and "ks accuracy" in table
    assert table.strip() in capsys.readouterr().out
    assert (tmp_path / "ks_random" / "report.json").is_file()


def test_cli_error_is_one_line(pitch, tmp_path, capsys):
    rc = cli.main(["evaluate", "--model", "fbank", "--task", "classify", "--train", pitch["train"],
                   "--out", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--folds" in err[0]


def test_bootstrap_interval():
    correct = np.r_[np.ones(80), np.zeros(20)]
    lo, hi = bootstrap_ci(correct, n_boot=500)
    assert lo < 0.8 < hi and hi - lo < 0.2
    assert bootstrap_ci(np.ones(10)) == [1.0, 1.0]

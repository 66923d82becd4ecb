"""CTC fine-tuning, transcription and scoring on a tiny model and a synthetic spelled-letters set."""

from __future__ import annotations

import json

import pytest
import torch

import svqmae
from svqmae import config as C
from svqmae.api import CheckpointError, save_model
from svqmae.cli import main
from svqmae.finetune import (
    CTCModel,
    finetune,
    load_recognizer,
    resolve_finetune,
    save_recognizer,
    spec_augment,
    tristage,
)
from svqmae.model import SVQMAE
from svqmae.text import build_units
from tests.conftest import write_spelled_set

TINY = ["model.encoder.layers=2", "model.encoder.dim=64", "model.encoder.heads=2", "model.encoder.ffn_dim=128",
        "model.decoder.layers=1", "model.decoder.dim=32", "model.decoder.heads=2", "model.decoder.ffn_dim=64",
        "model.quantizer.codebook_size=32"]
FAST = ["train.max_batch_seconds=8", "train.max_utt_seconds=4", "train.lr=3e-3", "train.log_every=5",
        "train.val_every=20", "train.ckpt_every_steps=10", "train.num_workers=0", "ctc.freeze_steps=6",
        "specaug.freq_mask_width=8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pretrained(path):
    """A 'pre-trained' tiny model folder (random weights, saved the way `svqmae pretrain` saves)."""
    cfg = C.resolve("tiny", overrides=TINY)
    torch.manual_seed(0)
    return save_model(SVQMAE(cfg.model), cfg, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Fine-tune for 15 steps, then rerun the same command with a larger budget (resume) to 25."""
    root = tmp_path_factory.mktemp("ft")
    train = write_spelled_set(root / "train", 12, seed=0)
    lines = train.read_text().splitlines()
    lines.append("audio/utt000.wav\t1.0\tspk0\t")  # an empty transcript: skipped with a count
    train.write_text("\n".join(lines) + "\n")
    dev = write_spelled_set(root / "dev", 4, seed=1, texts=["abe", "cd", "dab", "bc"])  # e: unseen
    model = pretrained(root / "pre")
    out = root / "run"
    first = finetune(str(model), [str(train)], [str(dev)], out, overrides=FAST + ["train.max_steps=15"])
    ckpt_steps = sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt"))
    metrics_first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    second = finetune(str(model), [str(train)], [str(dev)], out, overrides=FAST + ["train.max_steps=25"])
    return {"root": root, "train": train, "dev": dev, "out": out, "model": second, "first": first,
            "ckpts": ckpt_steps, "metrics_first": metrics_first}


def test_finetune_loss_falls_and_writes_a_self_contained_model(run):
    steps = [m for m in run["metrics_first"] if "loss" in m]
    assert steps[0]["frozen"] and not steps[-1]["frozen"]  # the encoder thaws after ctc.freeze_steps
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    d = run["model"]
    assert {"config.json", "model.safetensors", "ctc.json", "units.txt"} <= {p.name for p in d.iterdir()}
    assert not list(d.glob("*.pt")) and not list(d.glob("*.ckpt")) and not list(d.glob("*.pkl"))
    rec = load_recognizer(run["out"])  # the run DIR works too
    assert rec.units.labels[2:] == ["a", "b", "c", "d"]
    enc = svqmae.load(d)  # the fine-tuned encoder alone
    hidden, _ = enc.extract(torch.zeros(1, 16000))
    assert len(hidden) == 3 and hidden[-1].shape == (1, 25, 64)


def test_resume_continues_from_the_last_checkpoint(run, capfd):
    assert "step00000010.ckpt" in run["ckpts"]
    steps = [m["step"] for m in (json.loads(x) for x in (run["out"] / "metrics.jsonl").read_text().splitlines())
             if "loss" in m]
    assert steps[-1] == 25 and steps.count(20) == 1 and 0 not in steps
    assert steps.index(20) > steps.index(15)  # continued, not restarted
    meta = json.loads((run["model"] / "config.json").read_text())
    assert meta["card"]["steps"] == 25


def test_transcribe_prints_text_for_each_file(run, capsys, tmp_path):
    out = tmp_path / "hyp.json"
    assert main(["transcribe", "--model", str(run["out"]), str(run["dev"].parent / "audio"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split("\t")[0].endswith(".wav") for line in lines)
    rows = json.loads(out.read_text())
    assert [r["text"] for r in rows] == [line.split("\t")[1] for line in lines]
    assert all(set(r["text"]) <= set("abcd") for r in rows)
    # beam search (pyctcdecode) on one file given directly
    assert main(["transcribe", "--model", str(run["model"]), "--beam", "4",
                 str(run["dev"].parent / "audio" / "utt000.wav")]) == 0
    path, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path.endswith("utt000.wav") and set(text) <= set("abcd")


def test_score_reports_cer_with_interval_and_unseen_characters(run, capsys, tmp_path):
    report_file = tmp_path / "report.json"
    assert main(["score", "--model", str(run["model"]), "--data", str(run["dev"]), "--out", str(report_file)]) == 0
    cap = capsys.readouterr()
    assert "CER" in cap.out and "unseen" in cap.err
    r = json.loads(report_file.read_text())
    assert r["utterances"] == 4 and 0.0 <= r["cer"] <= 3.0
    assert r["cer_ci95"][0] <= r["cer"] <= r["cer_ci95"][1]
    assert r["unseen_characters"] == {"e": 1} and r["utterances_with_unseen_characters"] == 1
    assert r["worst"][0]["char_errors"] >= r["worst"][-1]["char_errors"]


def test_training_log_counts_empty_transcripts_and_unseen_characters(run, capfd):
    model = pretrained(run["root"] / "pre2")
    finetune(str(model), [str(run["train"])], [str(run["dev"])], run["root"] / "short",
             overrides=FAST + ["train.max_steps=1"])
    err = capfd.readouterr().err
    assert "train: skipped 1 utterance(s): empty or missing transcript" in err
    assert "dev: 1 character(s) unseen in the training transcripts map to <unk>: 'e'x1" in err


def test_cli_errors_are_one_line(run, capsys, tmp_path):
    assert main(["transcribe", "--model", str(run["root"] / "pre"), str(run["dev"])]) == 2
    assert "no ctc.json" in capsys.readouterr().err
    bad = tmp_path / "notext.tsv"
    bad.write_text(f"path\n{run['dev'].parent / 'audio' / 'utt000.wav'}\n")
    assert main(["finetune", "--model", "random", "--preset", "tiny", "--train", str(bad), "--dev", str(bad),
                 "--out", str(tmp_path / "x"), "--set", "model.encoder.layers=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("svqmae finetune: error:") and "notext.tsv" in err and "transcript" in err
    assert main(["score", "--model", str(run["model"]), "--data", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    assert "notext.tsv" in capsys.readouterr().err
    assert main(["finetune", "--model", str(run["root"] / "pre"), "--preset", "small", "--train", str(bad),
                 "--dev", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "--preset is only for" in capsys.readouterr().err


def test_config_resolution():
    pre = C.resolve("tiny", overrides=TINY)
    cfg = resolve_finetune(None, pre, overrides=["model.encoder.dropout=0.2", "units.kind=bpe"])
    assert cfg.preset == "tiny" and cfg.model.encoder.dim == 64 and cfg.model.encoder.dropout == 0.2
    assert cfg.units.kind == "bpe" and cfg.train.max_steps == 2000  # the tiny fine-tuning preset
    with pytest.raises(C.ConfigError, match="model.encoder.layers"):
        resolve_finetune(None, pre, overrides=["model.encoder.layers=3"])
    with pytest.raises(C.ConfigError, match="ctc.nope"):
        resolve_finetune("tiny", overrides=["ctc.nope=1"])
    with pytest.raises(C.ConfigError, match="units.kind"):
        resolve_finetune("tiny", overrides=["units.kind=words"])
    f = tristage(resolve_finetune("tiny", overrides=["train.max_steps=100"]))
    assert f(0) < 0.15 and f(9) == 1.0 and f(30) == 1.0 and f(49) == 1.0
    assert f(75) < 1.0 and abs(f(99) - 0.05) < 0.01 and f(500) == pytest.approx(0.05)


def test_spec_augment_masks_inside_the_utterance_only():
    cfg = resolve_finetune("tiny", overrides=["specaug.time_mask_prob=0.2", "specaug.freq_mask_width=10"])
    x = torch.ones(2, 40, 4 * 80)
    lengths = torch.tensor([40, 20])
    a = spec_augment(x, lengths, cfg.specaug, 4, torch.Generator().manual_seed(3))
    b = spec_augment(x, lengths, cfg.specaug, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # a pure function of the generator
    assert (a == 0).any() and (a == 1).any()
    zero_tokens = (a.view(2, 40, 4, 80) == 0).all(-1).all(-1)  # whole tokens masked in time
    assert zero_tokens[0].any() and zero_tokens[1].any() and not zero_tokens[1, 20:].any()
    zero_bins = (a.view(2, 40, 4, 80)[:, :20] == 0).all(1).all(1)  # the same bins in every frame
    assert zero_bins.any()


def test_recognizer_round_trip_for_both_backbones(tmp_path):
    units = build_units("char", ["abc d"])
    for backbone in ("svqmae", "lstm"):
        cfg = resolve_finetune("tiny", overrides=TINY + ["ctc.upsample=2", "ctc.lstm_layers=1"])
        torch.manual_seed(0)
        model = CTCModel(cfg, len(units), backbone).eval()
        waves, lengths = torch.randn(2, 16000), torch.tensor([16000, 8000])
        lp, frames = model(waves, lengths)
        assert lp.shape == (2, 50, len(units)) and frames.tolist() == [50, 24]
        assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 50), atol=1e-4)
        save_recognizer(model, units, cfg, tmp_path / backbone, {})
        rec = load_recognizer(tmp_path / backbone)
        assert rec.model.backbone == backbone and torch.allclose(rec.model(waves, lengths)[0], lp, atol=1e-5)
    (tmp_path / "svqmae" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_recognizer(tmp_path / "svqmae")

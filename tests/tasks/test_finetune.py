"""CTC fine-tuning, transcription and scoring on a tiny model and a synthetic spelled-letters set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import svqmae
from svqmae import config as C
from svqmae.cli import main
from svqmae.config import resolve_finetune
from svqmae.engine.module import EngineModule
from svqmae.model import SVQMAE, save_model
from svqmae.model.ctc import CTCModel
from svqmae.tasks.finetune import FinetuneModule, finetune
from svqmae.tasks.recognizer import finetune_config_from_dict, load_recognizer
from tests.conftest import FINETUNE_FAST, TINY_MODEL_OVERRIDES, write_spelled_set

TINY, FAST = TINY_MODEL_OVERRIDES, FINETUNE_FAST


pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert len(hidden) == 4 and hidden[-1].shape == (1, 25, 64)  # level, input embedding, 2 blocks


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
    lines = capsys.readouterr().out.rstrip("\n").splitlines()  # a transcript may be empty: "path\t"
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




# --------------------------------------------------------------------------- learning rate per layer

LAYERWISE = ["ctc.encoder_lr_ratio=0.1", "ctc.layer_decay=0.5"]


def ft_module(*overrides: str) -> FinetuneModule:
    """A FinetuneModule on a fresh 2-layer x 64 CTC model (6 outputs), configured as ``overrides`` say."""
    cfg = resolve_finetune("tiny", overrides=TINY + ["train.lr=1e-3", "train.weight_decay=0.01", *overrides])
    torch.manual_seed(0)
    return FinetuneModule(cfg, CTCModel(cfg, 6), None, cfg.ctc.freeze_steps)


@pytest.mark.parametrize("schedule", ["tristage", "cosine"])
def test_each_layer_gets_the_learning_rate_the_options_say(schedule):
    module = ft_module(*LAYERWISE, f"ctc.schedule={schedule}", "train.max_steps=100", "train.warmup_steps=10")
    opt = module.configure_optimizers()
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    f = module.lr_schedule()
    for _ in range(30):  # no gradients: AdamW leaves every parameter alone, the schedule advances
        optimizer.step()
        sched.step()
    # head = train.lr; encoder 0.1 of it; 2 blocks: the last x0.5, the first x0.25, the embedding x0.125
    share = {"ctc_head": 1.0, "encoder.norm": 0.1, "encoder.blocks.1": 0.05, "encoder.blocks.0": 0.025, "embed": 0.0125,
             "level_embed": 0.0125}
    names = {id(p): n for n, p in module.model.named_parameters()}
    seen = []
    for g in optimizer.param_groups:
        assert g["lr"] == 1e-3 * g["lr_scale"] * f(30)  # LambdaLR multiplies each group's own rate
        assert g["weight_decay"] == (0.01 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
        for p in g["params"]:
            prefix = next(k for k in share if names[id(p)].startswith(k + "."))
            assert g["lr_scale"] == pytest.approx(share[prefix]), names[id(p)]
            seen.append(names[id(p)])
    assert sorted(seen) == sorted(n for n, p in module.model.named_parameters() if p.requires_grad)
    assert optimizer.param_groups[0]["params"][0] is module.model.ctc_head.weight  # the logged lr is the head's
    # decay and none per rate; the final norm has no matrix
    assert len(optimizer.param_groups) == 2 * len(set(share.values())) - 1


def test_one_learning_rate_keeps_the_two_groups_earlier_checkpoints_hold():
    module = ft_module("ctc.encoder_lr_ratio=1.0", "ctc.layer_decay=1.0")
    ours, engine = module.param_groups(), EngineModule.param_groups(module)
    assert len(ours) == 2 and [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in engine]
    assert C.ADDED_KEYS["ctc.encoder_lr_ratio"] == C.ADDED_KEYS["ctc.layer_decay"] == 1.0  # what old configs load as
    saved = C.to_dict(resolve_finetune("tiny"))
    del saved["ctc"]["encoder_lr_ratio"], saved["ctc"]["layer_decay"]
    old = finetune_config_from_dict(saved, "old")
    assert old.ctc.encoder_lr_ratio == old.ctc.layer_decay == 1.0
    with pytest.raises(C.ConfigError, match="ctc.layer_decay"):
        resolve_finetune("tiny", overrides=["ctc.layer_decay=0"])
    with pytest.raises(C.ConfigError, match="ctc.encoder_lr_ratio"):
        resolve_finetune("tiny", overrides=["ctc.encoder_lr_ratio=-1"])


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_encoder_lr_ratio_zero_trains_the_head_only(run, tmp_path):
    out = tmp_path / "probe"
    model = finetune(str(run["root"] / "pre"), [str(run["train"])], [str(run["dev"])], out,
                     overrides=FAST + ["train.max_steps=8", "train.log_every=1", "ctc.freeze_steps=0",
                                        "ctc.encoder_lr_ratio=0"])
    before, after = weights(run["root"] / "pre"), weights(model)
    shared = [k for k in after if k in before]
    assert len(shared) == len(after) - 2 and all(torch.equal(before[k], after[k]) for k in shared)  # all but the head
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(r["frozen"] for r in rows) and rows[-1]["loss"] < rows[0]["loss"]  # the head learns


def test_layer_wise_rates_freeze_then_thaw_and_resume_exactly(run, tmp_path, capfd):
    """Frozen for 5 steps (the step-5 checkpoint still holds the pre-trained encoder), then 5 more with
    layer-wise rates; resuming from the step-5 checkpoint reaches the same weights, optimizer and schedule."""
    import shutil

    args = (str(run["root"] / "pre"), [str(run["train"])], [str(run["dev"])])
    overrides = FAST + LAYERWISE + ["train.max_steps=10", "ctc.freeze_steps=5", "train.ckpt_every_steps=5"]
    ref = tmp_path / "ref"
    finetune(*args, ref, overrides=overrides)
    pre = weights(run["root"] / "pre")
    at5 = torch.load(ref / "checkpoints" / "step00000005.ckpt", weights_only=True)
    at10 = torch.load(ref / "checkpoints" / "step00000010.ckpt", weights_only=True)
    for k, v in at5["state_dict"].items():
        name = k.removeprefix("model.")
        if name.startswith(("embed.", "encoder.")):  # the trainable encoder
            assert torch.equal(v, pre[name]), f"{name} moved while frozen"
            assert not torch.equal(at10["state_dict"][k], pre[name]), f"{name} did not move after thawing"
    assert not torch.equal(at5["state_dict"]["model.ctc_head.weight"], at10["state_dict"]["model.ctc_head.weight"])

    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "model")
    for p in (resumed / "checkpoints").glob("step00000010.ckpt*"):
        p.unlink()
    capfd.readouterr()
    finetune(*args, resumed, overrides=overrides)
    assert f"resuming from {resumed / 'checkpoints' / 'step00000005.ckpt'}" in capfd.readouterr().err
    a, b = weights(ref / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    end = torch.load(resumed / "checkpoints" / "step00000010.ckpt", weights_only=True)
    oa, ob = at10["optimizer_states"][0], end["optimizer_states"][0]
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    assert len(oa["param_groups"]) > 2 and oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][name], ob["state"][k][name]), (k, name)
    assert at10["lr_schedulers"] == end["lr_schedulers"]


def test_corrupt_checkpoint_is_set_aside_and_the_previous_one_resumed(run, tmp_path, capfd):
    """Fine-tuning shares pre-training's checkpoint path: checksums verified, a damaged one set aside."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    newest = sorted((out / "checkpoints").glob("step*.ckpt"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    newest.write_bytes(bytes(data))
    capfd.readouterr()
    finetune(str(run["root"] / "pre"), [str(run["train"])], [str(run["dev"])], out,
             overrides=FAST + ["train.max_steps=26"])
    err = capfd.readouterr().err
    assert f"{newest} is corrupt" in err and (out / "checkpoints" / f"{newest.name}.corrupt").is_file()
    previous = sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt") if p.name < newest.name)[-1]
    assert f"resuming from {out / 'checkpoints' / previous}" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]  # the same progress log as pre-training's
    assert all({"nonfinite_skipped", "oom_retries", "audio_seconds_per_s", "lr"} <= set(r) for r in steps)


def test_layer_sum_and_reinit_top_fine_tune_save_and_load(run, tmp_path):
    """A head on the weighted sum of layers over a pre-trained encoder whose top block restarted: the
    layer weights train while the encoder is frozen, the kept block stays put, and the saved recognizer
    loads (and refuses export-hf, which has no such head)."""
    from svqmae.tasks.hf.export import export_hf

    pre = weights(run["root"] / "pre")
    out = finetune(str(run["root"] / "pre"), [str(run["train"])], [str(run["dev"])], tmp_path / "sum",
                   overrides=FAST + ["train.max_steps=4", "ctc.freeze_steps=4", "ctc.layer_sum=true",
                                     "ctc.reinit_top=1"])
    after = weights(out)
    assert not torch.equal(after["layer_weights"], torch.zeros(3))  # trained while frozen
    assert torch.equal(after["encoder.blocks.0.qkv.weight"], pre["encoder.blocks.0.qkv.weight"])
    assert not torch.equal(after["encoder.blocks.1.qkv.weight"], pre["encoder.blocks.1.qkv.weight"])  # restarted
    from svqmae.tasks.finetune import lr_scales

    module = ft_module("ctc.layer_sum=true", *LAYERWISE)
    assert lr_scales(module.model, module.cfg.ctc)["layer_weights"] == (0, 1.0)  # the head's place and rate
    rec = load_recognizer(out)
    assert rec.cfg.ctc.layer_sum and rec.model.layer_weights.shape == (3,)
    with pytest.raises(C.ConfigError, match="ctc.layer_sum"):
        export_hf(str(out), tmp_path / "hf")

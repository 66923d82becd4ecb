"""The pre-training engine on a really tiny model: loss falls, the run writes its files, and a run
killed with kill -9 (or stopped by SIGTERM) and resumed reaches exactly the uninterrupted run's
step, weights and optimizer state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import svqmae
from svqmae import config as C
from svqmae.engine.checkpoint import latest_checkpoint
from svqmae.engine.faults import StopSignals
from svqmae.tasks.pretrain import pretrain
from tests.conftest import harmonic_tone, write_wav

STEPS = 12
# a 1-layer, 32-wide model; 3 batches per epoch, so 12 steps cross epochs; a checkpoint every 4 steps
RUN = ["model.encoder.layers=1", "model.encoder.dim=32", "model.encoder.heads=2", "model.encoder.ffn_dim=64",
       "model.decoder.layers=1", "model.decoder.dim=32", "model.decoder.heads=2", "model.decoder.ffn_dim=64",
       "model.quantizer.codebook_size=32", "train.max_batch_seconds=3", "train.max_utt_seconds=1.5",
       "train.num_workers=0", "train.val_items=2", "train.log_every=1", "train.ckpt_every_steps=4",
       "train.ckpt_every_minutes=0", "train.val_every=5", "train.warmup_steps=2", f"train.max_steps={STEPS}"]


def write_audio(folder: Path) -> Path:
    for i in range(8):
        write_wav(folder / f"u{i}.wav", harmonic_tone(1.5, f0=110 + 20 * i, seed=i))
    return folder


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("tiny", overrides=RUN + list(extra))


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny"]
    for o in RUN:
        args += ["--set", o]
    return args + list(extra)


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def assert_same_run(a: Path, b: Path) -> None:
    """Same final weights (bit for bit), optimizer and scheduler state, and loss curve."""
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ca = torch.load(a / "checkpoints" / f"step{STEPS:08d}.ckpt", weights_only=True)
    cb = torch.load(b / "checkpoints" / f"step{STEPS:08d}.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"] == STEPS
    oa, ob = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for k in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][name], ob[k][name]), (k, name)
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert losses(a) == losses(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_audio(root / "audio")
    pretrain([str(data)], root / "ref", tiny_cfg())
    return root, data, root / "ref"


def test_tiny_run_writes_its_files_and_loss_falls(reference):
    _, _, out = reference
    assert C.from_dict(yaml.safe_load((out / "config.yaml").read_text())).model.encoder.dim == 32
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("loss", "masked_acc", "audio_seconds_per_s", "nonfinite_skipped", "oom_retries"):
        assert key in train[0]
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.02, (first, last)
    assert any("val_loss" in r for r in recs)
    # keep the last 2 periodic checkpoints plus the best by validation loss, each with a checksum
    names = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert names == ["best.ckpt", "step00000008.ckpt", f"step{STEPS:08d}.ckpt"]
    for n in names:
        meta = json.loads((out / "checkpoints" / f"{n}.sha256.json").read_text())
        assert meta["bytes"] == (out / "checkpoints" / n).stat().st_size
    model = svqmae.load(out / "model")
    hidden, lengths = model.extract(torch.zeros(1, 16000))
    assert len(hidden) == 3 and hidden[-1].shape == (1, int(lengths[0]), 32)  # level, input embedding, 1 block


def test_kill9_at_a_random_step_then_resume_matches_the_uninterrupted_run(reference, tmp_path):
    root, data, ref = reference
    kill_at = random.Random(7).randint(5, STEPS - 1)  # a step that is not a checkpoint boundary
    out = tmp_path / "killed"
    # the killed run uses as many threads as this process (float sums depend on it): bit-exact comparisons
    env = dict(os.environ, PYTHONPATH=str(Path(svqmae.__file__).parents[1]), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "svqmae.cli", *cli_args(data, out, "--inject-fault", f"sigkill@{kill_at}")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = latest_checkpoint(out)
    assert last is not None and last.name == f"step{(kill_at - 1) // 4 * 4:08d}.ckpt"
    assert not (out / "model").exists()
    # the same call again (the injected fault already fired, so it is not repeated) resumes
    pretrain([str(data)], out, tiny_cfg(f"train.inject_faults=[sigkill@{kill_at}]"))
    assert_same_run(ref, out)


def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_exactly(reference, tmp_path, capfd):
    _, data, ref = reference
    out = tmp_path / "preempted"
    cfg = tiny_cfg("train.inject_faults=[sigterm@6]")
    with pytest.raises(SystemExit) as e:
        pretrain([str(data)], out, cfg)
    assert e.value.code == 128 + signal.SIGTERM
    err = capfd.readouterr().err
    assert "stopped by SIGTERM at step 6" in err and "run the same command again to resume" in err
    assert latest_checkpoint(out).name == "step00000006.ckpt"
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), StopSignals)  # restored
    pretrain([str(data)], out, cfg)
    assert "resuming from" in capfd.readouterr().err
    assert_same_run(ref, out)


def test_the_speed_paths_train_like_the_plain_path(reference, tmp_path, monkeypatch):
    # compiled blocks, encoder tokens packed, token counts bucketed, fused AdamW (skips decided on the device):
    # the same run as the plain path's reference, up to float rounding (losses within 1e-4 relative over 12
    # steps). The compiler backend is aot_eager here (inductor's code generation takes minutes on 2 cores;
    # tests/engine/test_speed.py compares inductor with SVQMAE_TEST_INDUCTOR=1)
    import functools

    from svqmae.engine import speed
    from svqmae.tasks import pretrain as task

    monkeypatch.setattr(task, "apply_speed", functools.partial(speed.apply_speed, backend="aot_eager"))
    _, data, ref = reference
    out = tmp_path / "speed"
    pretrain([str(data)], out, tiny_cfg("train.torch_compile=on", "train.pack=on", "train.shape_bucket=8",
                                        "train.fused_adamw=on"))
    a, b = losses(ref), losses(out)
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    model = svqmae.load(out / "model")  # saved as any other model
    assert model.extract(torch.zeros(1, 16000))[0][-1].shape[-1] == 32


def test_backward_oom_is_retried_and_the_learned_quantizer_updates_once_per_step(tmp_path, monkeypatch, capfd):
    from svqmae.model.quantizer import Quantizer

    applied, stats = [], []
    original_apply, original_stats = Quantizer.apply_update, Quantizer.update_stats
    monkeypatch.setattr(Quantizer, "apply_update", lambda self, s, skip=False: (applied.append(1), original_apply(self, s, skip)))
    monkeypatch.setattr(Quantizer, "update_stats", lambda self, *a, **k: (stats.append(1), original_stats(self, *a, **k))[1])
    data = write_audio(tmp_path / "audio")
    out = tmp_path / "oom_bw"
    cfg = tiny_cfg("model.quantizer.kind=learned", "train.inject_faults=[oom@2, oom_backward@4, oom_backward@9]")
    pretrain([str(data)], out, cfg)
    err = capfd.readouterr().err
    assert "step 4: out of memory in the backward pass on a batch of" in err and "retrying it split in two" in err
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(recs) == list(range(1, STEPS + 1)) and recs[STEPS]["loss"] > 0  # the run went on to the end
    assert [recs[s]["oom_retries"] for s in (1, 2, 3, 4, 8, 9, 12)] == [0, 1, 1, 2, 2, 3, 3]
    assert len(applied) == STEPS  # one EMA step per optimizer step ...
    assert len(stats) > STEPS  # ... although the retries computed statistics again


def test_with_gradient_accumulation_the_learned_quantizer_updates_once_per_optimizer_step(tmp_path, monkeypatch):
    from svqmae.model.quantizer import Quantizer

    applied, stats = [], []
    original_apply, original_stats = Quantizer.apply_update, Quantizer.update_stats
    monkeypatch.setattr(Quantizer, "apply_update", lambda self, s, skip=False: (applied.append(1), original_apply(self, s, skip)))
    monkeypatch.setattr(Quantizer, "update_stats", lambda self, *a, **k: (stats.append(1), original_stats(self, *a, **k))[1])
    data = write_audio(tmp_path / "audio")
    pretrain([str(data)], tmp_path / "acc", tiny_cfg("model.quantizer.kind=learned", "train.accumulate=3",
                                                     "train.max_steps=4", "train.val_every=100"))
    assert len(applied) == 4  # one EMA step per optimizer step ...
    assert len(stats) == 3 * 4  # ... from the statistics of its 3 micro-batches


def test_a_time_budget_decays_the_learning_rate_over_the_minutes_and_a_resume_continues_its_clock(tmp_path, monkeypatch,
                                                                                                 capfd):
    from svqmae.engine.schedules import TrainClock
    from svqmae.tasks.pretrain import PretrainModule

    now = {"t": 1000.0}  # a fake clock: each training batch takes 10 s
    monkeypatch.setattr(TrainClock, "__init__", lambda self, now_fn=None: (
        setattr(self, "now", lambda: now["t"]), setattr(self, "offset", 0.0), setattr(self, "started", None))[0])
    monkeypatch.setattr(PretrainModule, "on_train_batch_start", lambda self, batch, idx: now.update(t=now["t"] + 10))
    data = write_audio(tmp_path / "audio")
    # 1 minute of budget (6 steps of the fake clock) long before 100 steps; bf16 autocast with fused AdamW and
    # gradient clipping (allowed: bf16 has no gradient scaler); max_batch_seconds=auto (on a CPU: the preset's)
    run = ["train.max_minutes=1", "train.max_steps=100", "train.precision=bf16", "train.fused_adamw=on",
           "train.max_batch_seconds=auto", "train.ckpt_every_steps=100"]
    pretrain([str(data)], tmp_path / "a", tiny_cfg(*run))
    err = capfd.readouterr().err
    assert "time budget of 1 minutes reached at step 6" in err and "batch: 120 s of audio" in err
    lr = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
          if "lr" in r}
    peak = C.resolve("tiny").train.lr
    assert sorted(lr) == [1, 2, 3, 4, 5, 6]
    assert lr[6] == pytest.approx(0.05 * peak, rel=1e-6)  # decayed to the floor exactly when the budget ends
    assert lr[3] < lr[2] < peak and lr[6] < lr[5] < lr[4] < lr[3]
    # stopped at step 3 (SIGTERM), then resumed: it has the rest of the budget, and the same schedule
    out = tmp_path / "b"
    with pytest.raises(SystemExit):
        pretrain([str(data)], out, tiny_cfg(*run, "train.inject_faults=[sigterm@3]"))
    pretrain([str(data)], out, tiny_cfg(*run, "train.inject_faults=[sigterm@3]"))
    again = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert again == lr


def test_global_norm_statistics_are_estimated_once_and_saved(tmp_path):
    data = write_audio(tmp_path / "audio")
    out = tmp_path / "run"
    pretrain([str(data)], out, tiny_cfg("model.features.norm=global", "train.max_steps=2"))
    model = svqmae.load(out / "model")
    mean, std = model.frontend.global_mean, model.frontend.global_std
    assert float(mean.abs().sum()) > 0 and not torch.allclose(std, torch.ones_like(std))
    # resuming does not estimate again: the statistics come with the checkpoint
    pretrain([str(data)], out, tiny_cfg("model.features.norm=global", "train.max_steps=3"))
    again = svqmae.load(out / "model")
    assert torch.equal(again.frontend.global_mean, mean) and torch.equal(again.frontend.global_std, std)


def test_kill9_over_a_shar_stream_resumes_from_its_position_and_trains_no_cut_twice_per_epoch(tmp_path):
    """A Shar source is streamed by 2 loader workers; killed at step 7, the run resumes from the
    step-4 checkpoint's stream positions. Rebuilt from the same stream, the batches trained before and
    after the kill hold no cut twice in an epoch and leave out at most each worker's buffer."""
    from svqmae.data.loader import shar_loader
    from svqmae.data.shar import open_shar, shar_heldout
    from svqmae.data.shar_writer import write_shar

    data = write_audio(tmp_path / "audio")
    shar = tmp_path / "shar"
    write_shar([str(data)], shar, shard_seconds=3.0, progress=False, log=lambda m: None)
    out, stream = tmp_path / "run", ["train.num_workers=2", "train.stream_buffer=3"]
    env = dict(os.environ, PYTHONPATH=str(Path(svqmae.__file__).parents[1]))
    args = cli_args(shar, out, "--inject-fault", "sigkill@7", *[a for s in stream for a in ("--set", s)])
    proc = subprocess.run([sys.executable, "-m", "svqmae.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "streamed" in proc.stderr
    saved = torch.load(latest_checkpoint(out), weights_only=True)["data_stream"]
    assert latest_checkpoint(out).name == "step00000004.ckpt"
    assert saved[0]["layout"] == [1, 2] and sorted(saved[0]["workers"]) == [0, 1]
    cfg = tiny_cfg("train.inject_faults=[sigkill@7]", *stream)
    pretrain([str(shar)], out, cfg)
    assert sorted(losses(out)) == list(range(1, STEPS + 1)) and (out / "model" / "model.safetensors").is_file()

    t, s = cfg.train, open_shar(shar)
    held = frozenset(c.id for c in shar_heldout(s, t.val_items, t.min_utt_seconds))

    def stream_from(resume, n):
        loader = shar_loader(s, t.max_batch_seconds, t.max_utt_seconds, t.num_buckets, 2, t.seed, t.stream_buffer,
                             exclude=held, min_seconds=t.min_utt_seconds, resume=resume)
        batches = []
        for b in loader:
            batches.append(b)
            if len(batches) == n:
                return batches

    trained = stream_from(None, 4) + stream_from(saved, STEPS - 4)
    train_ids = {i for b in stream_from(None, 6) for i in b["ids"]}
    for epoch in {b["epoch"] for b in trained}:
        ids = [i for b in trained if b["epoch"] == epoch for i in b["ids"]]
        assert len(ids) == len(set(ids)), (epoch, ids)
        assert len(ids) >= len(train_ids) - 2 * t.stream_buffer

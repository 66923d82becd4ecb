"""The pre-training engine: PyTorch Lightning around :class:`svqmae.model.SVQMAE`.

One CPU, one GPU, several GPUs or nodes (DDP via ``--devices``/``--num-nodes``, torchrun or SLURM),
bf16 autocast, gradient accumulation, clipping, AdamW with warm-up and cosine decay, a held-out
validation slice with fixed masks, budgets in steps and minutes, atomic periodic checkpoints, and
resume-by-rerunning the same command.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from . import config as C
from .api import CheckpointError, save_model
from .data import Problems, load_sources, pretrain_loader, split_heldout
from .model import SVQMAE


def log(msg: str) -> None:
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- lightning module


class PretrainModule(pl.LightningModule):
    def __init__(self, cfg: C.Config):
        super().__init__()
        self.cfg = cfg
        self.model = SVQMAE(cfg.model)
        self.data_pos = (0, -1)  # (epoch, index) of the last batch trained on, for exact resume

    def _generator(self, *keys: int) -> torch.Generator:
        seed = self.cfg.train.seed
        for k in keys:
            seed = (seed * 1_000_003 + k) % (2**62)
        return torch.Generator().manual_seed(seed)

    def training_step(self, batch, batch_idx):
        step, rank = self.global_step, self.global_rank
        micro = batch_idx % self.cfg.train.accumulate
        # dropout and masks are pure functions of (seed, step, rank, micro-batch): resume-exact
        torch.manual_seed((self.cfg.train.seed + 1) * 7919 + step * 131 + rank * 17 + micro)
        self.data_pos = (batch["epoch"], batch["index"])
        if batch["waves"].shape[0] == 0:  # every file in the batch failed to load: a zero step
            return sum(p.sum() for p in self.parameters()) * 0.0
        out = self.model(batch["waves"], batch["lengths"], self._generator(1, step, rank, micro))
        self.last_out = {k: float(v) for k, v in out.items()}
        self.last_out["audio_seconds"] = float(batch["lengths"].sum()) / self.cfg.model.features.sample_rate
        self.log_dict({f"train/{k}": v for k, v in out.items() if k not in ("tokens", "visible_tokens")},
                      on_step=True, prog_bar=False, batch_size=batch["waves"].shape[0])
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        if batch["waves"].shape[0] == 0:
            return
        out = self.model(batch["waves"], batch["lengths"], self._generator(2, batch_idx))  # fixed masks
        n = batch["waves"].shape[0]
        for k in ("loss", "masked_acc", "code_perplexity"):
            self.log(f"val/{k}", out[k], on_epoch=True, sync_dist=True, batch_size=n)

    def configure_optimizers(self):
        t = self.cfg.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "mask_embed" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=tuple(t.betas), fused=torch.cuda.is_available(),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["svqmae_config"] = C.to_dict(self.cfg)
        checkpoint["data_pos"] = list(self.data_pos)

    def on_load_checkpoint(self, checkpoint):
        self.data_pos = tuple(checkpoint.get("data_pos", (0, -1)))


def lr_lambda(t: C.TrainConfig):
    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class PretrainData(pl.LightningDataModule):
    def __init__(self, cfg: C.Config, train_cuts, val_cuts, module: PretrainModule):
        super().__init__()
        self.cfg, self.train_cuts, self.val_cuts, self.module = cfg, train_cuts, val_cuts, module

    def train_dataloader(self):
        t = self.cfg.train
        loader = pretrain_loader(self.train_cuts, t.max_batch_seconds, t.max_utt_seconds, t.num_buckets,
                                 t.num_workers, t.seed, shuffle=True)
        epoch, index = self.module.data_pos
        if index >= 0 and epoch == self.trainer.current_epoch:
            loader.sampler.skip = index + 1  # resume mid-epoch: skip what was already trained on
        return loader

    def val_dataloader(self):
        t = self.cfg.train
        if self.val_cuts is None or len(self.val_cuts) == 0:
            return []
        return pretrain_loader(self.val_cuts, t.max_batch_seconds, t.max_utt_seconds, 1, 0, t.seed, shuffle=False)


# --------------------------------------------------------------------------- callbacks


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, fsynced, then renamed: a crash or a full disk
    never leaves a half-written checkpoint under the real name. Loading never unpickles code."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class PeriodicCheckpoint(pl.Callback):
    """Every N optimizer steps or M minutes, whichever comes first: ``checkpoints/stepXXXXXXXX.ckpt``;
    keeps the newest ``keep_last``."""

    def __init__(self, dirpath: Path, every_steps: int, every_minutes: float, keep_last: int):
        self.dirpath, self.every_steps, self.every_s, self.keep = dirpath, every_steps, every_minutes * 60, keep_last
        self.last_time, self.last_step = time.monotonic(), -1

    def save(self, trainer):
        step = trainer.global_step
        if step == self.last_step:
            return
        trainer.save_checkpoint(self.dirpath / f"step{step:08d}.ckpt")
        self.last_step, self.last_time = step, time.monotonic()
        if trainer.is_global_zero:
            for old in sorted(self.dirpath.glob("step*.ckpt"))[: -self.keep]:
                old.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due_steps = self.every_steps > 0 and step > 0 and step % self.every_steps == 0
        due_time = self.every_s > 0 and time.monotonic() - self.last_time >= self.every_s
        # decide on rank 0's clock so every rank saves together
        due = trainer.strategy.broadcast(bool(due_steps or due_time), src=0)
        if due and step != self.last_step:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)


class ProgressLog(pl.Callback):
    """Terminal progress and ``metrics.jsonl``: step, loss, masked accuracy, audio-seconds per second,
    ETA; plus the list of files skipped because they could not be read."""

    def __init__(self, out: Path, cfg: C.Config, start_step: int):
        self.out, self.cfg = out, cfg
        self.t0 = self.t_last = time.monotonic()
        self.start_step = start_step
        self.audio = 0.0
        self.sums: dict[str, float] = {}
        self.n = 0
        self.problems = Problems()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for path, reason in batch["failed"]:
            self.problems.add(path, reason)
            log(f"skipped {reason}")
        out = getattr(pl_module, "last_out", None)
        if out is None:
            return
        self.audio += out["audio_seconds"]
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        pl_module.last_out = None
        step = trainer.global_step
        t = self.cfg.train
        if (batch_idx + 1) % t.accumulate or step % t.log_every:
            return
        now = time.monotonic()
        audio = float(trainer.strategy.reduce(torch.tensor(self.audio), reduce_op="sum"))
        rec = {k: v / max(self.n, 1) for k, v in self.sums.items() if k not in ("audio_seconds",)}
        rec = {
            "step": step, "epoch": trainer.current_epoch,
            "loss": rec.get("loss"), "masked_acc": rec.get("masked_acc"), "ce": rec.get("ce"),
            "code_perplexity": rec.get("code_perplexity"), "code_usage": rec.get("code_usage"),
            "visible_share": rec.get("visible_tokens", 0) / max(rec.get("tokens", 1), 1),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "audio_seconds_per_s": audio / max(now - self.t_last, 1e-9),
            "elapsed_s": now - self.t0,
        }
        if "recon" in self.sums:
            rec["recon"] = self.sums["recon"] / self.n
        self.audio, self.sums, self.n, self.t_last = 0.0, {}, 0, now
        if not trainer.is_global_zero:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        done = step - self.start_step
        rate = (now - self.t0) / max(done, 1)
        eta = (t.max_steps - step) * rate
        if t.max_minutes > 0:
            eta = min(eta, max(0.0, t.max_minutes * 60 - (now - self.t0)))
        print(
            f"step {step}/{t.max_steps} | loss {rec['loss']:.3f} | acc {rec['masked_acc']:.3f} | "
            f"ppl {rec['code_perplexity']:.0f} | {rec['audio_seconds_per_s']:.0f} audio-s/s | "
            f"lr {rec['lr']:.2e} | ETA {_fmt(eta)}",
            file=sys.stderr, flush=True,
        )

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if m:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **{k.replace("/", "_"): v for k, v in m.items()}}) + "\n")
            log(f"validation at step {trainer.global_step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# --------------------------------------------------------------------------- the job


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step*.ckpt"))
    return ckpts[-1] if ckpts else None


def check_resume_config(ckpt: Path, cfg: C.Config) -> None:
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)["svqmae_config"]
    except Exception as e:
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({str(e).splitlines()[0][:160]})") from None
    differ = C.diff(C.from_dict(saved, str(ckpt)), cfg, "model")
    if differ:
        raise CheckpointError(
            f"{ckpt}: checkpoint was made with another model configuration; differing fields: "
            + "; ".join(differ) + " (use a new --out, or the original settings)"
        )


def trainer_kwargs(cfg: C.Config) -> dict:
    t = cfg.train
    gpu = torch.cuda.is_available()
    precision = {"auto": "bf16-mixed" if gpu else "32-true", "bf16": "bf16-mixed", "32": "32-true"}[t.precision]
    devices = t.devices if t.devices == "auto" else (int(t.devices) if t.devices.isdigit() else t.devices)
    if not gpu and devices == "auto":
        devices = 1
    kw = dict(
        accelerator="gpu" if gpu else "cpu", devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=precision, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate,
        gradient_clip_val=t.grad_clip or None, use_distributed_sampler=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
        val_check_interval=t.val_every * t.accumulate, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every, plugins=[AtomicCheckpointIO()],
    )
    if t.max_minutes > 0:
        kw["max_time"] = timedelta(minutes=t.max_minutes)
    return kw


def pretrain(sources: list[str], out: str | Path, cfg: C.Config) -> Path:
    """Pre-train on ``sources`` into ``out``; rerunning the same call resumes. Returns ``out/model``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        check_resume_config(ckpt, cfg)
    C.save_yaml(cfg, out / "config.yaml")

    problems = Problems()
    cuts = load_sources(sources, problems)
    for _, reason in problems.items:
        log(f"skipped {reason}")
    min_s = cfg.train.min_utt_seconds
    cuts = cuts.filter(lambda c: c.duration >= min_s).to_eager()
    if len(cuts) == 0:
        raise ValueError(f"{', '.join(map(str, sources))}: no utterance of at least {min_s} s to train on")
    train_cuts, val_cuts = split_heldout(cuts, cfg.train.val_items)
    hours = sum(c.duration for c in train_cuts) / 3600
    log(f"data: {len(train_cuts)} utterances ({hours:.2f} h) for training, {len(val_cuts)} held out"
        + (f"; {len(problems)} unreadable files skipped" if len(problems) else ""))

    module = PretrainModule(cfg)
    n_params = sum(p.numel() for p in module.model.encoder.parameters()) / 1e6
    log(f"model: {cfg.preset} {cfg.model.variant}, encoder {n_params:.1f}M parameters")
    start_step = 0
    if ckpt is not None:
        start_step = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
        log(f"resuming from {ckpt} (step {start_step})")
    progress = ProgressLog(out, cfg, start_step)
    progress.problems.items.extend(problems.items)
    periodic = PeriodicCheckpoint(out / "checkpoints", cfg.train.ckpt_every_steps,
                                  cfg.train.ckpt_every_minutes, cfg.train.keep_last)
    trainer = pl.Trainer(
        default_root_dir=str(out), logger=TensorBoardLogger(str(out), name="tensorboard", version=""),
        callbacks=[progress, periodic], **trainer_kwargs(cfg),
    )
    data = PretrainData(cfg, train_cuts, val_cuts, module)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)

    if trainer.is_global_zero:
        card = {"training data": ", ".join(map(str, sources)), "steps": trainer.global_step,
                "training hours of audio": f"{hours:.2f}"}
        save_model(module.model, cfg, out / "model", card)
        if len(progress.problems):
            with open(out / "skipped_files.tsv", "w") as f:
                f.write("path\treason\n")
                for path, reason in progress.problems.items:
                    f.write(f"{path}\t{reason}\n")
            log(f"{len(progress.problems)} files could not be read and were skipped (listed in {out / 'skipped_files.tsv'})")
        try:
            from .plots import plot_pretrain

            plot_pretrain(out)
        except Exception as e:  # plotting must never fail a finished run
            log(f"(plots not written: {e})")
        log(f"done at step {trainer.global_step}: model saved to {out / 'model'}")
    return out / "model"

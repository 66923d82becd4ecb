"""The pre-training engine: PyTorch Lightning around :class:`svqmae.model.SVQMAE`.

One CPU, one GPU, several GPUs or nodes (DDP via ``--devices``/``--num-nodes``, torchrun or SLURM),
bf16 autocast, gradient accumulation, clipping, AdamW with warm-up and cosine decay, a held-out
validation slice with fixed masks, budgets in steps and minutes, atomic checksummed periodic
checkpoints, and resume-by-rerunning the same command. Runs survive preemption (SIGTERM/SIGINT),
non-finite losses, out-of-memory batches, hung ranks and full disks: see :mod:`svqmae.resilience`.

Exactness: masks and dropout are pure functions of (seed, step, rank, micro-batch) and a resumed run
skips the batches it already trained on, so a run killed at any step and resumed reaches the same
weights as an uninterrupted one (CPU, ``num_workers`` any).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from . import config as C
from .api import CheckpointError, save_model
from .data import DataError, Problems, load_sources, pretrain_loader, split_heldout
from .model import SVQMAE
from .resilience import (
    OOM_ERRORS,
    AtomicCheckpointIO,
    FaultInjector,
    NonFiniteGuard,
    PeriodicCheckpoint,
    Preempted,
    RankHeartbeat,
    StopSignals,
    TrainingAborted,
    explain_collective_failure,
    forward_with_oom_retry,
    is_collective_failure,
    latest_checkpoint,
    load_checkpoint,
    parse_faults,
)

__all__ = ["AtomicCheckpointIO", "PeriodicCheckpoint", "ProgressLog", "PretrainModule", "trainer_kwargs",
           "latest_checkpoint", "check_resume_config", "pretrain"]


def log(msg: str) -> None:
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
        print(msg, file=sys.stderr, flush=True)


def quiet_lightning() -> None:
    """Keep the terminal for svqmae's own progress: no Lightning tips/device banners, no known-harmless
    library warnings (Lightning's real warnings still show)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (r".*eagerly read CutSet.*", r".*treespec.*", r".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=msg)


# --------------------------------------------------------------------------- lightning module


class PretrainModule(pl.LightningModule):
    def __init__(self, cfg: C.Config, faults_record: Path | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = SVQMAE(cfg.model)
        self.data_pos = (0, -1)  # (epoch, index) of the last batch trained on, for exact resume
        self.fault_specs = parse_faults(cfg.train.inject_faults)
        self.faults_record = faults_record
        self.faults: FaultInjector | None = None
        self.nonfinite_skipped = 0  # counted by resilience.NonFiniteGuard
        self.oom_retries = 0

    def setup(self, stage: str) -> None:
        if self.fault_specs and self.faults_record is not None:  # the rank is known from here on
            record = Path(self.faults_record).with_suffix(f".rank{self.global_rank}.json")
            self.faults = FaultInjector(self.fault_specs, record, self.global_rank)

    def _generator(self, *keys: int) -> torch.Generator:
        seed = self.cfg.train.seed
        for k in keys:
            seed = (seed * 1_000_003 + k) % (2**62)
        return torch.Generator().manual_seed(seed)

    def training_step(self, batch, batch_idx):
        step, rank = self.global_step, self.global_rank
        micro = batch_idx % self.cfg.train.accumulate
        faults = self.faults if micro == 0 else None  # injected faults fire in the step's first micro-batch
        if faults is not None:
            faults.maybe_signal(step + 1)
        # dropout and masks are pure functions of (seed, step, rank, micro-batch): resume-exact
        torch.manual_seed((self.cfg.train.seed + 1) * 7919 + step * 131 + rank * 17 + micro)
        self.data_pos = (batch["epoch"], batch["index"])
        if batch["waves"].shape[0] == 0:  # every file in the batch failed to load: a zero step
            return sum(p.sum() for p in self.parameters()) * 0.0
        armed = [faults is not None]

        def forward(b):  # its masks come from (step, rank, micro, part): the same when recomputed
            if armed[0] and faults.take("oom", step + 1):
                raise torch.OutOfMemoryError("injected out-of-memory (--inject-fault oom)")
            return self.model(b["waves"], b["lengths"], self._generator(1, step, rank, micro, *b.get("part", ())))

        out = forward_with_oom_retry(forward, batch, _split_batch, _combine_outputs, self._oom_advice(),
                                     on_retry=lambda: self._on_oom(step + 1, batch))
        armed[0] = False
        if faults is not None and faults.take("nan", step + 1):
            out["loss"] = out["loss"] * float("nan")
        self.last_out = {k: float(v.detach()) for k, v in out.items()}
        self.last_out["audio_seconds"] = float(batch["lengths"].sum()) / self.cfg.model.features.sample_rate
        self.log_dict({f"train/{k}": v for k, v in out.items() if k not in ("tokens", "visible_tokens")},
                      on_step=True, prog_bar=False, batch_size=batch["waves"].shape[0])
        return out["loss"]

    def _oom_advice(self) -> str:
        t = self.cfg.train
        return (f"lower train.max_batch_seconds (now {t.max_batch_seconds:g}; e.g. --set train.max_batch_seconds="
                f"{max(t.max_utt_seconds, t.max_batch_seconds / 2):g}) and raise train.accumulate to keep the "
                f"effective batch, or lower train.max_utt_seconds (now {t.max_utt_seconds:g}); then rerun to resume")

    def _on_oom(self, step: int, batch) -> None:
        self.oom_retries += 1
        secs = float(batch["lengths"].sum()) / self.cfg.model.features.sample_rate
        print(f"[rank {self.global_rank}] step {step}: out of memory on a batch of {batch['waves'].shape[0]} "
              f"utterances ({secs:.0f} s of audio); retrying it split in two ({self.oom_retries} so far)",
              file=sys.stderr, flush=True)
        if batch["waves"].shape[0] < 2:
            raise TrainingAborted(f"step {step}: out of memory on a single utterance; {self._oom_advice()}")

    def backward(self, loss, *args, **kwargs):
        try:
            super().backward(loss, *args, **kwargs)
        except OOM_ERRORS:
            raise TrainingAborted(f"step {self.global_step + 1}: out of memory in the backward pass; "
                                  f"{self._oom_advice()}") from None

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
            lr=t.lr, betas=tuple(t.betas),  # not fused: Lightning clips gradients under AMP
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


def _split_batch(batch: dict) -> list[dict]:
    """A padded batch -> two halves (by utterance), each trimmed to its own longest utterance."""
    half = (batch["waves"].shape[0] + 1) // 2
    parts = []
    for i, sl in enumerate((slice(0, half), slice(half, None))):
        lengths = batch["lengths"][sl]
        parts.append({"waves": batch["waves"][sl, : int(lengths.max())], "lengths": lengths, "part": (i + 1,)})
    return parts


def _combine_outputs(outs: list[dict]) -> dict:
    """Per-part outputs -> the batch's: losses and accuracies weighted by masked tokens (so the loss is
    the batch's mean over masked tokens, as without the split), counts summed, the rest averaged."""
    w = [o["tokens"] - o["visible_tokens"] for o in outs]
    total = sum(w)
    combined = {}
    for k in outs[0]:
        if k in ("tokens", "visible_tokens"):
            combined[k] = sum(o[k] for o in outs)
        elif k in ("loss", "ce", "masked_acc", "recon"):
            combined[k] = sum(o[k] * wi for o, wi in zip(outs, w)) / total.clamp_min(1)
        else:
            combined[k] = sum(o[k] for o in outs) / len(outs)
    return combined


class PretrainData(pl.LightningDataModule):
    def __init__(self, cfg: C.Config, train_cuts, val_cuts, module: PretrainModule):
        super().__init__()
        self.cfg, self.train_cuts, self.val_cuts, self.module = cfg, train_cuts, val_cuts, module

    def train_dataloader(self):
        t = self.cfg.train
        epoch, index = self.module.data_pos
        return pretrain_loader(self.train_cuts, t.max_batch_seconds, t.max_utt_seconds, t.num_buckets,
                               t.num_workers, t.seed, shuffle=True, start=(epoch, index + 1))

    def val_dataloader(self):
        t = self.cfg.train
        if self.val_cuts is None or len(self.val_cuts) == 0:
            return []
        return pretrain_loader(self.val_cuts, t.max_batch_seconds, t.max_utt_seconds, 1, 0, t.seed, shuffle=False)


# --------------------------------------------------------------------------- callbacks


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

    def on_fit_start(self, trainer, pl_module):
        """On resume, drop the records a killed run wrote after its last checkpoint: they are redone."""
        path = self.out / "metrics.jsonl"
        if not trainer.is_global_zero or not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.start_step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by kill -9
                continue
        path.write_text("".join(f"{line}\n" for line in keep))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out = take_step_output(pl_module, batch, self.problems)
        if out is None:
            return
        self.audio += out["audio_seconds"]
        if all(math.isfinite(v) for v in out.values()):  # a skipped non-finite step stays out of the means
            for k, v in out.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.n += 1
        step = trainer.global_step
        t = self.cfg.train
        if (batch_idx + 1) % t.accumulate or step % t.log_every:
            return
        now = time.monotonic()
        local = torch.tensor([self.audio, float(getattr(pl_module, "oom_retries", 0))], device=pl_module.device)
        audio, ooms = (float(v) for v in trainer.strategy.reduce(local, reduce_op="sum"))
        rec = {k: v / max(self.n, 1) for k, v in self.sums.items() if k not in ("audio_seconds",)}
        rec = {
            "step": step, "epoch": pl_module.data_pos[0],
            "loss": rec.get("loss"), "masked_acc": rec.get("masked_acc"), "ce": rec.get("ce"),
            "code_perplexity": rec.get("code_perplexity"), "code_usage": rec.get("code_usage"),
            "visible_share": rec.get("visible_tokens", 0) / max(rec.get("tokens", 1), 1),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "audio_seconds_per_s": audio / max(now - self.t_last, 1e-9),
            "elapsed_s": now - self.t0,
        }
        if "recon" in self.sums:
            rec["recon"] = self.sums["recon"] / self.n
        rec.update(nonfinite_skipped=getattr(pl_module, "nonfinite_skipped", 0), oom_retries=int(ooms))
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
        if rec["loss"] is None:  # every step in the window was skipped
            return
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


def take_step_output(pl_module, batch, problems: Problems) -> dict | None:
    """Record the files a batch could not load (one log line each) and hand over the metrics the
    module left for this step (None when the step produced none)."""
    for path, reason in batch["failed"]:
        problems.add(path, reason)
        log(f"skipped {reason}")
    out = getattr(pl_module, "last_out", None)
    pl_module.last_out = None
    return out


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# --------------------------------------------------------------------------- the job


def check_resume_config(ckpt: Path, cfg: C.Config) -> None:
    """Refuse to resume from ``ckpt`` if it was made with another model configuration (names the fields)."""
    saved = load_checkpoint(ckpt).get("svqmae_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ckpt}: not an svqmae pre-training checkpoint (no svqmae_config)")
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
        accelerator="gpu" if gpu else "cpu", devices=devices, num_nodes=t.num_nodes, strategy=_strategy(t, devices),
        precision=precision, max_steps=t.max_steps, accumulate_grad_batches=t.accumulate,
        gradient_clip_val=t.grad_clip or None, use_distributed_sampler=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
        val_check_interval=t.val_every * t.accumulate, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every, plugins=[AtomicCheckpointIO()],
    )
    if t.max_minutes > 0:
        kw["max_time"] = timedelta(minutes=t.max_minutes)
    return kw


def _strategy(t: C.TrainConfig, devices):
    """DDP gets the process-group timeout from the config: a collective that waits longer than
    ``train.ddp_timeout_minutes`` (a hung or dead rank) fails instead of hanging forever."""
    n_dev = torch.cuda.device_count() if devices == "auto" else devices
    several = t.num_nodes > 1 or int(os.environ.get("WORLD_SIZE", 1)) > 1 or (isinstance(n_dev, int) and n_dev > 1)
    if t.strategy == "ddp" or (t.strategy == "auto" and several):
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(timeout=timedelta(minutes=getattr(t, "ddp_timeout_minutes", 30.0)))
    return t.strategy


def final_metrics(out: Path) -> dict[str, str]:
    """The last logged training and validation figures of a run, for the model card."""
    from .plots import read_metrics

    rows = read_metrics(out)
    names = {"loss": "final training loss", "masked_acc": "final training masked-code accuracy",
             "val_loss": "final validation loss", "val_masked_acc": "final validation masked-code accuracy"}
    last = {k: next((r[k] for r in reversed(rows) if k in r), None) for k in names}
    return {names[k]: f"{v:.4f}" for k, v in last.items() if isinstance(v, (int, float))}


def pretrain(sources: list[str], out: str | Path, cfg: C.Config) -> Path:
    """Pre-train on ``sources`` into ``out``; rerunning the same call resumes. Returns ``out/model``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_lightning()
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
        raise DataError(f"{', '.join(map(str, sources))}: no utterance of at least {min_s} s to train on")
    train_cuts, val_cuts = split_heldout(cuts, cfg.train.val_items)
    hours = sum(c.duration for c in train_cuts) / 3600
    log(f"data: {len(train_cuts)} utterances ({hours:.2f} h) for training, {len(val_cuts)} held out"
        + (f"; {len(problems)} unreadable files skipped" if len(problems) else ""))

    module = PretrainModule(cfg, faults_record=out / "faults_fired.json")
    n_params = sum(p.numel() for p in module.model.encoder.parameters()) / 1e6
    log(f"model: {cfg.preset} {cfg.model.variant}, encoder {n_params:.1f}M parameters")
    start_step = 0
    if ckpt is not None:
        start_step = int(load_checkpoint(ckpt).get("global_step", 0))
        log(f"resuming from {ckpt} (step {start_step})")
    progress = ProgressLog(out, cfg, start_step)
    progress.problems.items.extend(problems.items)
    periodic = PeriodicCheckpoint(out / "checkpoints", cfg.train.ckpt_every_steps,
                                  cfg.train.ckpt_every_minutes, cfg.train.keep_last)
    trainer = pl.Trainer(
        default_root_dir=str(out), logger=TensorBoardLogger(str(out), name="tensorboard", version=""),
        callbacks=[progress, periodic, NonFiniteGuard(cfg.train.max_nonfinite), StopSignals(),
                   RankHeartbeat(out / "heartbeat")],
        **trainer_kwargs(cfg),
    )
    data = PretrainData(cfg, train_cuts, val_cuts, module)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    except Preempted as e:
        log(f"svqmae pretrain: {e.message} (exit status {e.code})")
        raise
    except (TrainingAborted, CheckpointError):
        raise
    except Exception as e:
        if trainer.world_size > 1 and is_collective_failure(e):
            raise explain_collective_failure(e, out / "heartbeat", cfg.train.ddp_timeout_minutes) from None
        raise

    if trainer.is_global_zero:
        figures = []
        try:
            from .plots import plot_pretrain

            figures.append(plot_pretrain(out))
        except Exception as e:  # plotting must never fail a finished run
            log(f"(plots not written: {e})")
        card = {"training data": ", ".join(map(str, sources)), "steps": trainer.global_step,
                "training hours of audio": f"{hours:.2f}", **final_metrics(out)}
        save_model(module.model, cfg, out / "model", card, figures=figures)
        if len(progress.problems):
            with open(out / "skipped_files.tsv", "w") as f:
                f.write("path\treason\n")
                for path, reason in progress.problems.items:
                    f.write(f"{path}\t{reason}\n")
            log(f"{len(progress.problems)} files could not be read and were skipped (listed in {out / 'skipped_files.tsv'})")
        log(f"done at step {trainer.global_step}: model saved to {out / 'model'}")
    return out / "model"

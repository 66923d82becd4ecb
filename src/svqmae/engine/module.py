"""The one training engine: a Lightning module base, the trainer's settings, and the run.

Pre-training (:mod:`svqmae.tasks.pretrain`) and fine-tuning (:mod:`svqmae.tasks.finetune`) are each an
:class:`EngineModule` with its own ``training_step``; everything else is shared: seeding (dropout and
masks are pure functions of seed, step, rank and micro-batch, so a resumed run is exact), the data
position kept in checkpoints, the optimizer, fault injection, the progress log, atomic checksummed
checkpoints, resume by rerunning, SIGTERM/SIGINT, non-finite steps, hung ranks (:func:`run`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from ..config import ConfigError, TrainConfig
from ..model.io import CheckpointError
from .checkpoint import AtomicCheckpointIO, PeriodicCheckpoint, TrainingAborted, check_resume, latest_checkpoint
from .faults import (
    FaultInjector,
    NonFiniteGuard,
    Preempted,
    RankHeartbeat,
    StopSignals,
    explain_collective_failure,
    is_collective_failure,
    parse_faults,
)
from .progress import ProgressLog, log
from .schedules import TrainClock
from .speed import adamw, resolve_speed


class EngineModule(pl.LightningModule):
    """What every svqmae training job shares. Subclasses set ``self.model``, implement
    ``training_step`` (starting with :meth:`begin_step`), ``lr_schedule`` and, if they log more than
    the loss, ``progress_line``; they put the step's numbers in ``self.last_out``."""

    CONFIG_KEY = "svqmae_config"  # the checkpoint entry that holds the run's config

    def __init__(self, t: TrainConfig, faults_record: Path | None = None):
        super().__init__()
        self.t = t
        self.data_pos = (0, -1)  # (epoch, index) of the last batch trained on, for exact resume
        # streamed (Shar) data: this rank's {loader worker: (epoch, unit, offset)} read position after
        # its last batch trained on, and every rank's positions from the checkpoint resumed from
        self.streamed = False
        self.stream_pos: dict[int, tuple[int, int, int]] = {}
        self.stream_layout: list[int] | None = None
        self.stream_saved: list[dict] | None = None
        self.fault_specs = parse_faults(t.inject_faults)
        self.faults_record = faults_record
        self.faults: FaultInjector | None = None
        self.nonfinite_skipped = 0  # counted by NonFiniteGuard
        self.update_skipped = False  # this step's update is skipped (NonFiniteGuard; a device tensor with fused AdamW)
        self.oom_retries = 0
        self.last_out: dict | None = None
        self.speed = resolve_speed(t)  # compile, pack, fused AdamW, shape bucket on this device (engine.speed)
        self.clock = TrainClock()  # seconds trained, across resumes (time budgets and schedules)

    def on_train_start(self) -> None:
        self.clock.start()

    def setup(self, stage: str) -> None:
        if self.fault_specs and self.faults_record is not None:  # the rank is known from here on
            record = Path(self.faults_record).with_suffix(f".rank{self.global_rank}.json")
            self.faults = FaultInjector(self.fault_specs, record, self.global_rank)

    def generator(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded from ``train.seed`` and ``keys`` (e.g. step, rank, micro-batch)."""
        seed = self.t.seed
        for k in keys:
            seed = (seed * 1_000_003 + k) % (2**62)
        return torch.Generator().manual_seed(seed)

    def begin_step(self, batch, batch_idx) -> tuple[int, int, int, FaultInjector | None]:
        """Seed dropout, note the data position, fire due signal faults. Returns (step, rank,
        micro-batch, the fault injector if faults may fire in this batch)."""
        step, rank = self.global_step, self.global_rank
        micro = batch_idx % self.t.accumulate
        faults = self.faults if micro == 0 else None  # injected faults fire in the step's first micro-batch
        if faults is not None:
            faults.maybe_signal(step + 1)
        # dropout and masks are pure functions of (seed, step, rank, micro-batch): resume-exact
        torch.manual_seed((self.t.seed + 1) * 7919 + step * 131 + rank * 17 + micro)
        self.data_pos = (batch["epoch"], batch["index"])
        if "stream" in batch:
            st = batch["stream"]
            self.stream_pos[int(st["worker"])] = tuple(int(x) for x in st["pos"])
            self.stream_layout = [int(x) for x in st["layout"]]
        return step, rank, micro, faults

    def empty_step(self) -> torch.Tensor:
        """The loss of a batch whose every file failed to load: zero, with a graph (DDP needs one)."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    # ---- progress (see engine.progress.ProgressLog)

    def progress_record(self, means: dict, last: dict) -> dict:
        """The ``metrics.jsonl`` fields of a logging window, from the means of ``last_out``."""
        return means

    def progress_line(self, rec: dict) -> str:
        return f"loss {rec['loss']:.3f}"

    # ---- optimizer

    def lr_schedule(self) -> Callable[[int], float]:
        raise NotImplementedError

    def optimized_parameters(self):
        """(name, parameter) pairs the optimizer holds. Pre-training lists every parameter, the frozen
        filterbank tables included (they never get a gradient): its checkpoints' optimizer state has
        always been laid out that way."""
        return self.model.named_parameters()

    def param_groups(self) -> list[dict]:
        """AdamW groups: weight decay on matrices, none on biases, norms and embeddings-as-vectors."""
        decay, no_decay = [], []
        for name, p in self.optimized_parameters():
            (no_decay if p.ndim < 2 or "mask_embed" in name else decay).append(p)
        return [{"params": decay, "weight_decay": self.t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        opt = adamw(self.param_groups(), self.t, fused=self.speed.fused_adamw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_schedule())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning refuses to clip for a fused optimizer under mixed precision, because such an optimizer
        unscales fp16 gradients itself; bf16 autocast has no gradient scaler, so there is nothing to
        unscale and clipping here (foreach, on the device, no host sync) is right."""
        if gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused"):
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                raise ConfigError("fused AdamW with fp16 loss scaling cannot clip gradients: use bf16 or 32, "
                                  "or --set train.fused_adamw=off")
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints

    def checkpoint_config(self) -> dict:
        """What is stored under ``CONFIG_KEY`` (and more, via ``on_save_checkpoint`` overrides)."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint):
        checkpoint[self.CONFIG_KEY] = self.checkpoint_config()
        checkpoint["data_pos"] = list(self.data_pos)
        checkpoint["train_seconds"] = self.clock.elapsed()  # a resumed run continues the time budget's clock
        if self.streamed:  # every rank calls this together (Trainer.save_checkpoint): gather their positions
            mine = self._stream_state()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                every = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(every, mine)
            else:
                every = [mine]
            checkpoint["data_stream"] = every

    def _stream_state(self) -> dict:
        """This rank's stream positions: those of the batches trained on since the resume, over the
        resumed checkpoint's for workers that delivered none since (same job layout only)."""
        saved = self.stream_saved[self.global_rank] if self.stream_saved and self.global_rank < len(self.stream_saved) else None
        if saved is not None and (self.stream_layout is None or list(saved["layout"]) == self.stream_layout):
            workers = {int(w): list(p) for w, p in saved["workers"].items()}
            layout = list(saved["layout"])
        else:
            workers, layout = {}, self.stream_layout
        workers.update({w: list(p) for w, p in self.stream_pos.items()})
        return {"layout": layout, "workers": workers}

    def on_load_checkpoint(self, checkpoint):
        self.data_pos = tuple(checkpoint.get("data_pos", (0, -1)))
        self.stream_saved = checkpoint.get("data_stream")
        self.clock.offset = float(checkpoint.get("train_seconds", 0.0))


class EngineData(pl.LightningDataModule):
    """Training batches as an endless resumable stream from the module's data position, and an
    optional validation loader: ``train(start)`` and ``val()`` build them."""

    def __init__(self, module: EngineModule, train: Callable, val: Callable | None = None):
        super().__init__()
        self.module, self.train_fn, self.val_fn = module, train, val

    def train_dataloader(self):
        epoch, index = self.module.data_pos
        return self.train_fn((epoch, index + 1))

    def val_dataloader(self):
        return self.val_fn() if self.val_fn is not None else []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        """``host_lengths``: the lengths as a tuple, which stays on the host when the batch moves to the device,
        so that a step can size its tensors without waiting for the device."""
        if isinstance(batch, dict) and "lengths" in batch:
            batch["host_lengths"] = tuple(batch["lengths"].tolist())
        return batch


def trainer_kwargs(t: TrainConfig) -> dict:
    """Lightning ``Trainer`` arguments from ``train.*``: devices, precision, DDP, budgets, clipping."""
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
    return kw  # the time budget is TimeBudget's (on the module's clock, which resumes where it stopped)


class TimeBudget(pl.Callback):
    """``train.max_minutes``: stop at the first optimizer step boundary after that much training time, on
    the module's :class:`TrainClock` (whose elapsed time checkpoints carry, so a resumed run has only
    the rest of the budget). Every rank stops at the same step."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seconds <= 0 or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        stop = pl_module.clock.elapsed() >= self.seconds
        if trainer.world_size > 1:
            stop = trainer.strategy.broadcast(stop)
        if stop:
            trainer.should_stop = True
            log(f"time budget of {self.seconds / 60:g} minutes reached at step {trainer.global_step}")


def is_multi_device(kw: dict, t: TrainConfig) -> bool:
    devices = torch.cuda.device_count() if kw["devices"] == "auto" else kw["devices"]
    return devices not in (0, 1, "1", [0]) or t.num_nodes > 1 or int(os.environ.get("WORLD_SIZE", 1)) > 1


def _strategy(t: TrainConfig, devices):
    """DDP gets the process-group timeout from the config: a collective that waits longer than
    ``train.ddp_timeout_minutes`` (a hung or dead rank) fails instead of hanging forever."""
    n_dev = torch.cuda.device_count() if devices == "auto" else devices
    several = t.num_nodes > 1 or int(os.environ.get("WORLD_SIZE", 1)) > 1 or (isinstance(n_dev, int) and n_dev > 1)
    if t.strategy == "ddp" or (t.strategy == "auto" and several):
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(timeout=timedelta(minutes=getattr(t, "ddp_timeout_minutes", 30.0)))
    return t.strategy


def resume_point(out: Path, key: str, differences: Callable[[dict], list[str]]) -> tuple[Path | None, int]:
    """The newest valid checkpoint in ``out/checkpoints`` (corrupt ones set aside) and its step, after
    checking that it was made with the same settings (``differences``, see ``check_resume``)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None, 0
    state = check_resume(ckpt, key, differences)
    return ckpt, int(state.get("global_step", 0))


def run(module: EngineModule, data: EngineData, out: Path, t: TrainConfig, ckpt: Path | None, start_step: int,
        problems, what: str, **trainer_overrides) -> tuple[pl.Trainer, ProgressLog]:
    """Fit ``module`` on ``data`` into ``out`` (resuming from ``ckpt``) with every shared callback:
    progress log, periodic atomic checkpoints, non-finite guard, stop signals, rank heartbeats."""
    if ckpt is not None:
        log(f"resuming from {ckpt} (step {start_step})")
    progress = ProgressLog(out, t, start_step, problems)
    periodic = PeriodicCheckpoint(out / "checkpoints", t.ckpt_every_steps, t.ckpt_every_minutes, t.keep_last)
    kw = {**trainer_kwargs(t), **trainer_overrides}
    trainer = pl.Trainer(
        default_root_dir=str(out), logger=TensorBoardLogger(str(out), name="tensorboard", version=""),
        callbacks=[NonFiniteGuard(t.max_nonfinite, t.log_every), progress, periodic, TimeBudget(t.max_minutes),
                   StopSignals(), RankHeartbeat(out / "heartbeat")],
        **kw,
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    except Preempted as e:
        log(f"svqmae {what}: {e.message} (exit status {e.code})")
        raise
    except (TrainingAborted, CheckpointError):
        raise
    except Exception as e:
        if trainer.world_size > 1 and is_collective_failure(e):
            raise explain_collective_failure(e, out / "heartbeat", t.ddp_timeout_minutes) from None
        raise
    return trainer, progress

"""Progress: one terminal line per logged step and ``metrics.jsonl``, for every training job.

The same :class:`ProgressLog` serves pre-training and fine-tuning: the module leaves the step's numbers
in ``pl_module.last_out`` (see :class:`svqmae.engine.module.EngineModule`), the log averages them over
the logging window (steps skipped as non-finite stay out of the means), adds throughput, learning rate
and ETA, and asks the module for the terminal line (``progress_line``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from ..config import TrainConfig


def rank() -> int:
    """This process's global rank, from the launcher's environment (0 when not distributed)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def log(msg: str, all_ranks: bool = False) -> None:
    """A line on stderr (rank 0 only, unless ``all_ranks``; then prefixed with the rank)."""
    r = rank()
    if all_ranks and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        msg = f"[rank {r}] {msg}"
    elif r != 0:
        return
    print(msg, file=sys.stderr, flush=True)


def quiet_lightning() -> None:
    """Keep the terminal for svqmae's own progress: no Lightning tips/device banners, no known-harmless
    library warnings (Lightning's real warnings still show)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (r".*eagerly read CutSet.*", r".*treespec.*", r".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=msg)


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def take_step_output(pl_module, batch, problems) -> dict | None:
    """Record the files a batch could not load (one log line each) and hand over the metrics the
    module left for this step (None when the step produced none)."""
    for path, reason in batch["failed"]:
        problems.add(path, reason)
        log(f"skipped {reason}")
    out = getattr(pl_module, "last_out", None)
    pl_module.last_out = None
    return out


class ProgressLog(pl.Callback):
    """Terminal progress and ``OUT/metrics.jsonl`` for any :class:`EngineModule`: step, the module's
    metrics (means over the window), learning rate, audio-seconds per second (all ranks), ETA, skipped
    non-finite steps and out-of-memory retries; validation rows; the files skipped as unreadable."""

    def __init__(self, out: Path, t: TrainConfig, start_step: int, problems):
        """``problems``: a :class:`svqmae.data.Problems` that collects the unreadable files."""
        self.out, self.t, self.start_step = Path(out), t, start_step
        self.t0 = self.t_last = time.monotonic()
        self.audio = 0.0
        self.sums: dict = {}  # metric -> sum over the window's finite steps (a float, or a device tensor)
        self.n = 0  # finite steps in the window (an int, or a device tensor when the metrics are tensors)
        self.last: dict = {}
        self.problems = problems

    def _write(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

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
        self.audio += out.pop("audio_seconds", 0.0)
        self.last = out
        self._accumulate(out)
        step, t = trainer.global_step, self.t
        if (batch_idx + 1) % t.accumulate or step % t.log_every:
            return
        now = time.monotonic()
        local = torch.tensor([self.audio, float(getattr(pl_module, "oom_retries", 0))], device=pl_module.device)
        audio, ooms = (float(v) for v in trainer.strategy.reduce(local, reduce_op="sum"))
        rec = {"step": step, "epoch": pl_module.data_pos[0], **pl_module.progress_record(self._means(), self.last),
               "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "audio_seconds_per_s": audio / max(now - self.t_last, 1e-9), "elapsed_s": now - self.t0,
               "nonfinite_skipped": getattr(pl_module, "nonfinite_skipped", 0), "oom_retries": int(ooms)}
        self.audio, self.t_last = 0.0, now
        if not trainer.is_global_zero:
            return
        self._write(rec)
        eta = (t.max_steps - step) * (now - self.t0) / max(step - self.start_step, 1)
        if t.max_minutes > 0:
            eta = min(eta, max(0.0, t.max_minutes * 60 - pl_module.clock.elapsed()))
        if rec.get("loss") is None:  # every step in the window was skipped
            return
        print(f"step {step}/{t.max_steps} | {pl_module.progress_line(rec)} | {rec['audio_seconds_per_s']:.0f} "
              f"audio-s/s | lr {rec['lr']:.2e} | ETA {fmt_duration(eta)}", file=sys.stderr, flush=True)

    def _accumulate(self, out: dict) -> None:
        """Add a step's metrics to the window's sums; a step with a non-finite metric (a skipped step)
        stays out of the means. Device tensors are summed on the device, so the step never waits for it;
        they are read once per logged step (:meth:`_means`)."""
        numbers = {k: v for k, v in out.items() if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)}
        tensors = {k: v.detach().float().reshape(()) for k, v in numbers.items() if isinstance(v, torch.Tensor)}
        if tensors:
            ok = torch.isfinite(torch.stack(list(tensors.values()))).all()
            for k, v in tensors.items():
                self.sums[k] = self.sums.get(k, 0.0) + torch.where(ok, v, 0.0)
            self.n = self.n + ok.long()
        elif all(math.isfinite(v) for v in numbers.values()):
            for k, v in numbers.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.n += 1

    def _means(self) -> dict[str, float]:
        """The window's means (one host sync for all of them), then a fresh window."""
        keys = list(self.sums)
        values = [torch.as_tensor(self.sums[k]).float().cpu() for k in keys] + [torch.as_tensor(self.n).float().cpu()]
        *sums, n = torch.stack(values).tolist() if keys else [float(self.n)]
        self.sums, self.n = {}, 0
        return {k: v / n for k, v in zip(keys, sums)} if n else {}

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if m:
            self._write({"step": trainer.global_step, **m})
            log(f"validation at step {trainer.global_step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))

    def write_skipped(self) -> None:
        """``OUT/skipped_files.tsv`` listing the unreadable files met during the run (if any)."""
        if not len(self.problems):
            return
        with open(self.out / "skipped_files.tsv", "w") as f:
            f.write("path\treason\n")
            for path, reason in self.problems.items:
                f.write(f"{path}\t{reason}\n")
        log(f"{len(self.problems)} files could not be read and were skipped (listed in {self.out / 'skipped_files.tsv'})")

"""Checkpoint files: written atomically with a checksum, verified when read, never unpickling code.

- :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file, fsynced and renamed, with
  a ``NAME.sha256.json`` sidecar (size + SHA-256); loading verifies it and never unpickles code
  (``torch.load(weights_only=True)``). A full disk leaves the previous checkpoint intact and stops
  the run with one clear message.
- :func:`latest_checkpoint`: the newest checkpoint that verifies; a corrupt or truncated one is set
  aside (renamed ``*.corrupt``) with a warning and the previous one is used.
- :class:`PeriodicCheckpoint`: every N steps or M minutes; keeps the last N plus ``best.ckpt`` (lowest
  validation loss).
- :func:`check_resume`: refuse to resume from a checkpoint of another configuration, naming the fields.

Pre-training and fine-tuning both use these (one path for both).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..model.io import CheckpointError, atomic_write_bytes, one_line
from .progress import log, rank


class TrainingAborted(CheckpointError):
    """The run stopped on purpose (too many non-finite steps, repeated out-of-memory, full disk, a hung
    rank); the message says why, what to change and where the last good checkpoint is. A
    :class:`CheckpointError`, so that the CLI prints it as one line (exit status 2)."""



def sidecar(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256.json")


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, fsynced, then renamed, and get a checksum sidecar:
    a crash or a full disk never leaves a half-written checkpoint under the real name, and a file
    damaged later is detected. Loading verifies the checksum and never unpickles code."""

    def _write(self, checkpoint: dict, f) -> None:
        torch.save(checkpoint, f)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                w = _HashingWriter(f)
                self._write(checkpoint, w)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            meta = {"sha256": w.sha.hexdigest(), "bytes": w.size, "global_step": checkpoint.get("global_step")}
            atomic_write_bytes(sidecar(path), json.dumps(meta).encode())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TrainingAborted(
                    f"{path}: disk full while writing the checkpoint ({os.strerror(e.errno)}); earlier "
                    f"checkpoints in {path.parent} are intact. Free space and rerun the same command to resume"
                ) from None
            raise TrainingAborted(f"{path}: could not write the checkpoint ({e}); earlier checkpoints are intact") from None
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint(path, map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
        sidecar(Path(path)).unlink(missing_ok=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if ``path`` matches its checksum sidecar; otherwise what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        meta = json.loads(sidecar(path).read_text())
    except FileNotFoundError:
        return None  # written by an older version: nothing to check against (torch.load will tell)
    except (OSError, json.JSONDecodeError):
        return f"unreadable checksum file {sidecar(path).name}"
    size = path.stat().st_size
    if size != meta.get("bytes"):
        return f"truncated or altered ({size} bytes, expected {meta.get('bytes')})"
    if _sha256(path) != meta.get("sha256"):
        return "corrupt (SHA-256 does not match)"
    return None


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    """Verify the checksum, then ``torch.load(weights_only=True)``: tensors and plain data only."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"{path}: checkpoint is {problem}")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({one_line(e)})") from None


def latest_checkpoint(out: str | Path, pattern: str = "step*.ckpt") -> Path | None:
    """The newest ``out/checkpoints/<pattern>`` that verifies. A corrupt or truncated one is renamed
    ``*.corrupt`` (kept for inspection, never picked again) with a warning, and the previous one used."""
    folder = Path(out) / "checkpoints"
    found = sorted(folder.glob(pattern), reverse=True)
    for i, ckpt in enumerate(found):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        bad = ckpt.with_name(ckpt.name + ".corrupt")
        if rank() == 0:
            os.replace(ckpt, bad)
            sidecar(ckpt).unlink(missing_ok=True)
        then = "trying the previous checkpoint" if i + 1 < len(found) else "there is no earlier checkpoint to use"
        log(f"warning: {ckpt} is {problem}; moved aside to {bad.name}, {then}")
    return None


class PeriodicCheckpoint(pl.Callback):
    """Every N optimizer steps or M minutes, whichever comes first: ``checkpoints/stepXXXXXXXX.ckpt``;
    keeps the newest ``keep_last``, plus ``checkpoints/best.ckpt`` at the lowest ``monitor`` value seen
    after a validation. A failed write (full disk) stops every rank with one message."""

    def __init__(self, dirpath: Path, every_steps: int, every_minutes: float, keep_last: int,
                 monitor: str | None = "val/loss"):
        self.dirpath, self.every_steps, self.every_s, self.keep = Path(dirpath), every_steps, every_minutes * 60, keep_last
        self.monitor, self.best = monitor, float("inf")
        self.last_time, self.last_step = time.monotonic(), -1
        self.last_path: Path | None = None

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state.get("best", float("inf")))

    def _write(self, trainer, path: Path) -> None:
        error = None
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except CheckpointError as e:  # only rank 0 writes; it skipped the barrier that ends save_checkpoint
            error = str(e)
            trainer.strategy.barrier("Trainer.save_checkpoint")
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            raise TrainingAborted(error)

    def save(self, trainer) -> Path:
        """Write ``stepXXXXXXXX.ckpt`` now (every rank must call this together)."""
        step = trainer.global_step
        path = self.dirpath / f"step{step:08d}.ckpt"
        if step == self.last_step:
            return path
        self._write(trainer, path)
        self.last_step, self.last_time, self.last_path = step, time.monotonic(), path
        if trainer.is_global_zero:
            for old in sorted(self.dirpath.glob("step*.ckpt"))[: -self.keep]:
                old.unlink(missing_ok=True)
                sidecar(old).unlink(missing_ok=True)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due_steps = self.every_steps > 0 and step > 0 and step % self.every_steps == 0
        due_time = self.every_s > 0 and time.monotonic() - self.last_time >= self.every_s
        # decide on rank 0's clock so every rank saves together
        due = trainer.strategy.broadcast(bool(due_steps or due_time), src=0)
        if due and step != self.last_step:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.monitor or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])  # already synced across ranks
        if value < self.best:
            self.best = value
            self._write(trainer, self.dirpath / "best.ckpt")
            log(f"best {self.monitor} so far ({value:.4f}): saved {self.dirpath / 'best.ckpt'}")

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)


def last_good_checkpoint_hint(trainer) -> str:
    periodic = next((cb for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint)), None)
    path = periodic.last_path if periodic is not None else None
    if path is None and periodic is not None:
        path = latest_checkpoint(periodic.dirpath.parent)
    return f"the last good checkpoint is {path}" if path else "no checkpoint was written yet"


def check_resume(ckpt: Path, key: str, differences: Callable[[dict], list[str]]) -> dict:
    """Verify ``ckpt`` and refuse to resume from it if it was made with other settings.

    ``key``: the checkpoint entry holding the saved config (e.g. ``svqmae_config``); ``differences``:
    saved config dict -> the differing fields (empty: same). Returns the loaded checkpoint."""
    state = load_checkpoint(ckpt)
    saved = state.get(key)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ckpt}: not a checkpoint of this kind of run (no {key}; this --out holds "
                              "another kind of run)")
    differ = differences(saved)
    if differ:
        raise CheckpointError(f"{ckpt}: checkpoint was made with another configuration; differing fields: "
                              + "; ".join(differ) + " (use a new --out, or the original settings)")
    return state

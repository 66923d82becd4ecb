"""Runs that survive: reusable Lightning pieces for long pre-training and fine-tuning jobs.

- :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file, fsynced and renamed, with
  a ``NAME.sha256.json`` sidecar (size + SHA-256); loading verifies it and never unpickles code
  (``torch.load(weights_only=True)``). A full disk leaves the previous checkpoint intact and stops
  the run with one clear message.
- :func:`latest_checkpoint`: the newest checkpoint that verifies; a corrupt or truncated one is set
  aside (renamed ``*.corrupt``) with a warning and the previous one is used.
- :class:`PeriodicCheckpoint`: every N steps or M minutes; keeps the last N plus ``best.ckpt`` (lowest
  validation loss).
- :class:`StopSignals`: SIGTERM/SIGINT (SLURM preemption, Ctrl-C) -> every rank finishes its step, a
  checkpoint is written, and the job exits with status 128 + signal number (143 / 130).
- :class:`NonFiniteGuard`: a non-finite loss or gradient on ANY rank skips the update on EVERY rank
  (the decision is all-reduced, so no rank waits forever); N in a row stops the run.
- :func:`forward_with_oom_retry`: out-of-memory on a batch -> free, retry it split in two; a second
  out-of-memory stops the run with advice.
- :class:`RankHeartbeat` + :func:`explain_collective_failure`: a collective that times out (a hung or
  dead rank) ends the job with a message naming the rank that stopped reporting.
- Fault injection (:func:`parse_faults`, :class:`FaultInjector`): ``KIND@STEP[:rankR]`` with KIND one
  of ``nan``, ``oom``, ``sigterm``, ``sigkill``; each fault fires once per run directory.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.utils.checkpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .api import CheckpointError, atomic_write_bytes
from .config import ConfigError


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def log(msg: str, all_ranks: bool = False) -> None:
    """A line on stderr (rank 0 only, unless ``all_ranks``; then prefixed with the rank)."""
    rank = _rank()
    if all_ranks and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        msg = f"[rank {rank}] {msg}"
    elif rank != 0:
        return
    print(msg, file=sys.stderr, flush=True)


class TrainingAborted(CheckpointError):
    """The run stopped on purpose (too many non-finite steps, repeated out-of-memory, full disk, a hung
    rank); the message says why, what to change and where the last good checkpoint is. A
    :class:`CheckpointError`, so that the CLI prints it as one line (exit status 2)."""


class Preempted(SystemExit):
    """SIGTERM / SIGINT: a checkpoint was written; exit status 128 + signal number (143, 130)."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


# --------------------------------------------------------------------------- checkpoints


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
            _atomic_write_text(sidecar(path), json.dumps(meta))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TrainingAborted(
                    f"{path}: disk full while writing the checkpoint ({os.strerror(e.errno)}); earlier "
                    f"checkpoints in {path.parent} are intact. Free space and rerun the same command to resume"
                ) from None
            raise TrainingAborted(f"{path}: could not write the checkpoint ({e}); earlier checkpoints are intact") from None
        finally:
            for t in (tmp, sidecar(path).with_name(f".{sidecar(path).name}.tmp")):
                if t.exists():
                    t.unlink()

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
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:160]})") from None


def latest_checkpoint(out: str | Path, pattern: str = "step*.ckpt") -> Path | None:
    """The newest ``out/checkpoints/<pattern>`` that verifies. A corrupt or truncated one is renamed
    ``*.corrupt`` (kept for inspection, never picked again) with a warning, and the previous one used."""
    folder = Path(out) / "checkpoints"
    for ckpt in sorted(folder.glob(pattern), reverse=True):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        bad = ckpt.with_name(ckpt.name + ".corrupt")
        if _rank() == 0:
            os.replace(ckpt, bad)
            sidecar(ckpt).unlink(missing_ok=True)
        log(f"warning: {ckpt} is {problem}; moved aside to {bad.name}, using the previous checkpoint")
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


# --------------------------------------------------------------------------- signals


class StopSignals(pl.Callback):
    """SIGTERM / SIGINT set a flag; at the next optimizer-step boundary the flag is all-reduced (a signal
    to any rank stops every rank at the same step), a checkpoint is written through the run's
    :class:`PeriodicCheckpoint`, and :class:`Preempted` is raised (exit status 143 / 130).
    A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int = 0
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log(f"received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint", all_ranks=True)

    def on_train_start(self, trainer, pl_module):
        # installed after Lightning's own SIGTERM handler (which broadcasts from inside the handler)
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)

    def _restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only between optimizer steps
        signum = int(trainer.strategy.reduce(torch.tensor(float(self.received)), reduce_op="max")
                     if trainer.world_size > 1 else self.received)
        if not signum:
            return
        periodic = next(cb for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint))
        path = periodic.save(trainer)
        name = signal.Signals(signum).name
        raise Preempted(signum, f"stopped by {name} at step {trainer.global_step}; checkpoint written to {path}; "
                                f"run the same command again to resume")

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()


# --------------------------------------------------------------------------- non-finite values


class NonFiniteGuard(pl.Callback):
    """Before each optimizer step: if the loss or any gradient is non-finite on ANY rank, every rank drops
    its gradients, so the optimizer skips the update (the step still counts, so step numbers, the
    learning-rate schedule and the data order stay those of an undisturbed run). Counted in
    ``pl_module.nonfinite_skipped``; ``max_in_a_row`` in a row stop the run."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.bad_loss = False

    def on_before_backward(self, trainer, pl_module, loss):
        self.bad_loss |= not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        bad = torch.tensor(float(self.bad_loss or not bool(finite)))
        self.bad_loss = False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.to(trainer.strategy.root_device), reduce_op="sum")
        if float(bad) == 0:
            self.in_a_row = 0
            return
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        self.in_a_row += 1
        pl_module.nonfinite_skipped = getattr(pl_module, "nonfinite_skipped", 0) + 1
        step = trainer.global_step + 1
        where = " on at least one rank" if trainer.world_size > 1 else ""
        log(f"step {step}: non-finite loss or gradients{where}; update skipped on every rank "
            f"({self.in_a_row} in a row, {pl_module.nonfinite_skipped} in all)")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingAborted(
                f"step {step}: {self.in_a_row} steps in a row had non-finite loss or gradients "
                f"(limit train.max_nonfinite={self.max_in_a_row}); {last_good_checkpoint_hint(trainer)}. "
                "Lower train.lr, raise train.warmup_steps or check the data, then rerun to resume from it"
            )


# --------------------------------------------------------------------------- out of memory


OOM_ERRORS = (torch.OutOfMemoryError,)


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def forward_with_oom_retry(forward: Callable, batch, split: Callable, combine: Callable, advice: str,
                           on_retry: Callable[[], None] | None = None):
    """``forward(batch)``; on out-of-memory: free, then ``combine([forward(part) for part in split(batch)])``
    with each part under activation checkpointing (its activations are recomputed during backward,
    one part at a time, so the peak memory is about half). ``forward`` must draw any randomness it
    needs from its arguments, not from a shared generator, since it is run again in backward. A
    second out-of-memory raises :class:`TrainingAborted` with ``advice``."""
    try:
        return forward(batch)
    except OOM_ERRORS:
        pass
    free_memory()
    if on_retry is not None:
        on_retry()
    try:
        parts = [torch.utils.checkpoint.checkpoint(forward, part, use_reentrant=False) for part in split(batch)]
        return combine(parts)
    except OOM_ERRORS:
        free_memory()
        raise TrainingAborted(f"out of memory again on a batch split in two; {advice}") from None


# --------------------------------------------------------------------------- hung / dead ranks


class RankHeartbeat(pl.Callback):
    """Each rank writes ``DIR/rank<R>`` (step and time) at most every ``every_s`` seconds, so that when
    a collective times out the survivors can name the rank that stopped reporting."""

    def __init__(self, folder: Path, every_s: float = 10.0):
        self.folder, self.every_s, self.last = Path(folder), every_s, 0.0

    def beat(self, step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.folder / f"rank{_rank()}", json.dumps({"step": step, "time": time.time()}))

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            self.beat(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.world_size > 1 and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.beat(trainer.global_step)


_COLLECTIVE_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                       "connection refused", "watchdog")


def is_collective_failure(e: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    msg = str(e).lower()
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(s in msg for s in _COLLECTIVE_FAILURE))


def explain_collective_failure(e: BaseException, heartbeat_dir: Path, timeout_minutes: float) -> TrainingAborted:
    """A one-line account of a failed collective naming the rank(s) that fell behind (from heartbeats)."""
    beats = {}
    for f in Path(heartbeat_dir).glob("rank*"):
        try:
            beats[int(f.name[4:])] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
    me = _rank()
    detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if beats:
        newest = max(b["step"] for b in beats.values())
        behind = sorted(r for r, b in beats.items() if b["step"] < newest)
        stale = min(beats, key=lambda r: beats[r]["time"])
        suspect = behind or [stale]
        when = ", ".join(f"rank {r} at step {beats[r]['step']} "
                         f"({datetime.fromtimestamp(beats[r]['time']).strftime('%H:%M:%S')})" for r in sorted(beats))
        who = f"rank {', '.join(map(str, suspect))} stopped responding (last reports: {when})"
    else:
        who = "another rank stopped responding"
    return TrainingAborted(
        f"rank {me}: a collective operation failed or timed out (train.ddp_timeout_minutes={timeout_minutes:g}): "
        f"{who}; ending the whole job. Rerun the same command to resume from the last checkpoint ({detail})"
    )


# --------------------------------------------------------------------------- fault injection

FAULT_KINDS = ("nan", "oom", "sigterm", "sigkill")


@dataclass(frozen=True)
class Fault:
    """``kind`` fires in the batch that performs optimizer step ``step`` (1-based), on ``rank``."""

    kind: str
    step: int
    rank: int = 0

    def __str__(self) -> str:
        return f"{self.kind}@{self.step}:rank{self.rank}"


def parse_fault(spec: str) -> Fault:
    """``KIND@STEP`` or ``KIND@STEP:rankR`` (also ``:R``) -> :class:`Fault`."""
    s = str(spec).strip()
    try:
        kind, rest = s.split("@", 1)
        step, _, rank = rest.partition(":")
        fault = Fault(kind.strip().lower(), int(step), int(rank.strip().removeprefix("rank") or 0))
    except ValueError:
        raise ConfigError(f"--inject-fault {spec!r}: expected KIND@STEP[:rankR], e.g. nan@20 or nan@20:rank1") from None
    if fault.kind not in FAULT_KINDS:
        raise ConfigError(f"--inject-fault {spec!r}: KIND must be one of {', '.join(FAULT_KINDS)}")
    if fault.step < 1 or fault.rank < 0:
        raise ConfigError(f"--inject-fault {spec!r}: STEP must be >= 1 and the rank >= 0")
    return fault


def parse_faults(specs) -> list[Fault]:
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return [parse_fault(s) for s in specs or []]


class FaultInjector:
    """Fires the configured faults. Each fires once per run directory: a fired fault is recorded in
    ``record`` (before it fires), so rerunning the same command resumes instead of failing again.
    The same fault given twice fires twice (e.g. ``oom@5`` twice: the batch and its retry)."""

    def __init__(self, faults: list[Fault], record: Path, rank: int):
        self.record = Path(record)
        fired = json.loads(self.record.read_text()) if self.record.is_file() else []
        pending = [str(f) for f in faults if f.rank == rank]
        for s in fired:  # remove the already-fired occurrences
            if s in pending:
                pending.remove(s)
        self.pending, self.fired, self.rank = pending, fired, rank

    def take(self, kind: str, step: int) -> bool:
        """True (once per configured occurrence) if a ``kind`` fault is due at ``step``."""
        key = str(Fault(kind, step, self.rank))
        if key not in self.pending:
            return False
        self.pending.remove(key)
        self.fired.append(key)
        _atomic_write_text(self.record, json.dumps(self.fired))
        log(f"injecting fault {key}", all_ranks=True)
        return True

    def maybe_signal(self, step: int) -> None:
        """``sigterm`` / ``sigkill`` faults: signal this process."""
        if self.take("sigkill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.take("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)


class InjectFaultAction(argparse.Action):
    """``--inject-fault KIND@STEP[:rankR]`` (repeatable) -> ``--set train.inject_faults=[...]``."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            parse_fault(value)
        except ConfigError as e:
            parser.error(str(e))
        faults = list(getattr(namespace, self.dest, None) or []) + [value]
        setattr(namespace, self.dest, faults)
        namespace.set = list(getattr(namespace, "set", None) or []) + [f"train.inject_faults={json.dumps(faults)}"]


def add_fault_injection_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inject-fault", action=InjectFaultAction, metavar="KIND@STEP[:rankR]", dest="inject_fault",
                   help="testing: inject a fault (nan, oom, sigterm, sigkill) in the batch of optimizer step STEP, "
                        "on rank R (default 0); repeatable; each fires once per --out")

"""Runs that survive: Lightning pieces for long pre-training and fine-tuning jobs.

- :class:`StopSignals`: SIGTERM/SIGINT (SLURM preemption, Ctrl-C) -> every rank finishes its step, a
  checkpoint is written, and the job exits with status 128 + signal number (143 / 130).
- :class:`NonFiniteGuard`: a non-finite loss or gradient on ANY rank skips the update on EVERY rank
  (the decision is all-reduced, so no rank waits forever); N in a row stop the run.
- :func:`forward_with_oom_retry`: out-of-memory on a batch (in its forward or, through the module's
  ``backward``, its backward pass) -> free, retry it split in two; a second out-of-memory stops the
  run with advice.
- :class:`RankHeartbeat` + :func:`explain_collective_failure`: a collective that times out (a hung or
  dead rank) ends the job with a message naming the rank that stopped reporting.
- Fault injection (:func:`parse_faults`, :class:`FaultInjector`): ``KIND@STEP[:rankR]`` with KIND one
  of ``nan``, ``oom``, ``oom_backward``, ``sigterm``, ``sigkill``, ``hang`` (the rank stops responding
  inside the step, as a hung rank does); each fault fires once per run directory.

Checkpoint files (atomic, checksummed) are :mod:`svqmae.engine.checkpoint`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.utils.checkpoint

from ..config import ConfigError
from ..model.io import atomic_write_bytes
from .checkpoint import PeriodicCheckpoint, TrainingAborted, last_good_checkpoint_hint
from .progress import log, rank


class Preempted(SystemExit):
    """SIGTERM / SIGINT: a checkpoint was written; exit status 128 + signal number (143, 130)."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


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
    """Before each optimizer step: if the loss or any gradient is non-finite on ANY rank, every rank skips
    the update (the step still counts, so step numbers, the learning-rate schedule and the data order
    stay those of an undisturbed run). Counted in ``pl_module.nonfinite_skipped``; ``max_in_a_row`` in a
    row stop the run. ``pl_module.update_skipped`` says whether this step's update is skipped.

    Two ways: with a fused optimizer on CUDA, the decision stays on the device (the fused kernel skips
    the update itself, given ``optimizer.found_inf``), so the step never waits for the host; the counts
    are read, and the stop decided, every ``check_every`` steps and at the end. Otherwise (a CPU, where
    reading a value costs nothing, or another optimizer) the decision is read on the host at once and
    the optimizer is given no gradients (each step reports at once)."""

    SKIP_ON_DEVICE: bool | None = None  # None: with a fused optimizer on CUDA (tests set True to run that way on a CPU)

    def __init__(self, max_in_a_row: int, check_every: int = 10):
        self.max_in_a_row, self.check_every = max_in_a_row, max(1, check_every)
        self.in_a_row = 0
        self.bad_loss = False
        self.counts = None  # device mode: (skipped in all, in a row now, longest run since the last check, last bad step)
        self.reported = 0

    @classmethod
    def on_device(cls, optimizer) -> bool:
        """Whether the skip is decided on the device (a fused optimizer, on CUDA unless ``SKIP_ON_DEVICE``)."""
        fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
        if cls.SKIP_ON_DEVICE is not None:
            return fused and cls.SKIP_ON_DEVICE
        return fused and any(p.is_cuda for group in optimizer.param_groups for p in group["params"][:1])

    def on_before_backward(self, trainer, pl_module, loss):
        finite = torch.isfinite(loss.detach()).all()
        if self.on_device(trainer.optimizers[0]):
            self.bad_loss = ~finite | self.bad_loss
        else:
            self.bad_loss |= not bool(finite)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.on_device(optimizer):
            self._flag_on_device(trainer, pl_module, optimizer, grads)
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        bad = torch.tensor(float(self.bad_loss or not bool(finite)))
        self.bad_loss = False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.to(trainer.strategy.root_device), reduce_op="sum")
        pl_module.update_skipped = float(bad) != 0
        if not pl_module.update_skipped:
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

    def _flag_on_device(self, trainer, pl_module, optimizer, grads) -> None:
        device = grads[0].device if grads else pl_module.device
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros((), device=device)
        bad = (~torch.isfinite(norm) | self.bad_loss).float().reshape(())  # 0-dim, as a GradScaler's found_inf
        self.bad_loss = False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum").clamp(max=1)
        optimizer.found_inf = bad  # read by the fused kernel: skip the update, keep the step count
        optimizer.grad_scale = None
        pl_module.update_skipped = bad > 0
        if self.counts is None:
            self.counts = torch.zeros(4, device=device)
        total, run, longest, last = self.counts.unbind()
        run = (run + 1) * bad
        self.counts = torch.stack([total + bad, run, torch.maximum(longest, run),
                                   torch.maximum(last, bad * (trainer.global_step + 1))])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.counts is not None and not (batch_idx + 1) % trainer.accumulate_grad_batches \
                and trainer.global_step % self.check_every == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.counts is not None:
            self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        """Device mode: read the counts (one host sync), report new skips, stop after too many in a row."""
        total, run, longest, last = (int(v) for v in self.counts.tolist())
        self.counts[2] = run  # the longest run since this check starts from the current one
        pl_module.nonfinite_skipped = total
        if total > self.reported:
            where = " on at least one rank" if trainer.world_size > 1 else ""
            log(f"steps up to {trainer.global_step}: {total - self.reported} update(s) skipped on every rank for "
                f"non-finite loss or gradients{where} (the last at step {last}; {total} in all)")
            self.reported = total
        if longest >= self.max_in_a_row:
            raise TrainingAborted(
                f"by step {trainer.global_step}: {longest} steps in a row had non-finite loss or gradients "
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
                           on_retry: Callable[[], None] | None = None, split_first: bool = False):
    """``forward(batch)``; on out-of-memory: free, then ``combine([forward(part) for part in split(batch)])``
    with each part under activation checkpointing (its activations are recomputed during backward,
    one part at a time, so the peak memory is about half). ``forward`` must draw any randomness it
    needs from its arguments, not from a shared generator, since it is run again in backward, and
    must change no state (it may run up to three times for one batch). A second out-of-memory raises
    :class:`TrainingAborted` with ``advice``. ``split_first``: go straight to the split (the whole batch
    already ran out of memory, e.g. in its backward pass)."""
    if not split_first:
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
        atomic_write_bytes(self.folder / f"rank{rank()}", json.dumps({"step": step, "time": time.time()}).encode())

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
    me = rank()
    detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    # the rank saying this waited in the collective: the suspects are the others that never reported, are
    # a step behind, or else reported last the longest ago
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", 1))
    others = {r: b for r, b in beats.items() if r != me}
    silent = sorted(set(range(world)) - set(beats) - {me})
    if silent or others:
        newest = max((b["step"] for b in beats.values()), default=0)
        behind = sorted(r for r, b in others.items() if b["step"] < newest)
        suspect = silent or behind or [min(others, key=lambda r: others[r]["time"])]
        when = ", ".join(f"rank {r} at step {beats[r]['step']} "
                         f"({datetime.fromtimestamp(beats[r]['time']).strftime('%H:%M:%S')})"
                         for r in sorted(beats)) or "none"
        who = f"rank {', '.join(map(str, suspect))} stopped responding (last reports: {when})"
    else:
        who = "another rank stopped responding"
    return TrainingAborted(
        f"rank {me}: a collective operation failed or timed out (train.ddp_timeout_minutes={timeout_minutes:g}): "
        f"{who}; ending the whole job. Rerun the same command to resume from the last checkpoint ({detail})"
    )


# --------------------------------------------------------------------------- fault injection

FAULT_KINDS = ("nan", "oom", "oom_backward", "sigterm", "sigkill", "hang")
HANG_SECONDS = 24 * 3600  # an injected hang: longer than any collective timeout; the launcher ends the process


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
        atomic_write_bytes(self.record, json.dumps(self.fired).encode())
        log(f"injecting fault {key}", all_ranks=True)
        return True

    def maybe_signal(self, step: int) -> None:
        """``sigterm`` / ``sigkill`` faults: signal this process; ``hang``: stop responding (sleep) here,
        before the step's collectives, so that the other ranks' collectives time out."""
        if self.take("sigkill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.take("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.take("hang", step):
            time.sleep(HANG_SECONDS)

"""Fault injection: non-finite losses (also on one rank of a 2-process gloo DDP run), out-of-memory,
truncated checkpoints, a full disk, a checkpoint from another model configuration, pickled code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import svqmae
from svqmae import config as C
from svqmae.cli import build_parser
from svqmae.engine.checkpoint import (
    TrainingAborted,
)
from svqmae.engine.faults import Fault, parse_fault
from svqmae.tasks.pretrain import pretrain
from tests.tasks.test_pretrain import cli_args, tiny_cfg, write_audio


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("res") / "audio")


def test_fault_specs_parse_and_reach_the_config():
    assert parse_fault("nan@20") == Fault("nan", 20, 0)
    assert parse_fault("oom@3:rank1") == parse_fault("oom@3:1") == Fault("oom", 3, 1)
    for bad in ("nan", "boom@3", "nan@0", "nan@x", "sigterm@3:rankx"):
        with pytest.raises(C.ConfigError, match="--inject-fault"):
            parse_fault(bad)
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--set", "train.lr=1e-3",
                                      "--inject-fault", "nan@5:rank1", "--inject-fault", "sigkill@9"])
    assert C.resolve("tiny", overrides=args.set).train.inject_faults == ["nan@5:rank1", "sigkill@9"]


def _states(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): torch.load(p, weights_only=True)["state_dict"]
            for p in (out / "checkpoints").glob("step*.ckpt")}


def test_nan_steps_are_skipped_then_too_many_in_a_row_stop_the_run(tmp_path, data, capfd):
    out = tmp_path / "nan"
    cfg = tiny_cfg("train.ckpt_every_steps=1", "train.keep_last=20", "train.max_nonfinite=2",
                   "train.inject_faults=[nan@3, nan@6, nan@7]")
    with pytest.raises(TrainingAborted, match=r"step 7: 2 steps in a row had non-finite.*step00000006.ckpt") as e:
        pretrain([str(data)], out, cfg)
    assert "train.max_nonfinite=2" in str(e.value)
    err = capfd.readouterr().err
    assert "step 3: non-finite loss or gradients" in err and "update skipped" in err
    s = _states(out)
    assert sorted(s) == [1, 2, 3, 4, 5, 6]
    same = [all(torch.equal(s[k - 1][n], s[k][n]) for n in s[k]) for k in range(2, 7)]
    assert same == [False, True, False, False, True]  # steps 3 and 6 changed nothing
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert recs[2]["nonfinite_skipped"] == 0 and recs[3]["nonfinite_skipped"] == 1 and recs[6]["nonfinite_skipped"] == 2
    assert recs[3]["loss"] is None and recs[4]["loss"] > 0  # the skipped step stays out of the loss curve


def test_with_fused_adamw_nan_steps_are_skipped_on_the_device_then_too_many_in_a_row_stop_the_run(tmp_path, data, capfd,
                                                                                               monkeypatch):
    # fused AdamW on CUDA (here forced on the CPU): the skip is decided on the device (no host sync per step),
    # the counts are read every train.log_every steps (here every step)
    from svqmae.engine.faults import NonFiniteGuard

    monkeypatch.setattr(NonFiniteGuard, "SKIP_ON_DEVICE", True)
    out = tmp_path / "nan_fused"
    cfg = tiny_cfg("train.ckpt_every_steps=1", "train.keep_last=20", "train.max_nonfinite=2", "train.fused_adamw=on",
                   "train.inject_faults=[nan@3, nan@6, nan@7]")
    with pytest.raises(TrainingAborted, match=r"by step 7: 2 steps in a row had non-finite.*train.max_nonfinite=2"):
        pretrain([str(data)], out, cfg)
    assert "update(s) skipped on every rank for non-finite loss or gradients" in capfd.readouterr().err
    s = _states(out)
    assert sorted(s) == [1, 2, 3, 4, 5, 6]  # the run stopped at step 7, before its checkpoint
    same = [all(torch.equal(s[k - 1][n], s[k][n]) for n in s[k]) for k in range(2, 7)]
    assert same == [False, True, False, False, True]  # steps 3 and 6 changed nothing
    opt = torch.load(out / "checkpoints" / "step00000006.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert {int(v["step"]) for v in opt.values()} == {4}  # 6 steps, 2 skipped (the fused kernel kept the count)
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert recs[2]["nonfinite_skipped"] == 0 and recs[3]["nonfinite_skipped"] == 1 and recs[6]["nonfinite_skipped"] == 2
    assert recs[3]["loss"] is None and recs[4]["loss"] > 0


def test_oom_retries_the_batch_split_in_two_then_repeated_oom_stops_with_advice(tmp_path, data, capfd):
    out = tmp_path / "oom"
    cfg = tiny_cfg("train.ckpt_every_steps=2", "train.inject_faults=[oom@2, oom@4, oom@4]")
    with pytest.raises(TrainingAborted, match="out of memory again.*lower train.max_batch_seconds"):
        pretrain([str(data)], out, cfg)
    err = capfd.readouterr().err
    assert "step 2: out of memory on a batch of 2 utterances" in err and "retrying it split in two" in err
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert recs[1]["oom_retries"] == 0 and recs[2]["oom_retries"] == 1 and recs[3]["loss"] > 0
    assert max(_states(out)) == 2  # the step-2 checkpoint is the last good one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nan_on_one_rank_of_two_skips_the_step_on_both_without_deadlock(tmp_path, data):
    out = tmp_path / "ddp"
    args = cli_args(data, out, "--max-steps", "4", "--devices", "2", "--set", "train.strategy=ddp",
                    "--set", "train.ddp_timeout_minutes=1", "--set", "train.ckpt_every_steps=0",
                    "--set", "train.val_every=100", "--inject-fault", "nan@2:rank1")
    env = dict(os.environ, PYTHONPATH=str(Path(svqmae.__file__).parents[1]), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "svqmae.cli", *args], stderr=subprocess.PIPE, text=True,
                              env=dict(env, LOCAL_RANK=str(r), RANK=str(r))) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-1500:] + errs[1][-1500:]
    assert "injecting fault nan@2:rank1" in errs[1]
    assert "step 2: non-finite loss or gradients on at least one rank; update skipped on every rank" in errs[0]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in recs if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4] and train[1]["nonfinite_skipped"] == 0 and train[4]["nonfinite_skipped"] == 1
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("me,beats,suspect", [
    (0, {0: (2, 100.0), 1: (2, 50.0)}, "rank 1 stopped"),  # same step: the other one, reported longest ago
    (0, {0: (2, 50.0), 1: (2, 100.0)}, "rank 1 stopped"),  # never the rank that waited in the collective
    (1, {0: (3, 90.0), 1: (3, 100.0), 2: (2, 95.0)}, "rank 2 stopped"),  # a step behind
    (0, {0: (2, 100.0), 1: (2, 100.0)}, "rank 2 stopped"),  # rank 2 of 3 never reported
])
def test_a_failed_collective_names_the_rank_that_stopped_not_the_one_that_waited(tmp_path, monkeypatch, me, beats,
                                                                                  suspect):
    from svqmae.engine.faults import explain_collective_failure

    for r, (step, t) in beats.items():
        (tmp_path / f"rank{r}").write_text(json.dumps({"step": step, "time": t}))
    monkeypatch.setenv("RANK", str(me))
    monkeypatch.setenv("WORLD_SIZE", "3" if len(beats) == 3 or suspect == "rank 2 stopped" else "2")
    e = explain_collective_failure(RuntimeError("Timed out waiting 15000ms for recv"), tmp_path, 0.25)
    assert f"rank {me}: a collective operation failed or timed out" in str(e) and suspect in str(e), str(e)


def test_a_hung_rank_ends_the_job_within_the_timeout_naming_it_and_the_last_checkpoint_resumes(tmp_path, data,
                                                                                              capsys):
    from svqmae.cli import main
    from svqmae.engine.checkpoint import latest_checkpoint, verify_checkpoint

    out, timeout_minutes = tmp_path / "hung", 0.25
    args = cli_args(data, out, "--max-steps", "4", "--devices", "2", "--set", "train.strategy=ddp",
                    "--set", f"train.ddp_timeout_minutes={timeout_minutes}", "--set", "train.ckpt_every_steps=1",
                    "--set", "train.keep_last=10", "--set", "train.val_every=100", "--inject-fault", "hang@3:rank1")
    env = dict(os.environ, PYTHONPATH=str(Path(svqmae.__file__).parents[1]), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "svqmae.cli", *args], stderr=subprocess.PIPE, text=True,
                              env=dict(env, LOCAL_RANK=str(r), RANK=str(r))) for r in (0, 1)]
    try:
        err = procs[0].communicate(timeout=300)[1]
        ended = time.time()
    finally:
        for p in procs:  # as a launcher (torchrun, SLURM) ends the others when one rank fails
            p.kill()
    procs[1].communicate()
    last = out / "checkpoints" / "step00000002.ckpt"  # written just before rank 1 stopped in step 3
    assert procs[0].returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if " error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "rank 1 stopped responding" in lines[0] and f"train.ddp_timeout_minutes={timeout_minutes:g}" in lines[0]
    waited = ended - last.stat().st_mtime
    assert timeout_minutes * 60 * 0.8 < waited < timeout_minutes * 60 + 60, waited
    assert latest_checkpoint(out) == last and verify_checkpoint(last) is None
    # rerunning the same command (here on one process) resumes from it and finishes
    assert main(cli_args(data, out, "--max-steps", "4", "--set", "train.ckpt_every_steps=1")) == 0
    assert f"resuming from {last} (step 2)" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file()

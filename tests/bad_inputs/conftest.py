"""The bad-input suite's world: a small corpus, a tiny model and recognizer, built once per session,
and the checks every case makes (exit status, one line with no traceback naming the file or key,
nothing existing changed)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, settings

from svqmae import cli
from svqmae import config as C
from svqmae.data.text import build_units
from svqmae.model.ctc import CTCModel
from svqmae.tasks.recognizer import save_recognizer
from tests.conftest import (
    TINY_MODEL_OVERRIDES,
    harmonic_tone,
    tiny_model,
    write_labelled_set,
    write_spelled_set,
    write_wav,
)

# budgets that make every command that trains finish in seconds on a tiny model
TINY_RUN = ["--preset", "tiny", "--max-steps", "2", *[a for o in TINY_MODEL_OVERRIDES for a in ("--set", o)],
            "--set", "train.num_workers=0", "--set", "train.val_items=2", "--set", "train.max_batch_seconds=8",
            "--set", "train.max_utt_seconds=4", "--set", "train.log_every=1"]


# generated cases are the same on every run (seeded by the test's name) and nothing is stored in the repo
FUZZ = settings(database=None, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_cli(capsys, *argv) -> Result:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    got = capsys.readouterr()
    return Result(code, got.out, got.err)


def assert_refused(res: Result, *names: str, code: int = 2, max_lines: int = 3) -> None:
    """Exit ``code``; the error is the last line of stderr, one line, no traceback, naming each of ``names``;
    a refusal up front prints at most ``max_lines`` lines in all."""
    assert res.code == code, (res.code, res.err[-2000:])
    assert "Traceback" not in res.err, res.err[-2000:]
    assert " error: " in res.error and [ln for ln in res.err.splitlines() if " error: " in ln] == [res.error]
    for name in names:
        assert str(name) in res.error, (name, res.error)
    assert len([ln for ln in res.err.splitlines() if ln.strip()]) <= max_lines, res.err


def snapshot(*roots: Path) -> dict[str, str | None]:
    """Every file under ``roots`` with its SHA-256 (folders as 'dir', a missing root as None)."""
    out: dict[str, str | None] = {}
    for root in map(Path, roots):
        if not root.exists():
            out[str(root)] = None
        elif root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        else:
            out[str(root)] = "dir"
            for p in sorted(root.rglob("*")):
                out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def corrupt_copies(src: Path, dest: Path) -> dict[str, Path]:
    """Broken copies of the good model folder ``src`` (one per way a model folder breaks)."""
    out = {}

    def copy(name: str) -> Path:
        d = dest / name
        shutil.copytree(src, d)
        return d

    d = copy("no_weights")
    (d / "model.safetensors").unlink()
    out["no_weights"] = d
    d = copy("truncated_weights")
    w = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(w[: len(w) // 2])
    out["truncated_weights"] = d
    d = copy("garbage_config")
    (d / "config.json").write_text("{not json", encoding="utf-8")
    out["garbage_config"] = d
    d = copy("foreign_config")
    (d / "config.json").write_text('{"format": "someone-else", "model_type": "bert"}', encoding="utf-8")
    out["foreign_config"] = d
    d = copy("bad_value_config")
    text = (d / "config.json").read_text(encoding="utf-8")
    (d / "config.json").write_text(text.replace('"ratio": 0.7', '"ratio": 1.5'), encoding="utf-8")
    out["bad_value_config"] = d
    d = copy("empty_weights")
    (d / "model.safetensors").write_bytes(b"")
    out["empty_weights"] = d
    d = dest / "empty_folder"
    d.mkdir()
    out["empty_folder"] = d
    out["missing"] = dest / "no_such_model"
    f = dest / "notes.txt"
    f.write_text("not a model\n")
    out["text_file"] = f
    # a pre-training checkpoint cut in half, and one of another kind of run
    model, cfg = tiny_model(seed=3)
    ck = dest / "step.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "svqmae_config": C.to_dict(cfg), "global_step": 2}, ck)
    b = ck.read_bytes()
    (dest / "truncated.ckpt").write_bytes(b[: len(b) // 2])
    out["truncated_ckpt"] = dest / "truncated.ckpt"
    torch.save({"state_dict": {}, "global_step": 2}, dest / "foreign.ckpt")
    out["foreign_ckpt"] = dest / "foreign.ckpt"
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Good inputs for every command: 12 files of audio, labelled and transcribed manifests, a tiny model
    folder, a tiny recognizer, and broken model folders and checkpoints."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    audio = root / "audio"
    for i in range(12):
        write_wav(audio / f"utt{i:02d}.wav", harmonic_tone(1.0 + 0.25 * (i % 4), f0=100 + 15 * i, seed=i))
    labelled = write_labelled_set(root / "labelled", {"lo": 180.0, "hi": 520.0}, ["s1", "s2", "s3"], per_class=2)
    spelled = write_spelled_set(root / "spelled", n=6)
    model, cfg = tiny_model(seed=1)
    from svqmae.model import save_model

    model_dir = save_model(model, cfg, root / "model")
    ft = C.resolve_finetune("tiny", cfg, overrides=["specaug.freq_mask_width=8"])
    units = build_units("char", ["abcd"])
    torch.manual_seed(0)
    encoder = tiny_model(seed=1)[0].drop_decoder()
    rec_dir = save_recognizer(CTCModel(ft, len(units), "svqmae", encoder), units, ft, root / "recognizer" / "model", {})
    broken = corrupt_copies(model_dir, root / "broken")
    return SimpleNamespace(root=root, audio=audio, labelled=labelled, spelled=spelled, model=model_dir,
                           recognizer=rec_dir.parent, broken=broken)

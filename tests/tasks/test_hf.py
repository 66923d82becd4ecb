"""svqmae as a Hugging Face transformers model (svqmae.tasks.hf): export-hf, Auto classes, pipeline,
remote code without svqmae, Trainer, errors. Tiny models and generated audio only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import svqmae  # noqa: E402  (registers the svqmae classes with transformers' Auto classes)
from svqmae import config as C  # noqa: E402
from svqmae.cli import main  # noqa: E402
from svqmae.config import resolve_finetune  # noqa: E402
from svqmae.data.audio import read_audio  # noqa: E402
from svqmae.data.text import build_units, normalize  # noqa: E402
from svqmae.model import SVQMAE, save_model  # noqa: E402
from svqmae.model.ctc import CTCModel  # noqa: E402
from svqmae.tasks.hf import SVQMAEFeatureExtractor, SVQMAEForCTC, SVQMAEModel, remote_code  # noqa: E402
from svqmae.tasks.hf.export import ctc_vocab  # noqa: E402
from svqmae.tasks.hf.fbank import KaldiLogFilterBank  # noqa: E402
from svqmae.tasks.recognizer import save_recognizer  # noqa: E402
from tests.conftest import TINY_MODEL_OVERRIDES, harmonic_tone, write_spelled_set, write_wav  # noqa: E402

# odd multiples of 0.1 s: each utterance's last token stays clear of its end, so an utterance gets the
# same features alone or padded inside a batch (see tests/test_interop.py)
SECONDS = (0.9, 1.3, 0.7, 1.1)
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _waves(seconds=SECONDS, seed=0) -> list[np.ndarray]:
    return [harmonic_tone(s, f0=110 + 35 * i, seed=seed + i) for i, s in enumerate(seconds)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def pretrained(root):
    """A tiny pre-trained svqmae model folder (random weights), and its export with and without code."""
    cfg = C.resolve("tiny", overrides=TINY_MODEL_OVERRIDES)
    torch.manual_seed(0)
    src = save_model(SVQMAE(cfg.model), cfg, root / "pre" / "model", card={"steps": 3})
    assert main(["export-hf", "--model", str(src.parent), "--out", str(root / "enc")]) == 0
    assert main(["export-hf", "--model", str(src), "--out", str(root / "enc_code"), "--with-code"]) == 0
    return {"src": src, "hf": root / "enc", "code": root / "enc_code"}


@pytest.fixture(scope="module")
def recognizer(root, pretrained):
    """A tiny fine-tuned recognizer whose CTC head is made to spell: its weights scaled up (the frame-wise
    argmax varies) and <unk> never chosen; the audio files to transcribe; its export, plain and with code."""
    units = build_units("char", ["abc d", "dab cab"])
    cfg = resolve_finetune(None, C.resolve("tiny", overrides=TINY_MODEL_OVERRIDES))
    torch.manual_seed(1)
    model = CTCModel(cfg, len(units), encoder=svqmae.load(pretrained["src"])).eval()
    with torch.no_grad():
        model.ctc_head.weight.mul_(40.0)
        model.ctc_head.bias[1] = -1e3  # <unk>: shown as ⁇ by transformers, dropped by svqmae
    src = save_recognizer(model, units, cfg, root / "asr" / "model", {"note": "forced head"})
    audio = root / "asr_audio"
    for i, x in enumerate(_waves(seed=10)):
        write_wav(audio / f"utt{i}.wav", x)
    assert main(["export-hf", "--model", str(root / "asr"), "--out", str(root / "asr_hf")]) == 0
    assert main(["export-hf", "--model", str(src), "--out", str(root / "asr_code"), "--with-code"]) == 0
    return {"src": src, "audio": audio, "hf": root / "asr_hf", "code": root / "asr_code", "units": units}


def _extract(src, waves: list[np.ndarray]):
    """svqmae's own hidden states for a zero-padded batch: (list of (B, T, D), token lengths, batch, lengths)."""
    xs = [torch.from_numpy(x) for x in waves]
    lengths = torch.tensor([len(x) for x in xs])
    batch = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    with torch.no_grad():
        hidden, tok_len = svqmae.load(src).extract(batch, lengths)
    return hidden, tok_len, batch, lengths


def _max_diff(got, ref, tok_len) -> float:
    """Largest difference over the valid tokens of each utterance, over all hidden states."""
    return max(float((a[b, :n] - r[b, :n]).abs().max()) for a, r in zip(got, ref) for b, n in enumerate(tok_len.tolist()))


def test_automodel_hidden_states_equal_svqmae_extract_on_a_padded_batch(pretrained):
    from transformers import AutoFeatureExtractor, AutoModel

    waves = _waves()
    ref, tok_len, _, _ = _extract(pretrained["src"], waves)
    fe = AutoFeatureExtractor.from_pretrained(pretrained["hf"])
    model = AutoModel.from_pretrained(pretrained["hf"])
    assert isinstance(fe, SVQMAEFeatureExtractor) and isinstance(model, SVQMAEModel) and not model.training
    assert not any(k.startswith(("quantizer.", "decoder.", "head.")) for k in model.state_dict())
    assert not any(p.requires_grad for p in model.frontend.parameters())  # the filterbank's constant tables
    inputs = fe(waves, sampling_rate=16000, return_tensors="pt")
    assert inputs["input_values"].shape == (4, len(waves[1])) and inputs["attention_mask"].sum(-1).tolist() == [
        len(x) for x in waves]
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert model.token_lengths(inputs["attention_mask"]).tolist() == tok_len.tolist()
    assert len(out.hidden_states) == 4 and torch.equal(out.last_hidden_state, out.hidden_states[-1])
    assert out.hidden_states[0].shape == ref[0].shape
    assert _max_diff(out.hidden_states, ref, tok_len) < 1e-5
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.inputs_to_logits_ratio) == ("svqmae", 64, 2, 640)
    with torch.no_grad():  # without output_hidden_states, and as a tuple
        assert model(**inputs).hidden_states is None
        assert torch.equal(model(**inputs, return_dict=False)[0], out.last_hidden_state)


def test_automodel_carries_the_level_embedding_of_model_features_level(root):
    from transformers import AutoFeatureExtractor, AutoModel

    cfg = C.resolve("tiny", overrides=[*TINY_MODEL_OVERRIDES, "model.features.level=true"])
    torch.manual_seed(2)
    src = save_model(SVQMAE(cfg.model), cfg, root / "level" / "model", card={"steps": 3})
    assert main(["export-hf", "--model", str(src), "--out", str(root / "level_hf")]) == 0
    waves = _waves()
    ref, tok_len, _, _ = _extract(src, waves)
    model = AutoModel.from_pretrained(root / "level_hf")
    assert any(k.startswith("level_embed.") for k in model.state_dict())
    inputs = AutoFeatureExtractor.from_pretrained(root / "level_hf")(waves, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert _max_diff(out.hidden_states, ref, tok_len) < 1e-5


def test_feature_extractor_pads_and_refuses_other_sample_rates():
    fe = SVQMAEFeatureExtractor()
    one = fe(np.zeros(800, np.float32), sampling_rate=16000, return_tensors="np")
    assert one["input_values"].shape == (1, 800) and one["attention_mask"].tolist() == [[1] * 800]
    two = fe([np.ones(5), np.ones(3)], sampling_rate=16000)
    assert [list(x) for x in two["input_values"]] == [[1] * 5, [1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="8000 Hz but this model takes 16000 Hz; resample it first") as e:
        fe(np.zeros(800), sampling_rate=8000)
    assert "torchaudio.functional.resample(x, 8000, 16000)" in str(e.value)
    with pytest.raises(ValueError, match="mono"):
        fe([np.zeros((800, 2))], sampling_rate=16000)


def test_asr_pipeline_transcripts_equal_svqmae_transcribe(recognizer, capsys, monkeypatch):
    from transformers import AutoModelForCTC, AutoProcessor, pipeline

    monkeypatch.setattr("svqmae.tasks.transcribe._device", lambda: torch.device("cpu"))  # no bf16 on a GPU: same numbers
    assert main(["transcribe", "--model", str(recognizer["src"]), str(recognizer["audio"])]) == 0
    ours = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    files = sorted(recognizer["audio"].glob("*.wav"))
    assert len(ours) == len(files)
    asr = pipeline("automatic-speech-recognition", model=str(recognizer["hf"]), device="cpu")
    inputs = [{"raw": read_audio(f), "sampling_rate": 16000} for f in files]
    one_by_one = [asr(dict(x))["text"] for x in inputs]
    batched = [r["text"] for r in asr([dict(x) for x in inputs], batch_size=3)]  # padding: frames past the end blank
    svq = [ours[str(f)] for f in files]
    assert all(len(set(t.replace(" ", ""))) >= 2 and len(t) >= 5 for t in svq), svq  # non-trivial text
    assert any(" " in t.strip() for t in svq)  # the word delimiter is exercised
    assert one_by_one == batched == [t.strip() for t in svq]  # transformers strips outer spaces
    if shutil.which("ffmpeg"):  # transformers reads audio files with ffmpeg
        assert [asr(str(f))["text"] for f in files] == one_by_one
    # the processor and the CTC model by hand: greedy decoding of a padded batch
    processor = AutoProcessor.from_pretrained(recognizer["hf"])
    model = AutoModelForCTC.from_pretrained(recognizer["hf"])
    assert isinstance(model, SVQMAEForCTC) and model.config.vocab_size == len(recognizer["units"])
    batch = processor([x["raw"] for x in inputs], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert processor.batch_decode(logits.argmax(-1)) == one_by_one


def test_ctc_logits_equal_the_svqmae_recognizer_with_two_frames_per_token(tmp_path):
    from svqmae.tasks.hf import export_hf

    units = build_units("char", ["ab ba", "abba"])
    cfg = resolve_finetune("tiny", overrides=TINY_MODEL_OVERRIDES + ["ctc.upsample=2"])
    torch.manual_seed(2)
    rec = CTCModel(cfg, len(units)).eval()
    save_recognizer(rec, units, cfg, tmp_path / "asr", {})
    model = SVQMAEForCTC.from_pretrained(export_hf(tmp_path / "asr", tmp_path / "hf"))
    assert model.config.ctc_upsample == 2 and model.config.inputs_to_logits_ratio == 320
    _, _, batch, lengths = _extract(tmp_path / "asr", _waves(seed=5))
    mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref, frames = rec(batch, lengths)
        logits = model(batch, attention_mask=mask).logits
    assert torch.equal(model.frames(batch, mask), frames) and logits.shape == ref.shape
    got = logits.log_softmax(-1)
    for b, n in enumerate(frames.tolist()):
        torch.testing.assert_close(got[b, :n], ref[b, :n], atol=1e-5, rtol=0)
        assert (logits[b, n:].argmax(-1) == 0).all()  # past the end: blank


def test_tokenizer_vocabulary_follows_svqmae_units_for_spaces_cjk_and_unknowns(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer

    def tokenizer(units, name):
        vocab, settings = ctc_vocab(units.labels)
        (tmp_path / name).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(str(tmp_path / name), **settings)

    mixed = build_units("char", ["你好 Big World", "it's 我们"])  # a space between Latin words only
    assert " " in mixed.labels and "你" in mixed.labels
    tok = tokenizer(mixed, "mixed.json")
    assert len(tok) == len(mixed)  # no token added beyond the model's outputs
    for text in ("你好 big world", "it's 我们", "hello big 你"):
        ref = normalize(text)
        assert tok(ref).input_ids == mixed.encode(ref)  # unseen characters -> <unk> (1) in both
    ids = mixed.encode("it's big你好")
    path = [0, *ids[:2], ids[1], 0, ids[1], *ids[2:], 0]  # a CTC path: blanks, a repeat, a doubled letter
    assert tok.decode(path) == mixed.decode([i for i, prev in zip(path, [None, *path]) if i != prev and i])
    assert tok.decode([0, 1, ids[0], 1]) == "⁇" + mixed.labels[ids[0]] + "⁇"  # svqmae would drop <unk>
    cjk = build_units("char", ["你好", "我们 你们"])  # svqmae's normalisation drops spaces next to CJK
    assert " " not in cjk.labels
    tok = tokenizer(cjk, "cjk.json")
    assert len(tok) == len(cjk)
    assert tok("你好 我们").input_ids == cjk.encode("你好") + [1] + cjk.encode("我们")  # a space is unknown, as in svqmae
    assert tok.decode([0, *cjk.encode("我们你好"), 0]) == "我们你好"


def test_with_code_folder_loads_without_svqmae_and_gives_the_same_outputs(pretrained, recognizer, root):
    code = {p.name for p in pretrained["code"].glob("*.py")}
    assert {"configuration_svqmae.py", "modeling_svqmae.py", "feature_extraction_svqmae.py", "svqmae_model.py"} <= code
    model_src = (pretrained["code"] / "svqmae_model.py").read_text()
    assert model_src.startswith("# Generated by `svqmae export-hf --with-code`") and "lhotse" not in model_src.split(
        '"""', 2)[2].split("class ")[0]
    assert json.loads((pretrained["code"] / "config.json").read_text())["auto_map"]["AutoModel"] == \
        "modeling_svqmae.SVQMAEModel"
    waves = _waves(seed=3)
    ref, tok_len, batch, lengths = _extract(pretrained["src"], waves)
    mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
    np.savez(root / "in.npz", waves=batch.numpy(), mask=mask.numpy())
    with torch.no_grad():
        ref_logits = SVQMAEForCTC.from_pretrained(recognizer["hf"])(batch, mask).logits
    # a Python where `import svqmae` (and lhotse) fails
    stub = root / "stub"
    for name in ("svqmae", "lhotse"):
        (stub / name).mkdir(parents=True, exist_ok=True)
        (stub / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        try:
            import svqmae
            sys.exit("svqmae imported")
        except ImportError:
            pass
        from transformers import AutoModel, AutoModelForCTC
        d = np.load({str(root / 'in.npz')!r})
        x, m = torch.from_numpy(d["waves"]), torch.from_numpy(d["mask"])
        enc = AutoModel.from_pretrained({str(pretrained['code'])!r}, trust_remote_code=True)
        ctc = AutoModelForCTC.from_pretrained({str(recognizer['code'])!r}, trust_remote_code=True)
        with torch.no_grad():
            h = enc(input_values=x, attention_mask=m, output_hidden_states=True).hidden_states
            logits = ctc(input_values=x, attention_mask=m).logits
        np.savez({str(root / 'out.npz')!r}, hidden=torch.stack(h).numpy(), logits=logits.numpy())
        print("loaded:", sorted(n for n in sys.modules if n.startswith(("svqmae", "lhotse"))))
    """)
    env = dict(os.environ, PYTHONPATH=str(stub), HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: []" in r.stdout
    out = np.load(root / "out.npz")
    assert _max_diff(torch.from_numpy(out["hidden"]), ref, tok_len) < 1e-5
    assert np.abs(out["logits"] - ref_logits.numpy()).max() < 1e-4


def test_trainer_fine_tunes_svqmae_for_ctc_and_the_loss_falls(pretrained, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'svqmae[hf]')")
    import soundfile as sf
    from transformers import Trainer, TrainingArguments, Wav2Vec2CTCTokenizer

    manifest = write_spelled_set(tmp_path / "data", n=8, seed=0)
    rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:]]
    units = build_units("char", [r[3] for r in rows])
    vocab, settings = ctc_vocab(units.labels)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), **settings)
    fe = SVQMAEFeatureExtractor()
    data = [{"input_values": sf.read(manifest.parent / r[0], dtype="float32")[0],
             "labels": tokenizer(normalize(r[3])).input_ids} for r in rows]

    def collate(items):
        batch = fe.pad([{"input_values": x["input_values"]} for x in items], padding=True, return_tensors="pt")
        width = max(len(x["labels"]) for x in items)
        batch["labels"] = torch.tensor([x["labels"] + [-100] * (width - len(x["labels"])) for x in items])
        return batch

    torch.manual_seed(0)
    model = SVQMAEForCTC.from_pretrained(pretrained["hf"], vocab_size=len(tokenizer), final_dropout=0.0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=2e-3, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert not any(p.requires_grad for p in model.svqmae.frontend.parameters())  # the filterbank is not trained


def test_broken_folders_are_one_line_errors_naming_the_file(pretrained, recognizer, root, capsys):
    from transformers import AutoModel

    def cli_error(src: Path) -> str:
        assert main(["export-hf", "--model", str(src), "--out", str(root / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("svqmae export-hf: error:"), err
        return err

    def hf_error(load, folder: Path) -> str:
        with pytest.raises(OSError) as e:
            load(str(folder))
        assert len(str(e.value).splitlines()) == 1, str(e.value)
        return str(e.value)

    def broken(src: Path, name: str) -> Path:
        dst = root / "broken" / name
        shutil.copytree(src, dst)
        return dst

    # svqmae folders given to export-hf
    d = broken(pretrained["src"], "svq_no_weights")
    (d / "model.safetensors").unlink()
    assert f"{d / 'model.safetensors'}: missing" in cli_error(d)
    d = broken(pretrained["src"], "svq_other_config")
    (d / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    assert f"{d / 'config.json'}: not an svqmae config" in cli_error(d)
    d = broken(pretrained["src"], "svq_wrong_weights")
    shutil.copy(recognizer["src"] / "model.safetensors", d / "model.safetensors")  # other units: an extra head
    (d / "config.json").write_text((pretrained["src"] / "config.json").read_text().replace('"dim": 64', '"dim": 32'))
    assert f"{d / 'model.safetensors'}: weights do not match" in cli_error(d)
    d = broken(recognizer["src"], "ctc_no_weights")
    (d / "model.safetensors").unlink()
    assert f"{d / 'model.safetensors'}: missing" in cli_error(d)
    assert f"{pretrained['hf'] / 'config.json'}: already a transformers export" in cli_error(pretrained["hf"])
    assert main(["export-hf", "--model", str(pretrained["src"]), "--out", str(pretrained["src"])]) == 2
    assert "--out must not be the model's own folder" in capsys.readouterr().err

    # exported folders given to transformers
    d = broken(pretrained["hf"], "hf_no_weights")
    (d / "model.safetensors").unlink()
    assert f"{d / 'model.safetensors'}: missing" in hf_error(AutoModel.from_pretrained, d)
    d = broken(pretrained["hf"], "hf_other_config")
    (d / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    assert f"{d / 'config.json'}: not an svqmae model config" in hf_error(SVQMAEModel.from_pretrained, d)
    assert "svqmae export-hf" in hf_error(SVQMAEModel.from_pretrained, pretrained["src"])  # svqmae's own layout
    d = broken(pretrained["hf"], "hf_missing_tensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".blocks.1." not in k}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    msg = hf_error(AutoModel.from_pretrained, d)
    assert f"{d / 'model.safetensors'}: weights do not match the svqmae config (missing" in msg
    save_file({k: (v[:3] if k == "embed.0.bias" else v) for k, v in state.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    assert f"{d / 'model.safetensors'}: weights do not match" in hf_error(AutoModel.from_pretrained, d)
    (d / "model.safetensors").write_bytes(b"not safetensors")
    assert f"{d / 'model.safetensors'}: unreadable" in hf_error(AutoModel.from_pretrained, d)


def test_filterbank_of_the_remote_code_equals_lhotse():
    from lhotse.features.kaldi.layers import Wav2LogFilterBank

    ref = Wav2LogFilterBank(sampling_rate=16000, frame_length=0.025, frame_shift=0.01, num_filters=80)
    ours = KaldiLogFilterBank(16000, 0.025, 0.01, 80)
    for k, v in ref.state_dict().items():  # the tables it computes itself: to float32 rounding
        torch.testing.assert_close(ours.state_dict()[k], v, atol=2e-5, rtol=1e-5)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    for samples in (400, 401, 1000, 15999, 16000, 16080):
        x = torch.randn(2, samples, generator=g)
        assert torch.equal(ours(x), ref(x)), samples  # bit for bit with the same tables


def test_remote_code_is_generated_from_the_package_source():
    files = remote_code.generate()
    assert set(remote_code.AUTO_MAP.values()) | set(remote_code.FEATURE_EXTRACTOR_AUTO_MAP.values()) <= {
        f"{name[:-3]}.{cls}" for name, text in files.items() for cls in ("SVQMAEConfig", "SVQMAEModel", "SVQMAEForCTC",
                                                                       "SVQMAEFeatureExtractor") if f"class {cls}(" in text}

    def code(text):
        return [s for s in text.splitlines() if not s.strip().startswith(("from ", "import ", "raise ImportError("))]

    package = Path(svqmae.__file__).parent
    for name, text in files.items():  # each file: its module's source below a two-line header, imports aside
        first, _, rest = text.split("\n", 2)
        source = first.split(" from svqmae/", 1)[1].split(":", 1)[0]
        assert code(rest) == code((package / source).read_text()), name
    assert sum("import KaldiLogFilterBank as Wav2LogFilterBank" in text for text in files.values()) == 1
    for name, text in files.items():
        for line in text.splitlines():
            assert not line.lstrip().startswith(("from svqmae", "import svqmae", "from lhotse", "import lhotse")), (
                name, line)


FAKE_PACKAGE = {  # the import forms of svqmae's model/ subpackage layout, in miniature
    "__init__.py": '"""A stand-in package."""\n',
    "config.py": "import yaml\n\nVALUE = 3\n\n\ndef dump(x):\n    return yaml.safe_dump(x)\n",
    "data.py": "def read(path):\n    return path\n",
    "model/__init__.py": "from .core import Core\nfrom .io import save\n",
    "model/io.py": ("from .. import config as C\n\n\ndef save(x):\n    return C.VALUE + x\n\n\n"
                    "def load_audio(path):\n    from ..data import read\n\n    return read(path)\n"),
    "model/core.py": ("from lhotse.features.kaldi.layers import Wav2LogFilterBank\n\nfrom . import io\n"
                      "from ..config import VALUE\n\n\nclass Core:\n    def __init__(self):\n"
                      "        self.fbank = Wav2LogFilterBank(sampling_rate=16000, frame_length=0.025, "
                      "frame_shift=0.01, num_filters=80)\n\n    def run(self, x):\n        return io.save(x) + VALUE\n"),
    "hf.py": ("from .model import Core, save\nfrom .model.io import load_audio\n\n\ndef go():\n"
              "    return Core().run(1), save(2), type(Core().fbank).__name__\n"),
    "bad.py": "import lhotse\n",
}


def test_remote_code_generator_handles_subpackages_module_imports_and_lazy_imports(tmp_path, monkeypatch):
    import importlib

    for rel, text in FAKE_PACKAGE.items():
        (tmp_path / "src" / "fakesvq" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "fakesvq" / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    files = remote_code.generate({"fakesvq.hf": "modeling_fake"}, roots=("fakesvq", "svqmae"))
    assert set(files) == {"modeling_fake.py", "fakesvq_model.py", "fakesvq_model_core.py", "fakesvq_model_io.py",
                          "fakesvq_config.py", "svqmae_tasks_hf_fbank.py"}  # not data.py: imported lazily only
    assert "from . import fakesvq_config as C" in files["fakesvq_model_io.py"]
    out = tmp_path / "gen" / "fakegen"
    out.mkdir(parents=True)
    (out / "__init__.py").write_text("")
    for name, text in files.items():
        (out / name).write_text(text)
    monkeypatch.syspath_prepend(str(out.parent))
    generated = importlib.import_module("fakegen.modeling_fake")
    assert generated.go() == (7, 5, "KaldiLogFilterBank")
    with pytest.raises(ImportError, match=r"load_audio\(\) needs the svqmae package"):
        generated.load_audio("x.wav")
    with pytest.raises(remote_code.RemoteCodeError, match="fakesvq.bad line 1 imports lhotse"):
        remote_code.generate({"fakesvq.bad": "bad"}, roots=("fakesvq",))


def test_import_svqmae_stays_light_and_registers_when_transformers_auto_classes_are_imported():
    code = textwrap.dedent("""
        import sys
        import svqmae
        assert "transformers" not in sys.modules, "import svqmae imported transformers"
        from transformers import AutoConfig, AutoModelForCTC
        from svqmae.tasks.hf import SVQMAEConfig, SVQMAEForCTC
        assert type(AutoConfig.for_model("svqmae")) is SVQMAEConfig
        assert AutoModelForCTC._model_mapping[SVQMAEConfig] is SVQMAEForCTC
        sys.modules["transformers"] = None  # as if not installed: install() does nothing
        from svqmae.tasks.hf import registration
        registration._done.clear()
        registration.uninstall()
        registration.install()
        assert not registration._hooks()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

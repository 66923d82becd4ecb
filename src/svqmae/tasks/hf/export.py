"""``svqmae export-hf``: an svqmae model as a Hugging Face transformers folder.

``svqmae export-hf --model M --out DIR [--with-code]``

* ``M`` a pre-trained model (``model/`` folder, run DIR or ``.ckpt``): ``DIR`` holds ``config.json``
  (:class:`SVQMAEConfig`), ``model.safetensors`` (:class:`SVQMAEModel`: front end, embedding and encoder;
  the pre-training decoder and quantizer are left out), ``preprocessor_config.json``
  (:class:`SVQMAEFeatureExtractor`) and a model card ``README.md``. ``AutoModel.from_pretrained(DIR)``
  loads it after ``import svqmae``.
* ``M`` a fine-tuned recognizer (``svqmae finetune``'s ``DIR/model`` or run DIR, character units, svqmae
  backbone): :class:`SVQMAEForCTC` weights, plus a ``Wav2Vec2CTCTokenizer`` (``vocab.json``,
  ``tokenizer_config.json``) and a ``Wav2Vec2Processor`` (``processor_config.json``; the feature
  extractor is also in ``preprocessor_config.json``, where transformers 4 looks for it).
  ``AutoModelForCTC.from_pretrained(DIR)``, ``AutoProcessor.from_pretrained(DIR)`` and
  ``pipeline("automatic-speech-recognition", model=DIR)`` load it after ``import svqmae``.
* ``--with-code``: the folder also carries the modeling code, generated from svqmae's source
  (:mod:`.remote_code`), and ``auto_map`` entries pointing at it, so that it loads with
  ``trust_remote_code=True`` where svqmae is not installed (torch and transformers suffice).

The vocabulary (:func:`ctc_vocab`): svqmae's units are index 0 the CTC blank, 1 ``<unk>``, then the
characters of the normalised training transcripts. In ``vocab.json`` the blank is ``<pad>`` (the
tokenizer's pad token, which transformers' CTC decoding drops), ``<unk>`` is ``⁇`` (one character, as
in svqmae's beam search), and the space unit is the word delimiter ``|``. Mandarin transcripts have no
spaces (svqmae's normalisation removes the spaces next to CJK characters), so a vocabulary of CJK
characters may have no space unit; a space in a text to encode then maps to ``⁇`` as it does in svqmae.
Transcripts for training must be normalised the way svqmae normalises them (lower case, no
punctuation: :func:`svqmae.data.text.normalize`); the tokenizer splits characters only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ... import config as C
from ...model import SVQMAE, CheckpointError
from ..outputs import output_folder

BLANK_TOKEN, UNK_TOKEN, DELIMITER = "<pad>", "⁇", "|"
GENERATED = ("configuration_svqmae.py", "modeling_svqmae.py", "feature_extraction_svqmae.py")


def _need_transformers() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise C.ConfigError("export-hf needs transformers: pip install 'svqmae[hf]'")


def ctc_vocab(labels: list[str]) -> tuple[dict[str, int], dict]:
    """svqmae character units (``units.labels``) -> ``vocab.json`` and the Wav2Vec2CTCTokenizer settings."""
    from ...data.text import BLANK, UNK

    if labels[:2] != [BLANK, UNK]:
        raise ValueError(f"units must start with {BLANK}, {UNK}; got {labels[:2]}")
    chars = labels[2:]
    clash = [u for u in chars if u in (BLANK_TOKEN, UNK_TOKEN, DELIMITER) or len(u) != 1]
    if clash:
        raise ValueError(f"units {clash} clash with the tokenizer's special tokens")
    tokens = [BLANK_TOKEN, UNK_TOKEN] + [DELIMITER if u == " " else u for u in chars]
    spaced = " " in chars
    settings = dict(unk_token=UNK_TOKEN, pad_token=BLANK_TOKEN, bos_token=None, eos_token=None,
                    word_delimiter_token=DELIMITER if spaced else UNK_TOKEN,
                    replace_word_delimiter_char=" " if spaced else UNK_TOKEN,
                    do_lower_case=False, clean_up_tokenization_spaces=False)
    return {t: i for i, t in enumerate(tokens)}, settings


def _source_folder(p: Path) -> Path:
    """Check an svqmae model path the way the loaders will, with one-line errors naming the file."""
    if not p.exists():
        raise CheckpointError(f"{p}: model path not found")
    if p.is_file():
        return p
    folder = p if (p / "config.json").is_file() or (p / "ctc.json").is_file() else p / "model"
    if folder.is_dir() and ((folder / "config.json").is_file() or (folder / "ctc.json").is_file()):
        try:
            exported = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "svqmae"
        except (OSError, ValueError, AttributeError):
            exported = False  # the loaders say what is wrong with it
        if exported:
            raise CheckpointError(f"{folder / 'config.json'}: already a transformers export; export-hf takes an "
                                  "svqmae model folder (svqmae pretrain's RUN/model, svqmae finetune's RUN/model)")
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(f"{folder / 'model.safetensors'}: missing (an svqmae model folder holds "
                                  "config.json and model.safetensors)")
        return folder
    return p


def _one_line(e: Exception) -> CheckpointError:
    return CheckpointError(" ".join(str(e).split()))


def export_hf(model: str | Path, out: str | Path, with_code: bool = False) -> Path:
    """Write the transformers folder ``out`` for the svqmae model or recognizer ``model``; returns ``out``."""
    _need_transformers()
    import torch

    from .configuration import SVQMAEConfig
    from .feature_extraction import SVQMAEFeatureExtractor
    from .modeling import SVQMAEForCTC, SVQMAEModel

    src, out = _source_folder(Path(model)), Path(out)
    if out.resolve() in (src.resolve(), Path(model).resolve()):
        raise C.ConfigError(f"{out}: --out must not be the model's own folder")
    output_folder(out, "hf")
    fine_tuned = src.is_dir() and (src / "ctc.json").is_file()
    try:
        if fine_tuned:
            from ..recognizer import load_recognizer

            rec = load_recognizer(src)
            if rec.model.backbone != "svqmae":
                raise C.ConfigError(f"{src / 'ctc.json'}: a {rec.model.backbone} recognizer (the filterbank baseline) "
                                    "has no svqmae encoder to export")
            if rec.cfg.ctc.layer_sum:
                raise C.ConfigError(f"{src / 'ctc.json'}: a recognizer whose head reads a weighted sum of layers "
                                    "(ctc.layer_sum) has no transformers equivalent yet; export-hf supports the "
                                    "default head (the last layer)")
            if rec.units.kind != "char":
                raise C.ConfigError(f"{src / 'units.model'}: sentencepiece units have no Wav2Vec2CTCTokenizer "
                                    "equivalent; export-hf supports character units (svqmae finetune --units char)")
            cfg = C.Config(preset=rec.cfg.preset, model=rec.cfg.model)
            hf_cfg = SVQMAEConfig(svqmae=C.to_dict(cfg), vocab_size=len(rec.units), ctc_upsample=rec.cfg.ctc.upsample,
                                  final_dropout=rec.cfg.ctc.head_dropout)
            state, card = rec.model.state_dict(), {}
            meta_file = src / "config.json"
            if meta_file.is_file():
                card = json.loads(meta_file.read_text(encoding="utf-8")).get("card", {})
        else:
            enc = SVQMAE.from_pretrained(src)
            hf_cfg = SVQMAEConfig(svqmae=C.to_dict(enc.config))
            state, card = enc.state_dict(), getattr(enc, "card", {})
    except CheckpointError as e:
        raise _one_line(e) from None
    except RuntimeError as e:  # load_state_dict: tensors of the wrong shape
        where = src / "model.safetensors" if src.is_dir() else src
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{where}: weights do not match the config ({first[:200]})") from None

    hf = SVQMAEForCTC(hf_cfg) if fine_tuned else SVQMAEModel(hf_cfg)
    prefix = "svqmae." if fine_tuned else ""
    ours = {(k if k.startswith("ctc_head.") else prefix + k): v for k, v in state.items()
            if not k.startswith("quantizer.")}
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict(ours, strict=False)
    if missing or unexpected:
        where = src / "model.safetensors" if src.is_dir() else src
        raise CheckpointError(f"{where}: weights do not fit the transformers model (missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]})")

    if fine_tuned:
        try:
            vocab, tokenizer_settings = ctc_vocab(rec.units.labels)
        except ValueError as e:
            raise C.ConfigError(f"{src / 'units.txt'}: {e}") from None
    if with_code:
        from . import remote_code

        code = remote_code.generate()  # before writing anything: a failure leaves no half-made folder

    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("svqmae_*.py"), *(out / f for f in GENERATED)]:
        if stale.is_file():
            stale.unlink()  # code of an earlier --with-code export
    hf.save_pretrained(out)
    fe = SVQMAEFeatureExtractor(sampling_rate=hf_cfg.sampling_rate)
    fe.save_pretrained(out)  # preprocessor_config.json
    if fine_tuned:
        _save_processor(fe, vocab, tokenizer_settings, out)  # + processor_config.json (transformers 5)
    if with_code:
        for name, text in code.items():
            (out / name).write_text(text, encoding="utf-8")
        _add_auto_map(out / "config.json", remote_code.AUTO_MAP)
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (out / name).is_file():
                _add_auto_map(out / name, remote_code.FEATURE_EXTRACTOR_AUTO_MAP, nested="feature_extractor")
    (out / "README.md").write_text(model_card(hf_cfg, src, card, fine_tuned, with_code), encoding="utf-8")
    return out


def _save_processor(fe, vocab: dict[str, int], settings: dict, out: Path) -> None:
    import tempfile

    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), **settings)
        Wav2Vec2Processor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(out)


def _add_auto_map(path: Path, auto_map: dict, nested: str | None = None) -> None:
    meta = json.loads(path.read_text(encoding="utf-8"))
    target = meta[nested] if nested and isinstance(meta.get(nested), dict) else meta
    target["auto_map"] = dict(auto_map)
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_card(cfg, src: Path, card: dict, fine_tuned: bool, with_code: bool) -> str:
    """The exported folder's README.md: what it is, how to load it, what it needs."""
    m = cfg.svqmae["model"]
    e = m["encoder"]
    rate = cfg.sampling_rate / cfg.inputs_to_logits_ratio
    auto, task = ("AutoModelForCTC", "automatic-speech-recognition") if fine_tuned else ("AutoModel", "feature-extraction")
    tags = ["speech", "audio", "svqmae", "self-supervised"] + (["ctc"] if fine_tuned else [])
    needs = ("torch and transformers only (`trust_remote_code=True`): the folder holds the modeling code, "
             "generated from svqmae's source, and computes the filterbank itself (no lhotse)"
             if with_code else "svqmae (`pip install 'svqmae[hf]'`), imported before loading (`import svqmae` "
             "registers the classes with transformers' Auto classes)")
    load_kw = ", trust_remote_code=True" if with_code else ""
    lines = ["---", "library_name: transformers", f"pipeline_tag: {task}", f"tags: [{', '.join(tags)}]", "---", "",
             f"# SVQ-MAE {'speech recognizer (CTC)' if fine_tuned else 'speech encoder'} ({cfg.svqmae['preset']})", "",
             f"Exported from `{src}` by `svqmae export-hf`{' --with-code' if with_code else ''}.", "",
             f"- encoder: {e['layers']} layers, width {e['dim']}, {e['heads']} heads, FFN {e['ffn_dim']}; "
             f"input 16 kHz waveform, {m['features']['n_mels']}-bin log-mel inside the model, "
             f"{rate:g} {'CTC frames' if fine_tuned else 'tokens'} per second",
             f"- outputs: {cfg.vocab_size} CTC units (blank = `<pad>`, `<unk>` = `⁇`, space = `|`)" if fine_tuned
             else "- outputs: `hidden_states` = " + ("the utterance's level, " if m["features"].get("level_state") else "")
             + "input embedding + one per layer (`output_hidden_states=True`)",
             f"- loading needs: {needs}"]
    lines += [f"- {k}: {v}" for k, v in card.items()]
    lines += ["", "```python"] + ([] if with_code else ["import svqmae  # registers model type 'svqmae'"])
    if fine_tuned:
        lines += ["from transformers import pipeline", f"asr = pipeline('automatic-speech-recognition', model='PATH'{load_kw})",
                  "asr({'raw': waveform_16k, 'sampling_rate': 16000})['text']   # or asr('file.wav') with ffmpeg installed"]
    else:
        lines += [f"from transformers import {auto}, AutoFeatureExtractor",
                  f"fe = AutoFeatureExtractor.from_pretrained('PATH'{load_kw})",
                  f"model = {auto}.from_pretrained('PATH'{load_kw})",
                  "inputs = fe([wave_a, wave_b], sampling_rate=16000, return_tensors='pt')",
                  "hidden_states = model(**inputs, output_hidden_states=True).hidden_states"]
    lines += ["```", ""]
    return "\n".join(lines)


def cmd_export_hf(args) -> None:
    out = export_hf(args.model, args.out, with_code=args.with_code)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"export-hf: wrote {out} ({', '.join(files)})")


def add_cli(sub) -> None:
    p = sub.add_parser("export-hf", help="write a model or fine-tuned recognizer as a Hugging Face transformers folder")
    p.add_argument("--model", required=True, metavar="M",
                   help="pre-trained model (model/ folder, run DIR or .ckpt) or fine-tuned recognizer (DIR or DIR/model)")
    p.add_argument("--out", required=True, metavar="DIR", help="the transformers folder to write")
    p.add_argument("--with-code", action="store_true",
                   help="include modeling code (generated from svqmae's source) so that the folder loads with "
                        "trust_remote_code=True without svqmae")
    p.set_defaults(func=cmd_export_hf)

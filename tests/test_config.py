import pytest

from svqmae import config as C


def test_defaults_presets_yaml_and_cli_resolve_in_order(tmp_path):
    base = C.resolve()
    assert base.preset == "base"
    assert (base.model.encoder.layers, base.model.encoder.dim, base.model.encoder.heads,
            base.model.encoder.ffn_dim) == (12, 768, 12, 3072)
    tiny = C.resolve("tiny")
    assert tiny.model.encoder.dim == 256 and tiny.train.max_steps == 2000
    y = tmp_path / "o.yaml"
    y.write_text("preset: small\nmodel:\n  encoder:\n    layers: 3\ntrain:\n  lr: 0.01\n")
    cfg = C.resolve(None, [y], ["train.lr=0.5", "model.mask.ratio=0.6", "train.betas=0.9,0.95"])
    assert cfg.preset == "small" and cfg.model.encoder.dim == 512  # preset named in the YAML
    assert cfg.model.encoder.layers == 3  # YAML over preset
    assert cfg.train.lr == 0.5  # command line over YAML
    assert cfg.model.mask.ratio == 0.6 and cfg.train.betas == (0.9, 0.95)
    assert C.resolve("tiny", [y]).preset == "tiny"  # --preset beats the YAML's preset


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = C.resolve("tiny", overrides=["model.variant=encoder_only", "model.quantizer.kind=learned"])
    assert C.from_dict(C.to_dict(cfg)) == cfg
    C.save_yaml(cfg, tmp_path / "c.yaml")
    again = C.resolve(None, [tmp_path / "c.yaml"])
    assert again == cfg


def test_saved_configs_with_retired_keys_still_load(tmp_path):
    d = C.to_dict(C.resolve("tiny"))
    d["train"]["compile"] = False  # written by an earlier version
    assert C.from_dict(d) == C.resolve("tiny")
    d["train"]["nonsense"] = 1
    with pytest.raises(C.ConfigError, match="nonsense"):
        C.from_dict(d)
    (tmp_path / "user.yaml").write_text("train:\n  compile: true\n")
    with pytest.raises(C.ConfigError, match="compile"):  # but a user's YAML may not use them
        C.resolve("tiny", [tmp_path / "user.yaml"])
    del d["train"]["nonsense"], d["model"]["decoder_conv"]  # saved before the decoder had a convolution
    assert C.from_dict(d).model.decoder_conv == 0
    assert C.resolve("tiny").model.decoder_conv == 15


@pytest.mark.parametrize("override,needle", [
    ("model.encoder.layerz=3", "unknown config key 'model.encoder.layerz'"),
    ("model.mask.ratio=1.5", "model.mask.ratio"),
    ("model.encoder.dim=90", "divisible by heads"),
    ("model.encoder.dim=100", "head size must be even"),
    ("train.lr=fast", "expects float"),
    ("model.variant=bert", "model.variant"),
    ("model.decoder_conv=8", "odd kernel size"),
    ("nokey", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        C.resolve("tiny", overrides=[override])


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(C.ConfigError, match="bad.yaml"):
        C.resolve(None, [bad])
    with pytest.raises(C.ConfigError, match="missing.yaml: config file not found"):
        C.resolve(None, [tmp_path / "missing.yaml"])
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.resolve("huge")


def test_diff_lists_differing_model_fields():
    a, b = C.resolve("tiny"), C.resolve("tiny", overrides=["model.encoder.layers=2"])
    assert C.diff(a, b) == ["model.encoder.layers: 4 != 2"]
    assert C.diff(a, C.resolve("tiny", overrides=["train.lr=1"])) == []


def test_speed_switches_and_auto_numbers():
    cfg = C.resolve("tiny", overrides=["train.max_batch_seconds=auto", "train.num_workers=auto", "train.pack=on",
                                       "train.fused_adamw=off", "train.shape_bucket=8"])
    t = cfg.train
    assert (t.max_batch_seconds, t.num_workers, t.pack, t.fused_adamw, t.shape_bucket) == ("auto", "auto", "on", "off", 8)
    assert C.resolve("tiny", overrides=["train.max_batch_seconds=90", "train.num_workers=3"]).train.max_batch_seconds == 90.0
    assert C.resolve("tiny").train.torch_compile == "auto" and C.resolve("tiny").train.max_batch_seconds == 120.0
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.preset_batch_seconds("tiny") == 120.0 and C.preset_batch_seconds("base") == 320.0
    for bad, needle in (("train.pack=sometimes", "train.pack must be auto, on or off"),
                        ("train.num_workers=many", "expects int"), ("train.max_batch_seconds=lots", "expects float"),
                        ("train.shape_bucket=0", "shape_bucket")):
        with pytest.raises(C.ConfigError, match=needle):
            C.resolve("tiny", overrides=[bad])
    with pytest.raises(C.ConfigError, match="is for pre-training"):
        C.resolve_finetune("tiny", overrides=["train.max_batch_seconds=auto"])


def test_saved_configs_from_before_the_speed_settings_keep_their_behaviour():
    d = C.to_dict(C.resolve("tiny"))
    for key in ("time_schedule", "torch_compile", "pack", "fused_adamw", "shape_bucket"):
        del d["train"][key]
    t = C.from_dict(d).train
    assert (t.time_schedule, t.torch_compile, t.pack, t.fused_adamw, t.shape_bucket) == (False, "off", "off", "off", 1)


def _numeric_fields(node, prefix=""):
    """(dotted key, field, value) of every numeric field of a config tree (bools are not numbers here)."""
    import dataclasses

    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, f"{prefix}{f.name}.")
        elif f.type.startswith(("int", "float", "tuple[float")) or f.name in getattr(node, "AUTO", {}):
            yield f"{prefix}{f.name}", f, value


def _outside(spec: str, is_int: bool) -> list[str]:
    """Values just outside a range spec, plus the non-finite ones (for floats)."""
    import re

    bad = [] if is_int else ["nan", ".inf", "-.inf"]
    m = re.match(r"^([<>]=?) ?(-?[\d.]+)$", spec)
    if m:
        b = float(m.group(2))
        step = 1 if is_int else 1e-3
        bad.append({">": b, ">=": b - step, "<": b, "<=": b + step}[m.group(1)])
    m = re.match(r"^([\[(])(-?[\d.]+), (-?[\d.]+)([\])])$", spec)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        bad += [lo if m.group(1) == "(" else lo - 0.5, hi if m.group(4) == ")" else hi + 0.5]
    return [str(int(v)) if is_int and not isinstance(v, str) else str(v) for v in bad]


def _every_numeric_key():
    out = []
    for tree, name in ((C.Config(), "pretrain"), (C.FinetuneConfig(), "finetune")):
        for key, f, value in _numeric_fields(tree):
            if name == "finetune" and key.split(".")[0] in ("model", "train"):
                continue  # the same fields as pre-training's
            out.append((name, key, f, value))
    return out


@pytest.mark.parametrize("tree,key,f,value", _every_numeric_key(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_numeric_field_declares_a_range_and_refuses_a_value_outside_it(tree, key, f, value):
    spec = f.metadata.get("range")
    assert spec, f"{key}: a numeric field without a range (declare it with ranged(default, spec))"
    assert C.in_range(value[0] if isinstance(value, tuple) else value, spec) or value == "auto", \
        f"{key}: the default {value!r} is outside its own range {spec}"
    is_int = f.type.startswith("int")
    for bad in _outside(spec, is_int):
        if isinstance(value, tuple):  # one element outside is enough
            bad = ",".join([bad] + [str(v) for v in value[1:]])
        with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
            if tree == "pretrain":
                C.resolve("tiny", overrides=[f"{key}={bad}"])
            else:
                C.resolve_finetune("tiny", overrides=[f"{key}={bad}"])


def test_yaml_errors_give_the_line():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "bad.yaml"
        bad.write_text("model:\n  encoder:\n    layers: 3\n  mask: [unclosed\ntrain:\n  lr: 1\n")
        with pytest.raises(C.ConfigError, match=r"bad\.yaml: not valid YAML \(line \d+, column \d+: "):
            C.resolve(None, [bad])

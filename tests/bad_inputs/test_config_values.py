"""Family 3, configuration values: generated out-of-range values (hypothesis) for every numeric key,
and broken YAML files, x the commands that take a configuration.

Each is one line naming the key (or the file and line), exit status 2, before any data is read: the
commands are given a data source that does not exist, so an error about the data would mean the data
was looked at first; and nothing is written."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svqmae import config as C
from tests.bad_inputs.conftest import FUZZ, assert_refused, run_cli


def _keys(tree, prefix="", skip=()):
    """(dotted key, range spec, is an int) of every numeric field with a range that can be left."""
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if dataclasses.is_dataclass(value):
            if f"{prefix}{f.name}" not in skip:
                yield from _keys(value, f"{prefix}{f.name}.", skip)
        elif f.metadata.get("range") and not (f.metadata["range"] == "any" and f.type.startswith("int")):
            yield f"{prefix}{f.name}", f.metadata["range"], f.type.startswith("int"), isinstance(value, tuple)


PRETRAIN_KEYS = sorted(_keys(C.Config()))
FINETUNE_KEYS = sorted(_keys(C.FinetuneConfig(), skip=("model", "train")))


def outside(spec: str, is_int: bool):
    """A strategy of values outside ``spec`` (as --set writes them)."""
    bad = [] if is_int else [st.sampled_from(["nan", ".inf", "-.inf"])]
    m = re.match(r"^([<>]=?) ?(-?[\d.]+)$", spec)
    if m:
        op, b = m.group(1), float(m.group(2))
        if is_int:
            top = int(b) - (1 if op == ">=" else 0)
            bad.append(st.integers(top - 10**6, top) if op[0] == ">" else st.integers(int(b) + (op == "<="), 10**6))
        else:
            below = st.floats(-1e9, b, allow_nan=False)
            bad.append(below.filter(lambda x: x < b or op == ">") if op[0] == ">" else st.floats(b, 1e9))
    m = re.match(r"^([\[(])(-?[\d.]+), (-?[\d.]+)([\])])$", spec)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        bad.append(st.floats(-1e6, lo).filter(lambda x: x < lo or m.group(1) == "("))
        bad.append(st.floats(hi, 1e6).filter(lambda x: x > hi or m.group(4) == ")"))
    return st.one_of(*bad).map(lambda v: v if isinstance(v, str) else repr(v))


def _case(keys):
    return st.sampled_from(keys).flatmap(
        lambda k: st.tuples(st.just(k[0]), outside(k[1], k[2]).map(lambda v, t=k[3]: f"{v},0.5" if t else v)))


@settings(FUZZ, max_examples=40)
@given(case=_case(PRETRAIN_KEYS))
def test_an_out_of_range_pretraining_value_is_refused_before_the_data(world, capsys, case):
    key, value = case
    out = world.root / "never"
    res = run_cli(capsys, "pretrain", "--data", world.root / "no_such_data", "--out", out, "--preset", "tiny",
                  "--set", f"{key}={value}")
    assert_refused(res, key)
    assert "no_such_data" not in res.error and not out.exists()


@settings(FUZZ, max_examples=20)
@given(case=_case(FINETUNE_KEYS))
def test_an_out_of_range_finetuning_value_is_refused_before_the_data(world, capsys, case):
    key, value = case
    out = world.root / "never"
    res = run_cli(capsys, "finetune", "--model", "random", "--preset", "tiny", "--train", world.root / "no_such_data",
                  "--dev", world.root / "no_such_data", "--out", out, "--set", f"{key}={value}")
    assert_refused(res, key)
    assert "no_such_data" not in res.error and not out.exists()


@pytest.mark.parametrize("value", ["-1", "nan", "0", ".inf"])
def test_train_lr_out_of_range_is_refused_up_front(world, capsys, value):
    res = run_cli(capsys, "pretrain", "--data", world.audio, "--out", world.root / "never", "--preset", "tiny",
                  "--set", f"train.lr={value}")
    assert_refused(res, "train.lr", max_lines=1)
    assert not (world.root / "never").exists()


YAMLS = {  # file content -> what the message must name besides the file
    "unclosed": ("model:\n  mask: [unclosed\ntrain:\n  lr: 1\n", "line "),
    "tab_indent": ("model:\n\tencoder:\n\t\tlayers: 2\n", "line "),
    "top_level_list": ("- train.lr: 1\n", "mapping"),
    "unknown_key": ("train:\n  learning_rate: 0.1\n", "train.learning_rate"),
    "wrong_type": ("train:\n  lr: fast\n", "train.lr"),
    "out_of_range": ("model:\n  mix:\n    prob: 2\n", "model.mix.prob"),
    "section_as_value": ("model: 3\n", "model"),
}


@pytest.mark.parametrize("key,value", [("train.learning_rate", "0.1"), ("train.lr", "fast"), ("model.mix.prob", "2")])
def test_the_demo_refuses_a_bad_setting_before_synthesizing(tmp_path, capsys, key, value):
    out = tmp_path / "out"
    res = run_cli(capsys, "demo", "--out", out, "--set", f"{key}={value}")
    assert_refused(res, key, max_lines=1)
    assert not out.exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("name", sorted(YAMLS))
def test_a_broken_yaml_file_is_one_line_naming_it(tmp_path, capsys, world, command, name):
    text, needle = YAMLS[name]
    y = tmp_path / f"{name}.yaml"
    y.write_text(text)
    out = tmp_path / "out"
    argv = {"pretrain": ["pretrain", "--data", world.audio, "--preset", "tiny"],
            "finetune": ["finetune", "--model", "random", "--preset", "tiny", "--train", world.spelled, "--dev",
                         world.spelled]}[command]
    res = run_cli(capsys, *argv, "--out", out, "--config", y)
    assert_refused(res, y if name not in ("unknown_key", "wrong_type", "out_of_range") else needle, max_lines=1)
    assert needle in res.error and not out.exists()
    if needle == "line ":
        assert re.search(r"line \d+, column \d+", res.error)


def test_every_numeric_key_has_an_out_of_range_case():
    keys = {k for k, *_ in PRETRAIN_KEYS} | {k for k, *_ in FINETUNE_KEYS}
    assert {"train.lr", "train.betas", "model.mask.ratio", "ctc.layer_decay", "specaug.time_mask_prob"} <= keys
    assert len(keys) >= 60  # every numeric field of both trees but the int seeds (any int is valid)


FLAGS = [  # a command's own numeric flags (no config field): (argv before the flag, flag, a bad value)
    (["extract", "--model", "M", "--data", "D", "--out", "O"], "--batch-seconds", "0"),
    (["extract", "--model", "M", "--data", "D", "--out", "O"], "--batch-seconds", "-5"),
    (["extract", "--model", "M", "--data", "D", "--out", "O"], "--workers", "-1"),
    (["evaluate", "--model", "fbank", "--task", "ks", "--train", "D"], "--epochs", "0"),
    (["evaluate", "--model", "fbank", "--task", "asr", "--train", "D"], "--asr-epochs", "0"),
    (["evaluate", "--model", "fbank", "--task", "asr", "--train", "D"], "--asr-hidden", "0"),
    (["evaluate", "--model", "fbank", "--task", "ks", "--train", "D"], "--batch-size", "0"),
    (["evaluate", "--model", "fbank", "--task", "ks", "--train", "D"], "--dev-fraction", "1.5"),
    (["evaluate", "--model", "fbank", "--task", "ks", "--train", "D"], "--folds", "1"),
    (["data", "shard", "D", "--out", "O"], "--shard-seconds", "0"),
    (["data", "shard", "D", "--out", "O"], "--workers", "0"),
    (["data", "check", "D"], "--min-seconds", "nan"),
    (["transcribe", "--model", "M", "F"], "--beam", "0"),
    (["transcribe", "--model", "M", "F"], "--chunk-seconds", "-1"),
    (["score", "--model", "M", "--data", "D", "--out", "O"], "--worst", "ten"),
    (["export-onnx", "--model", "M", "--out", "O"], "--opset", "0"),
]


@pytest.mark.parametrize("argv,flag,value", FLAGS, ids=[f"{a[0]} {f}={v}" for a, f, v in FLAGS])
def test_a_commands_own_number_out_of_range_is_argparses_error_naming_the_flag(capsys, argv, flag, value):
    with pytest.raises(SystemExit) as stop:
        run_cli(capsys, *argv, flag, value)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in last and ("must be" in last or "expected an integer" in last), err


def test_an_opset_the_encoder_cannot_be_exported_at_is_one_line(tmp_path, capsys, world):
    out = tmp_path / "enc.onnx"
    res = run_cli(capsys, "export-onnx", "--model", world.model, "--out", out, "--opset", "5", "--no-check")
    assert_refused(res, "--opset 5", "cannot be exported at this opset")
    assert not out.exists()


@pytest.mark.parametrize("value", ["abc", "0", "1.5"])
def test_devices_that_name_no_device_are_refused(world, capsys, value):
    res = run_cli(capsys, "pretrain", "--data", world.audio, "--out", world.root / "never", "--preset", "tiny",
                  "--devices", value)
    assert_refused(res, "train.devices", max_lines=1)


def test_a_config_file_that_is_no_text_is_one_line(tmp_path, capsys, world):
    y = tmp_path / "model.yaml"
    y.write_bytes(b"\xff\xfe\x00m\x00o\x00d")
    res = run_cli(capsys, "pretrain", "--data", world.audio, "--out", tmp_path / "out", "--config", y)
    assert_refused(res, y, "not UTF-8", max_lines=1)

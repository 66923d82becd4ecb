import pytest

from svqmae import cli
from svqmae.engine.args import resolve_args


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_every_subcommand_is_registered():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert {"pretrain", "data", "demo", "evaluate", "finetune", "transcribe", "score", "extract",
            "export-onnx"} <= set(sub.choices)


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "--data", "{tmp}/missing", "--out", "{tmp}/run", "--preset", "tiny"], "missing: data source not found"),
    (["pretrain", "--data", "{tmp}", "--out", "{tmp}/run", "--set", "model.encoder.layerz=2"],
     "unknown config key 'model.encoder.layerz'"),
    (["pretrain", "--data", "{tmp}", "--out", "{tmp}/run", "--config", "{tmp}/none.yaml"], "none.yaml: config file not found"),
])
def test_bad_input_is_one_line_naming_the_problem(tmp_path, capsys, argv, needle):
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = _err(capsys)
    assert code == 2
    assert err.startswith("svqmae pretrain: error: ") and needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_engine_flags_become_train_overrides():
    args = cli.build_parser().parse_args(["pretrain", "--data", "x", "--out", "y", "--max-steps", "7",
                                          "--max-minutes", "1.5", "--accumulate", "4", "--preset", "tiny"])
    cfg = resolve_args(args)
    assert (cfg.train.max_steps, cfg.train.max_minutes, cfg.train.accumulate) == (7, 1.5, 4)
    assert cfg.preset == "tiny"

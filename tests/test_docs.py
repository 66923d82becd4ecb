"""The documentation: its reference is generated from the code, every flag and configuration key has help
text, and the shell and Python blocks of README.md and docs/ run, on generated audio.

A block runs unless the line before its fence says otherwise:

- ``<!-- check: REASON -->`` (a long run, a GPU, several GPUs): every ``svqmae`` command of the block is
  parsed by the real argument parser and its configuration resolved (presets, ``--config``, ``--set``),
  every script it names must exist, and a Python block's imports must resolve; nothing runs;
- ``<!-- skip: REASON -->`` (a public corpus, a download, another toolkit): not run at all.

The blocks of one page run in order in one folder (``page_dir``) holding ``my_recordings/`` (unlabelled
audio), ``ks_train.tsv`` / ``ks_test.tsv`` (labels), ``train.tsv`` / ``dev.tsv`` / ``test.tsv``
(transcripts), ``configs/``, ``runs/mine`` (a ``tiny`` model pre-trained for 2 steps) and ``runs/asr``
(it, fine-tuned for 2 steps); Python blocks of a page share one namespace. ``svqmae`` commands run in
this process (``svqmae.cli.main``), other commands in ``bash``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from svqmae import cli
from svqmae import config as C
from svqmae.engine.args import engine_overrides
from tests.conftest import harmonic_tone, write_labelled_set, write_spelled_set, write_wav

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import gen_ref  # noqa: E402  (docs/gen_ref.py: the generator the documentation build runs)

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "shell"}
PYTHON = {"python", "py"}
MARKER = re.compile(r"^<!--\s*(skip|check):\s*(.+?)\s*-->$")
SVQMAE = {"svqmae", ".venv/bin/svqmae"}
OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str  # "bash" or "python"
    code: str
    mode: str  # "run", "check" or "skip"
    reason: str

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def doc_blocks(path: Path) -> list[Block]:
    """The shell and Python blocks of a markdown file, each with the mode its marker gives."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        i = end + 1
        if lang not in SHELL | PYTHON:
            continue
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        out.append(Block(path, start + 1, "bash" if lang in SHELL else "python", "\n".join(lines[start + 1:end]),
                         marker.group(1) if marker else "run", marker.group(2) if marker else ""))
    return out


def shell_commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


# --------------------------------------------------------------------------- the fixture


def _prefixed(manifest: Path, folder: str, out: Path) -> None:
    """``manifest`` (paths relative to its folder) rewritten as ``out`` one level up."""
    rows = manifest.read_text(encoding="utf-8").splitlines()
    head, body = rows[0], [f"{folder}/{r}" for r in rows[1:]]
    out.write_text("\n".join([head, *body]) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory) -> Path:
    """What every page's examples start from (see the module docstring)."""
    base = tmp_path_factory.mktemp("docs_data")
    for s in range(2):
        for i in range(20):
            write_wav(base / f"my_recordings/spk{s}/utt{i}.wav",
                      harmonic_tone(0.8 + 0.05 * i, f0=100 + 40 * s + 7 * i, seed=100 * s + i))
    for split, speakers in (("ks_train", ["a", "b", "c"]), ("ks_test", ["d"])):
        m = write_labelled_set(base / split, {"yes": 150.0, "no": 300.0}, speakers, per_class=3)
        _prefixed(m, split, base / f"{split}.tsv")
    for split, seed in (("train", 0), ("dev", 1), ("test", 2)):
        _prefixed(write_spelled_set(base / split, n=12 if split == "train" else 6, seed=seed), split,
                  base / f"{split}.tsv")
    shutil.copytree(ROOT / "configs", base / "configs")
    fast = ["--set", "train.val_items=4", "--set", "train.num_workers=0", "--set", "train.max_batch_seconds=16",
            "--set", "train.max_utt_seconds=4", "--set", "train.log_every=1"]
    with contextlib.chdir(base):
        assert cli.main(["pretrain", "--data", "my_recordings", "--out", "runs/mine", "--preset", "tiny",
                         "--max-steps", "2", *fast]) == 0
        assert cli.main(["finetune", "--model", "runs/mine/model", "--train", "train.tsv", "--dev", "dev.tsv",
                         "--out", "runs/asr", "--max-steps", "2", *fast]) == 0
    return base


@pytest.fixture
def page_dir(docs_data, tmp_path, monkeypatch) -> Path:
    """A private copy of ``docs_data`` (hard links: commands write new files, never into these)."""
    page = tmp_path / "page"
    shutil.copytree(docs_data, page, copy_function=os.link)
    monkeypatch.chdir(page)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return page


# --------------------------------------------------------------------------- running and checking


def _check_svqmae(argv: list[str], where: str) -> None:
    """Parse ``argv`` with the real parser and resolve the configuration it describes."""
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `svqmae {shlex.join(argv)}` does not parse")
    sets = list(getattr(args, "set", []) or []) + engine_overrides(args)
    configs = list(getattr(args, "config", []) or [])
    if args.command == "finetune":
        C.resolve_finetune(args.preset or "tiny", None, configs, sets)
    elif args.command in ("pretrain", "demo"):
        C.resolve(getattr(args, "preset", None) or "tiny", configs, sets)


def _check_command(line: str, where: str) -> None:
    argv = shlex.split(line, comments=True)
    if argv[0] in SVQMAE:
        _check_svqmae(argv[1:], where)
    elif argv[0] in ("python", "python3", ".venv/bin/python") and argv[1].endswith(".py"):
        assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
    elif argv[0].endswith((".sh", ".py")):
        assert (ROOT / argv[0]).is_file(), f"{where}: {argv[0]} does not exist"


def _check_python(block: Block) -> None:
    """Compile the block and resolve every name it imports."""
    tree = ast.parse(block.code, filename=block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"


def _run_command(line: str, where: str) -> None:
    argv = shlex.split(line, comments=True)
    may_fail = argv[-2:] == ["||", "true"]
    if may_fail:
        argv = argv[:-2]
    if argv[0] in SVQMAE and not OPERATORS & set(argv):
        code = cli.main(argv[1:])  # svqmae's own exit status: 2 for a known error
        assert may_fail or code == 0, f"{where}: `{line}` exited with {code}"
        return
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{where}: `{line}` exited with {done.returncode}: {done.stderr[-2000:]}"


def run_blocks(blocks: list[Block]) -> dict[str, int]:
    """Run or check each block in order, in the current folder; counts per mode."""
    namespace: dict = {"__name__": "__docs__"}
    counts = {"run": 0, "check": 0, "skip": 0}
    for b in blocks:
        counts[b.mode] += 1
        if b.mode == "skip":
            continue
        if b.lang == "python":
            if b.mode == "check":
                _check_python(b)
            else:
                exec(compile(b.code, b.where, "exec"), namespace)
            continue
        for line in shell_commands(b.code):
            (_check_command if b.mode == "check" else _run_command)(line, b.where)
    return counts


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path: Path, page_dir, one_thread):
    blocks = doc_blocks(path)
    if all(b.mode == "skip" for b in blocks):
        pytest.skip("no runnable example" if not blocks else "; ".join(sorted({b.reason for b in blocks})))
    counts = run_blocks(blocks)
    assert counts["run"] + counts["check"] > 0


@pytest.mark.parametrize("mode,code,error", [
    ("check", "```bash\nsvqmae pretrain --data x --out y --steps 5\n```", "does not parse"),
    ("check", "```bash\nsvqmae finetune --model random --train a --dev b --out c \\\n    --set ctc.freez_steps=0\n```",
     "unknown config key 'ctc.freez_steps'"),
    ("check", "```bash\npython benchmarks/no_such_script.py --out x\n```", "does not exist"),
    ("check", "```python\nfrom svqmae.tasks.finetune import fine_tune\n```", "has no fine_tune"),
    ("run", "```bash\nsvqmae extract --model missing/model --data x --out y\n```", "exited with 2"),
])
def test_a_stale_example_fails(tmp_path, monkeypatch, mode, code, error):
    """A renamed flag, key, script or function fails its block, whether the block runs or is only checked."""
    page = tmp_path / "page.md"
    marker = "<!-- check: a long run -->\n" if mode == "check" else ""
    page.write_text(f"Text.\n\n{marker}{code}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks(page)
    assert [b.mode for b in blocks] == [mode]
    with pytest.raises((AssertionError, C.ConfigError, pytest.fail.Exception), match=error):
        run_blocks(blocks)


def test_markers_are_understood():
    """A misspelt marker would silently run a block meant to be skipped."""
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"^<!--\s*(skip|check|run)\b", line.strip()):
                assert MARKER.match(line.strip()), f"{path.relative_to(ROOT)}:{n}: malformed marker {line!r}"


def test_every_flag_and_key_has_help():
    missing = gen_ref.missing_help()
    assert not missing, "no help text: " + "; ".join(missing)


def test_missing_help_is_caught(monkeypatch):
    """Removing one flag's help and one key's comment makes the check above fail, naming them."""
    build = cli.build_parser

    def without_help():
        ap = build()
        pretrain = next(a for a in ap._actions if a.dest == "command").choices["pretrain"]
        next(a for a in pretrain._actions if a.dest == "data").help = None
        return ap

    monkeypatch.setattr(cli, "build_parser", without_help)
    comments = gen_ref.field_comments

    def without_comment(cls):
        return {k: ("" if (cls, k) == (C.MaskConfig, "ratio") else v) for k, v in comments(cls).items()}

    monkeypatch.setattr(gen_ref, "field_comments", without_comment)
    missing = gen_ref.missing_help()
    assert "svqmae pretrain --data" in missing and "config key model.mask.ratio" in missing


def test_field_comments_read_above_and_beside():
    """Help text is the comment block directly above a field plus the comment on its line."""
    assert gen_ref.field_comments(C.MaskConfig)["ratio"].startswith("share of (non-padding) tokens")
    level = gen_ref.field_comments(C.FeatureConfig)["level_state"]
    assert level.startswith("True: the model's features") and "config.ADDED_KEYS" in level


def test_reference_covers_every_command_and_key():
    cli_md, config_md = gen_ref.cli_markdown(), gen_ref.config_markdown()
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"## svqmae {name} " in cli_md
    for key in gen_ref.config_keys():
        assert f"| `{key.key}` |" in config_md
    assert "| `ctc.freeze_steps` |" in config_md
    assert "| `train.max_steps` | `int` | `>= 1` | `2000` | `100000` | `400000` |" in config_md


def test_architecture_figure_follows_the_config():
    a = gen_ref.architecture("tiny")
    cfg = C.resolve("tiny")
    assert a["visible"] + a["masked"] == a["tokens"] == 250
    assert a["masked"] == round(cfg.model.mask.ratio * 250)
    assert a["svqmae_gflops"] < a["encoder_only_gflops"]
    assert f"{cfg.model.encoder.layers} x {cfg.model.encoder.dim}" in gen_ref.architecture_mermaid("tiny")


def test_readme_figure_is_generated():
    """README's architecture figure and compute sentence are the generator's output for today's base preset."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```mermaid\n{gen_ref.architecture_mermaid('base')}\n```" in readme
    assert gen_ref.compute_sentence("base") in readme


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_readme_links_resolve():
    """README is read on the forge, outside the site's strict build: its links to files and headings must hold."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = ROOT / file
        assert path.is_file(), f"README links to {file}, which does not exist"
        if anchor:
            headings = [h.lstrip("#") for h in path.read_text(encoding="utf-8").splitlines() if h.startswith("#")]
            assert anchor in {_github_anchor(h) for h in headings}, f"README links to {target}: no such heading"

"""The documentation's reference pages, generated from the code at build time (never written by hand).

- ``reference/cli.md``: every ``svqmae`` subcommand and flag, from the argparse parsers of ``svqmae.cli``
  (help, default, choices);
- ``reference/config.md``: every configuration key of ``svqmae.config``'s dataclasses, its type, its
  default under each preset and its help text: the comment lines above the field and the comment beside
  it, read from the source with ``ast`` and ``tokenize``;
- ``method/architecture.md`` figures: a mermaid diagram of the model drawn from a model built from a
  preset (module classes, sizes, token counts and an estimate of the forward cost).

mkdocs runs this module as a hook (``mkdocs.yml``: ``hooks``); ``tests/test_docs.py`` imports it and fails
when a flag or key has no help text (:func:`missing_help`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET_ORDER = ("tiny", "small", "base")


# --------------------------------------------------------------------------- the command line


@dataclass
class Flag:
    names: str  # "--max-steps" or the positional's name
    help: str
    key: str  # the configuration key the flag sets (``svqmae.engine.args.ENGINE_FLAGS``), else ""
    default: str  # as shown: "" when there is none
    choices: str
    repeatable: bool


@dataclass
class Command:
    path: str  # "data prepare"
    help: str
    usage: str
    flags: list[Flag]


def _default(a: argparse.Action) -> str:
    if a.default in (None, argparse.SUPPRESS, []) or isinstance(a, (argparse._StoreConstAction, argparse._StoreTrueAction,
                                                                     argparse._StoreFalseAction)):
        return ""
    return repr(a.default) if not isinstance(a.default, str) else a.default


def _walk(parser: argparse.ArgumentParser, path: list[str], helps: dict[str, str], out: list[Command]) -> None:
    from svqmae.engine.args import ENGINE_FLAGS

    keys = dict(ENGINE_FLAGS)
    flags, subs = [], []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            for choice in a._choices_actions:  # the help given to add_parser
                helps[" ".join(path + [choice.dest])] = choice.help or ""
            subs.extend(a.choices.items())
            continue
        text = parser._get_formatter()._expand_help(a) if a.help else ""  # %(default)s, %%
        flags.append(Flag(names=", ".join(a.option_strings) or a.dest, help=text.strip(), key=keys.get(a.dest, ""),
                          default=_default(a), choices=", ".join(map(str, a.choices)) if a.choices else "",
                          repeatable=isinstance(a, argparse._AppendAction) or "repeatable" in (a.help or "")))
    if path:
        usage = " ".join(parser.format_usage().split())
        out.append(Command(" ".join(path), (parser.description or helps.get(" ".join(path), "")).strip(),
                           usage.removeprefix("usage: "), flags))
    for name, sp in subs:
        _walk(sp, path + [name], helps, out)


def cli_commands() -> list[Command]:
    """Every subcommand of ``svqmae`` (nested ones too), in ``svqmae --help`` order."""
    from svqmae import cli

    out: list[Command] = []
    _walk(cli.build_parser(), [], {}, out)
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def cli_markdown() -> str:
    cmds = cli_commands()
    lines = ["# Command-line reference", "",
             "Generated from the argparse parsers of `svqmae.cli` when the documentation is built; "
             "`svqmae COMMAND --help` prints the same. Flags that set a configuration key are described in the "
             "[configuration reference](config.md).", ""]
    lines += [f"- [`svqmae {c.path}`](#{_anchor(c.path)}): {_cell(c.help)}" for c in cmds if c.flags]
    for c in cmds:
        lines += ["", f"## svqmae {c.path} {{#{_anchor(c.path)}}}", ""]
        if c.help:
            lines += [_cell(c.help), ""]
        lines += ["```text", textwrap.fill(f"svqmae {c.usage.removeprefix('svqmae ')}", 100,
                                           subsequent_indent="    ", break_on_hyphens=False), "```", ""]
        if c.flags:
            lines += ["| argument | help | default |", "|---|---|---|"]
            for f in c.flags:
                parts = [f.help, f"(choices: {f.choices})" if f.choices else "", f"(sets `{f.key}`)" if f.key else ""]
                lines.append(f"| `{f.names}` | {_cell(' '.join(p for p in parts if p))} | "
                             f"{'`' + _cell(f.default) + '`' if f.default else ''} |")
    return "\n".join(lines) + "\n"


def _anchor(path: str) -> str:
    return "svqmae-" + path.replace(" ", "-")


# --------------------------------------------------------------------------- the configuration


@dataclass
class Key:
    key: str  # "train.max_steps"
    type: str  # the annotation as written
    range: str  # the range a numeric field declares (``config.ranged``), else ""
    help: str
    defaults: dict[str, object]  # preset -> value


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its help text: the comment lines directly above the field (no blank line between)
    followed by the comment on the field's own line(s)."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    comments: dict[int, str] = {}  # line (1-based) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in ast.parse(src).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above: list[str] = []
        n = node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        beside = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        out[node.target.id] = " ".join(t for t in above + beside if t)
    return out


def _annotations(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {n.target.id: ast.unparse(n.annotation) for n in tree.body[0].body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _leaves(obj: object, prefix: str = ""):
    """(dotted key, owning dataclass, field name, value) of every non-section field of a config tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", type(obj), f.name, value


def config_keys(finetune: bool = False) -> list[Key]:
    """Every key of the pre-training (or fine-tuning) configuration with its default under each preset."""
    from svqmae import config as C

    resolved = {p: (C.resolve_finetune(p) if finetune else C.resolve(p)) for p in PRESET_ORDER}
    helps: dict[type, dict[str, str]] = {}
    types: dict[type, dict[str, str]] = {}
    ranges: dict[type, dict[str, str]] = {}
    keys: dict[str, Key] = {}
    for preset, cfg in resolved.items():
        for key, cls, name, value in _leaves(cfg):
            if key == "preset":
                continue
            if cls not in helps:
                helps[cls], types[cls] = field_comments(cls), _annotations(cls)
                ranges[cls] = {f.name: f.metadata.get("range", "") for f in dataclasses.fields(cls)}
            k = keys.setdefault(key, Key(key, types[cls][name], ranges[cls][name], helps[cls][name], {}))
            k.defaults[preset] = value
    return list(keys.values())


def _value(v: object) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return f"`{v!r}`" if isinstance(v, str) else f"`{v}`"


def _key_table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | range | " + " | ".join(PRESET_ORDER) + " | help |",
            "|---|---|---|" + "---|" * len(PRESET_ORDER) + "---|"]
    for k in keys:
        values = [_value(k.defaults[p]) for p in PRESET_ORDER]
        if len(set(values)) == 1:  # one default for every preset: say it once
            values = [values[0]] + ["″"] * (len(values) - 1)
        rng = f"`{k.range}`" if k.range and k.range != "any" else ""
        rows.append(f"| `{k.key}` | `{k.type}` | {rng} | " + " | ".join(values) + f" | {_cell(k.help)} |")
    return rows


def config_markdown() -> str:
    pre = config_keys()
    ft = [k for k in config_keys(finetune=True) if not k.key.startswith("model.")]
    lines = ["# Configuration reference", "",
             "Generated from the dataclasses of `svqmae.config` (the single source of defaults) when the documentation "
             "is built: each key, its type, the range of values it accepts, its default under each preset and its help "
             "text (the comments beside the field in the source). Set any key with `--set KEY=VALUE` or in a YAML file given with `--config` "
             "(see [Configuration](../guides/configuration.md)). ″ = the same as the first column.", "",
             "## Pre-training (`svqmae pretrain`, `svqmae demo`)", "",
             "Presets: `--preset tiny | small | base` (default `base`).", ""]
    lines += _key_table(pre)
    lines += ["", "## Fine-tuning (`svqmae finetune`)", "",
              "The `model.*` keys are the pre-trained model's own (only the dropouts can be changed); with "
              "`--model random` or `--model fbank` they are the pre-training preset's, above. The `train.*` keys "
              "have the same meaning as in pre-training, with the fine-tuning presets' defaults.", ""]
    lines += _key_table(ft)
    return "\n".join(lines) + "\n"


def missing_help() -> list[str]:
    """Every CLI argument and configuration key that has no help text (the documentation test fails on any)."""
    out = [f"svqmae {c.path} {f.names}" for c in cli_commands() for f in c.flags if not f.help]
    seen = set()
    for k in config_keys() + config_keys(finetune=True):
        if not k.help and k.key not in seen:
            seen.add(k.key)
            out.append(f"config key {k.key}")
    return out


# --------------------------------------------------------------------------- the architecture figure


def _block_flops(tokens: int, layers: int, dim: int, ffn: int) -> float:
    """Forward multiply-adds x 2 of ``layers`` Transformer blocks over ``tokens`` tokens (projections,
    feed-forward and the two attention products)."""
    return layers * (2 * tokens * (4 * dim * dim + 2 * dim * ffn) + 4 * tokens * tokens * dim)


@functools.cache
def architecture(preset: str = "base", seconds: float = 10.0) -> dict:
    """Sizes of the model built from ``preset``, and what one ``seconds``-long utterance costs in it."""
    from svqmae import config as C
    from svqmae.model import SVQMAE

    cfg = C.resolve(preset)
    m = cfg.model
    model = SVQMAE(m)
    f = m.features
    tokens = int(seconds * 1000 / (f.frame_shift_ms * f.stack))
    masked = round(m.mask.ratio * tokens)
    visible = tokens - masked
    enc, dec = m.encoder, m.decoder
    svq = _block_flops(visible, enc.layers, enc.dim, enc.ffn_dim) + _block_flops(tokens, dec.layers, dec.dim, dec.ffn_dim)
    full = _block_flops(tokens, enc.layers, enc.dim, enc.ffn_dim)
    classes = {name: type(mod).__name__ for name, mod in model.named_children()}
    return dict(preset=preset, seconds=seconds, tokens=tokens, masked=masked, visible=visible, cfg=cfg,
                classes=classes, svqmae_gflops=svq / 1e9, encoder_only_gflops=full / 1e9,
                params=sum(p.numel() for p in model.encoder.parameters()) / 1e6)


def architecture_mermaid(preset: str = "base", seconds: float = 10.0) -> str:
    """A mermaid flowchart of the model built from ``preset``: module classes, sizes and token counts."""
    a = architecture(preset, seconds)
    m, c = a["cfg"].model, a["classes"]
    f, q, enc, dec = m.features, m.quantizer, m.encoder, m.decoder
    heads = f"{q.num_codebooks} x {q.codebook_size} codes" + (" + filterbanks" if m.recon_weight else "")
    conv = f"depthwise conv k={m.decoder_conv}<br/>" if m.decoder_conv else ""
    return "\n".join([
        "flowchart LR",
        f'  W["{a["seconds"]:g} s of 16 kHz audio"] --> F["{c["frontend"]}<br/>{f.n_mels} log-mel, '
        f'{f.stack} frames per token<br/>{a["tokens"]} tokens"]',
        f'  F --> M{{"span masking<br/>{m.mask.ratio:.0%} masked, spans of {m.mask.span}"}}',
        f'  F --> Q["{c["quantizer"]} (frozen)<br/>targets: {heads}"]',
        f'  M -->|"{a["visible"]} visible tokens"| E["encoder: {c["encoder"]}<br/>{enc.layers} x {enc.dim}, '
        f'{enc.heads} heads<br/>{a["params"]:.1f} M parameters"]',
        f'  E --> D["decoder: {conv}{c["decoder"]} {dec.layers} x {dec.dim}<br/>all {a["tokens"]} tokens, '
        f'{a["masked"]} of them mask embeddings"]',
        f'  D --> H["{c["head"]} heads on the {a["masked"]} masked tokens"]',
        '  Q -.->|"cross-entropy"| H',
        '  E ==>|"kept after pre-training:<br/>every layer = the features"| X(["extract()"])',
    ])


def compute_sentence(preset: str = "base", seconds: float = 10.0) -> str:
    a = architecture(preset, seconds)
    return (f"At the `{preset}` preset, a {a['seconds']:g}-second utterance is {a['tokens']} tokens; the encoder runs on "
            f"its {a['visible']} visible tokens and the decoder on all {a['tokens']}: about "
            f"{a['svqmae_gflops']:.2g} GFLOPs of Transformer forward pass, against {a['encoder_only_gflops']:.2g} "
            f"for the same encoder on every token (the encoder-only ablation, BEST-RQ / HuBERT style), "
            f"{a['encoder_only_gflops'] / a['svqmae_gflops']:.1f}x more.")


def architecture_markdown() -> str:
    lines = ["# The architecture, drawn from the code", "",
             "Generated when the documentation is built: each preset's model is constructed (`SVQMAE(config.model)`) "
             "and the figure names its modules and sizes. Token counts are for a 10-second utterance; the cost is "
             "an estimate of the Transformer blocks' forward multiply-adds (projections, feed-forward, attention).", ""]
    for preset in reversed(PRESET_ORDER):
        lines += [f"## `{preset}`", "", "```mermaid", architecture_mermaid(preset), "```", "",
                  compute_sentence(preset), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the mkdocs hook


def benchmarks_markdown() -> str:
    """BENCHMARKS.md as a page of the site; its links to repository files (not pages) become plain text."""
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    return re.sub(r"\[([^\]]+)\]\((?!https?://|#)[^)]+\)", r"\1", text)


GENERATED = {"reference/cli.md": cli_markdown, "reference/config.md": config_markdown,
             "method/architecture.md": architecture_markdown, "benchmarks.md": benchmarks_markdown}


def on_files(files, config):
    """mkdocs hook: add the generated pages to the site (they are never files in ``docs/``)."""
    from mkdocs.structure.files import File

    for path, make in GENERATED.items():
        files.append(File.generated(config, path, content=make()))
    return files


def on_page_content(html, page, config, files):
    """mkdocs hook: docstrings' Sphinx roles (``:func:`x```, ``:class:`~a.b.C```) shown as plain code."""
    return re.sub(r":(?:func|meth|class|mod|attr|data):<code>~?([^<]*)</code>", r"<code>\1</code>", html)

"""svqmae.data.shar and shar_writer: ``data shard`` (fields travel, bad files skipped, interrupted runs continue to the
same shards), ``data check`` of a Shar directory, broken and missing shards, the stream split over
ranks x workers (every cut once per epoch, also in a 2-rank gloo job), and its resume bound."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import os
import socket
import tarfile

import pytest
import torch

from svqmae import cli
from svqmae.data import DataError, Problems, cut_fields, load_source
from svqmae.data import shar as S
from svqmae.data import shar_writer as W
from svqmae.data.loader import shar_loader
from svqmae.data.sources import check_shar
from tests.conftest import harmonic_tone, write_wav

N = 24  # utterances of 0.6-1.2 s: 4 to 6 per 5-second shard


def _corpus(root):
    """A TSV with seconds, label, text and speaker over N good files and one corrupt file."""
    rows = ["path\tseconds\tlabel\ttext\tspeaker"]
    for i in range(N):
        secs = 0.6 + 0.1 * (i % 7)
        write_wav(root / "audio" / f"u{i:02d}.wav", harmonic_tone(secs, f0=100 + 9 * i, seed=i))
        rows.append(f"audio/u{i:02d}.wav\t{secs:.3f}\tL{i % 3}\tword {i}\tspk{i % 2}")
    (root / "audio" / "bad.wav").write_bytes(b"RIFF" + bytes(100))
    rows.append("audio/bad.wav\t1.0\tL0\t\t")
    (root / "m.tsv").write_text("\n".join(rows) + "\n")
    return root / "m.tsv"


@pytest.fixture(scope="module")
def shar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shar")
    W.write_shar([str(_corpus(root))], root / "shar", shard_seconds=5.0, progress=False, log=lambda m: None)
    return root / "shar"


def _cut_ids(batches) -> list[str]:
    return [i for b in batches for i in b["ids"]]


def test_shard_command_keeps_fields_skips_bad_files_and_data_check_reads_it(tmp_path, capsys):
    m = _corpus(tmp_path)
    assert cli.main(["data", "shard", str(m), "--out", str(tmp_path / "s"), "--shard-seconds", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{N} files" in out and "1 skipped" in out
    index = json.loads((tmp_path / "s" / S.INDEX).read_text())
    assert index["complete"] and index["cuts"] == N and len(index["shards"]) >= 4
    assert "bad.wav" in (tmp_path / "s" / "skipped_files.tsv").read_text()
    cuts = {c.id: c for c in load_source(tmp_path / "s")}  # eager (evaluation, extract), strict
    assert len(cuts) == N
    c = cuts["audio/u05.wav"]
    assert cut_fields(c) == {"label": "L2", "text": "word 5", "speaker": "spk1"}
    assert c.sampling_rate == 16000 and abs(c.duration - 1.1) < 1e-3
    assert cli.main(["data", "check", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"{N} usable utterances" in out and f"in {len(index['shards'])} Shar shards" in out
    assert "FLAC in Shar" in out and "problem files: 0" in out


def test_an_interrupted_shard_run_continues_to_the_same_shards(tmp_path, monkeypatch):
    m = _corpus(tmp_path)
    W.write_shar([str(m)], tmp_path / "whole", shard_seconds=5.0, progress=False, log=lambda m: None)
    real, calls = W._write_shard, []

    def dies_at_the_third(out, k, cuts, fmt):
        calls.append(k)
        if len(calls) == 3:
            (out / f".tmp-{k:06d}").mkdir()  # a half-written shard, as kill -9 would leave it
            raise KeyboardInterrupt
        return real(out, k, cuts, fmt)

    monkeypatch.setattr(W, "_write_shard", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        W.write_shar([str(m)], tmp_path / "cut", shard_seconds=5.0, progress=False, log=lambda m: None)
    with pytest.raises(DataError, match=r"unfinished Shar directory \(2 of \d+ shards written\)"):
        S.open_shar(tmp_path / "cut")
    monkeypatch.setattr(W, "_write_shard", real)
    W.write_shar([str(m)], tmp_path / "cut", shard_seconds=5.0, progress=False, log=lambda m: None)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cut").iterdir())
    for name in names:
        a, b = (tmp_path / "whole" / name).read_bytes(), (tmp_path / "cut" / name).read_bytes()
        if name.endswith(".gz"):  # gzip headers hold the time of writing
            a, b = gzip.decompress(a), gzip.decompress(b)
        assert a == b, name
    with pytest.raises(DataError, match="other sources or settings"):
        W.write_shar([str(m)], tmp_path / "cut", shard_seconds=3.0, progress=False, log=lambda m: None)


def test_a_truncated_shard_is_reported_and_skipped_and_a_missing_one_is_an_error(shar_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(shar_dir, d)
    index = json.loads((d / S.INDEX).read_text())
    tar = d / index["shards"][1]["recording"]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    loader = shar_loader(S.open_shar(d), 4.0, 2.0, 2, 0, seed=0, buffer_size=8, epochs=1)
    batches = list(loader)
    failed = [f for b in batches for f in b["failed"]]
    assert len(failed) == 1 and str(tar) in failed[0][0] and "truncated or corrupt shard" in failed[0][1]
    seen = _cut_ids(batches)
    assert len(seen) == len(set(seen)) and N - index["shards"][1]["count"] <= len(seen) < N
    rep = check_shar(d)
    assert any(str(tar) in p for p, _ in rep.problems.items)
    tar.unlink()
    with pytest.raises(DataError, match=f"{tar}: shard listed in .*{S.INDEX} is missing"):
        S.open_shar(d)


def test_shard_locations_may_be_urls_or_pipe_commands(shar_dir, tmp_path):
    index = json.loads((shar_dir / S.INDEX).read_text())
    for e in index["shards"]:  # what an index on object storage would hold, tested with local commands
        e["cuts"], e["recording"] = str(shar_dir / e["cuts"]), f"pipe:cat {shar_dir / e['recording']}"
    (tmp_path / S.INDEX).write_text(json.dumps(index))
    assert S.is_shar(tmp_path / S.INDEX) and S.is_shar("s3://bucket/corpus") and not S.is_shar("s3://b/x.tsv")
    assert len(load_source(tmp_path / S.INDEX)) == N


@pytest.mark.parametrize("shards, slots", [(7, 3), (5, 5), (2, 6), (1, 4)])
def test_each_epoch_deals_every_shard_part_to_exactly_one_slot(shards, slots):
    for epoch in (0, 1):
        units = S.epoch_units(shards, slots, seed=3, epoch=epoch)
        dealt = sorted((s, p) for slot in units for s, p, _ in slot)
        parts = units[0][0][2]
        assert dealt == sorted((s, p) for s in range(shards) for p in range(parts))
        assert all(units)  # no idle slot
    assert S.epoch_units(shards, slots, 3, 0) == S.epoch_units(shards, slots, 3, 0)
    assert shards < 3 or S.epoch_units(shards, slots, 3, 0) != S.epoch_units(shards, slots, 3, 1)


def _rank_main(rank: int, port: int, shar: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loader = shar_loader(S.open_shar(shar), 4.0, 2.0, 2, num_workers=2, seed=0, buffer_size=6, epochs=2)
        seen = [(b["epoch"], i) for b in loader for i in b["ids"]]
        with open(f"{out}.{rank}", "w") as f:
            json.dump(seen, f)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_by_two_workers_read_every_cut_exactly_once_per_epoch(shar_dir, tmp_path):
    ctx = mp.get_context("fork")  # faster than spawn; this process never initializes torch.distributed
    port, out = _free_port(), str(tmp_path / "seen")
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(shar_dir), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    seen = [tuple(x) for r in (0, 1) for x in json.load(open(f"{out}.{r}"))]
    everything = {c.id for c in load_source(shar_dir)}
    for epoch in (0, 1):
        ids = [i for e, i in seen if e == epoch]
        assert len(ids) == len(set(ids)) == N and set(ids) == everything
    ranks = [{i for e, i in map(tuple, json.load(open(f"{out}.{r}")))} for r in (0, 1)]
    assert ranks[0] and ranks[1] and len(ranks[0]) < N  # each rank reads its own shards


def test_a_resumed_stream_trains_no_cut_twice_and_skips_at_most_its_buffers(shar_dir):
    """The module keeps, per worker, the read position of the last batch trained on; a stream resumed
    there continues the epoch: no cut twice, at most ``buffer_size`` cuts per worker left out."""
    from svqmae.config import TrainConfig
    from svqmae.engine.module import EngineModule

    class Module(EngineModule):
        def checkpoint_config(self):
            return {}

    shar, buffer = S.open_shar(shar_dir), 4
    ref = list(shar_loader(shar, 3.0, 2.0, 2, num_workers=2, seed=1, buffer_size=buffer, epochs=1))
    assert {b["stream"]["worker"] for b in ref} == {0, 1} and len(ref) >= 6
    for trained in (1, 3, len(ref) // 2):
        module = Module(TrainConfig())
        module.streamed = True
        for b in ref[:trained]:
            module.begin_step(b, 0)
        state = {}
        module.on_save_checkpoint(state)
        rest = list(shar_loader(shar, 3.0, 2.0, 2, num_workers=2, seed=1, buffer_size=buffer, epochs=1,
                                resume=state["data_stream"]))
        ids = _cut_ids(ref[:trained]) + _cut_ids(rest)
        assert len(ids) == len(set(ids)), "a cut was trained on twice in one epoch"
        assert N - 2 * buffer <= len(ids) <= N
    assert S.resume_positions([{"layout": [1, 2], "workers": {0: [3, 1, 2]}}], 0, [2, 2]) == {0: (4, 0, 0), 1: (4, 0, 0)}


def test_evaluation_reads_a_shar_dir_whole_and_names_a_bad_shard(shar_dir, tmp_path):
    import shutil

    d = tmp_path / "s"
    shutil.copytree(shar_dir, d)
    tar = d / json.loads((d / S.INDEX).read_text())["shards"][0]["recording"]
    with tarfile.open(tar) as t:
        assert all(n.endswith((".flac", ".json")) for n in t.getnames())
    tar.write_bytes(tar.read_bytes()[:2000])
    problems = Problems()
    assert len(load_source(d, problems)) < N and str(tar) in problems.items[0][1]
    with pytest.raises(DataError, match=str(tar)):
        load_source(d)


def test_shards_are_read_as_lhotse_reads_them_also_long_names_and_compressed_tars(shar_dir, tmp_path):
    from lhotse.shar.readers import LazySharIterator

    shard = S.open_shar(shar_dir).shards[0]
    ref = list(LazySharIterator(fields={"cuts": [shard["cuts"]], "recording": [shard["recording"]]}))
    for c in ref:
        c.custom = {"shar_audio": shard["recording"]}  # lhotse's shard_origin/shar_epoch -> ours
    got = [c for _, c in S.iter_shard(shard)]
    assert [c.to_dict() for c in got] == [c.to_dict() for c in ref]
    assert [c.recording.sources[0].source for c in got] == [c.recording.sources[0].source for c in ref]
    assert [o for o, _ in S.iter_shard(shard, part=1, parts=2, skip=2)] == [o for o in range(len(ref)) if o >= 2 and o % 2]
    # a pax header (a 150-character id), gzip-compressed, read through a pipe
    cid = "x" * 150
    with tarfile.open(shard["recording"]) as src:
        first = [(m.name, src.extractfile(m).read()) for m in src.getmembers()[:2]]
    for tar, names in (("r.tar", [f"{cid}.flac", f"{cid}.json"]), ("head.tar", [n for n, _ in first])):
        with tarfile.open(tmp_path / tar, "w", format=tarfile.PAX_FORMAT) as t:
            for name, (_, data) in zip(names, first):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    audio = first[0][1]
    (tmp_path / "r.tar.gz").write_bytes(gzip.compress((tmp_path / "r.tar").read_bytes()))
    line = json.loads(gzip.open(shard["cuts"], "rt").readline())
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps(dict(line, id=cid)) + "\n")
    (cut,) = [c for _, c in S.iter_shard({"cuts": str(tmp_path / "c.jsonl.gz"), "recording": f"pipe:cat {tmp_path}/r.tar.gz"})]
    assert cut.id == cid and cut.recording.sources[0].source == audio
    with pytest.raises(S.SHARD_ERRORS, match="ends before"):  # a tar shorter than its manifest
        list(S.iter_shard({"cuts": shard["cuts"], "recording": str(tmp_path / "head.tar")}))

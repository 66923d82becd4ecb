import json

from svqmae.engine.plots import plot_pretrain, read_metrics


def test_pretrain_plot_from_metrics(tmp_path):
    rows = [{"step": s, "loss": 6 - s / 10, "masked_acc": s / 100, "code_perplexity": 300.0} for s in range(0, 50, 5)]
    rows.append({"step": 50, "val_loss": 1.5, "val_masked_acc": 0.4})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_metrics(tmp_path)) == 11
    png = plot_pretrain(tmp_path)
    assert png == tmp_path / "plots" / "pretrain.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_no_metrics_gives_empty_list(tmp_path):
    assert read_metrics(tmp_path) == []

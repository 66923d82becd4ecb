"""The ONNX export (svqmae.tasks.export)."""


import numpy as np
import torch

from svqmae.tasks.export import MatmulLogFilterBank, check_onnx, export_onnx
from tests.conftest import extract_no_grad, tiny_model, waves_batch

# Durations of 0.1 s x an odd number keep each utterance's last token clear of its end, where the
# filterbank would see the batch's zero padding instead of lhotse's edge reflection: with them, an
# utterance's features do not depend on what it is batched with.
SECONDS = (0.5, 0.7, 0.9, 1.1, 1.3)


def test_dft_filterbank_matches_lhotse():
    model, _ = tiny_model()
    waves, _ = waves_batch((1.0, 0.63))
    fbank = model.frontend.fbank
    ref = fbank(waves)
    np.testing.assert_allclose(MatmulLogFilterBank(fbank)(waves).numpy(), ref.numpy(), atol=3e-4)


def test_onnx_export_matches_pytorch_with_dynamic_batch_and_length(tmp_path):
    import onnxruntime as ort

    model, _ = tiny_model(seed=3)
    path = export_onnx(model, tmp_path / "encoder.onnx")
    assert model.has_decoder, "export leaves the model untouched"
    assert check_onnx(model, path) < 1e-4  # a batch of 2 different lengths, padded
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["waves", "lengths"]
    # another batch size and length than at export time; padding handled through `lengths`
    waves, lengths = waves_batch((0.45, 1.37, 0.8), seed=5)
    hidden, tok_len = sess.run(None, {"waves": waves.numpy(), "lengths": lengths.numpy()})
    ref, ref_len = extract_no_grad(model, waves, lengths)
    assert hidden.shape == (4, 3, int(ref_len.max()), 64)  # level, input embedding, 2 blocks
    assert tok_len.tolist() == ref_len.tolist()
    assert np.abs(hidden - torch.stack(ref).numpy()).max() < 1e-4

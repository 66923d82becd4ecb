
from svqmae.model import SVQMAE
from tests.model.test_svqmae import batch, tiny_cfg


def test_frontend_shapes_and_token_lengths():
    model = SVQMAE(tiny_cfg().model)
    waves, lengths = batch()
    tokens, tok_len = model.frontend(waves, lengths)
    assert tokens.shape[-1] == 80 * 4
    assert tok_len.tolist() == [40, 30, 17]  # 25 Hz: (S + 80) // 160 // 4
    assert tokens.shape[1] == 40
    assert (tokens[2, 17:] == 0).all(), "padding tokens are zero"
    valid = tokens[0].reshape(-1, 80)
    assert abs(float(valid.mean())) < 1e-4 and abs(float(valid.std()) - 1) < 1e-2  # utterance-normalized

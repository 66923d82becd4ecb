"""Speed settings (svqmae.engine.speed): each resolves per device and changes how, not what, a step computes.

Tolerances (fp32, CPU): compiled blocks vs eager: loss within 1e-6 relative, gradients within 1e-5 of the
largest; fused vs foreach AdamW: parameters within 1e-6 after a step. The compile tests use the
``aot_eager`` backend (graph capture, dynamic shapes and autograd as in training, without the minutes
that inductor's C++ code generation can take on 2 shared cores); ``SVQMAE_TEST_INDUCTOR=1`` runs them
with inductor (2 cores: 30 s with a cold cache when the machine is quiet, over 2 minutes under load; it
passed, the loss identical and gradients within 3e-8, when last run).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

from svqmae import config as C
from svqmae.engine.speed import Speed, adamw, apply_speed, resolve_speed
from svqmae.model import SVQMAE
from tests.model.test_svqmae import batch, tiny_cfg

BACKEND = "inductor" if os.environ.get("SVQMAE_TEST_INDUCTOR") else "aot_eager"


def test_auto_is_on_for_cuda_and_mostly_off_on_a_cpu():
    t = C.TrainConfig()
    assert resolve_speed(t, "cuda") == Speed(compile=True, pack=True, fused_adamw=True, shape_bucket=16)
    assert resolve_speed(t, "cpu") == Speed(fused_adamw=True)  # fused AdamW is faster on CPUs too
    assert resolve_speed(t, "mps") == Speed()
    t = C.resolve("tiny", overrides=["train.pack=on", "train.torch_compile=off", "train.shape_bucket=8",
                                     "train.fused_adamw=off"]).train
    assert resolve_speed(t, "cpu") == Speed(pack=True, shape_bucket=8)
    assert resolve_speed(t, "cuda") == Speed(pack=True, shape_bucket=8)


def _steps(model, shapes, first_seed=0):
    results = []
    for i, seconds in enumerate(shapes, first_seed):
        waves, lengths = batch(len(seconds), seconds)
        out = model(waves, lengths, torch.Generator().manual_seed(i))
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return results


def test_compiled_blocks_match_eager_and_new_batch_shapes_do_not_recompile():
    shapes = [(1.6, 1.2, 0.7), (1.0, 0.9), (1.3, 1.2, 0.7, 0.5), (1.1, 0.6, 0.6)]
    torch.manual_seed(0)
    eager = SVQMAE(tiny_cfg().model)
    compiled = SVQMAE(tiny_cfg().model)
    compiled.load_state_dict(eager.state_dict())
    apply_speed(compiled, Speed(compile=True, pack=True, shape_bucket=8), backend=BACKEND)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and saved models unchanged
    counters.clear()
    got = _steps(compiled, shapes[:2])
    graphs = counters["stats"]["unique_graphs"]
    got += _steps(compiled, shapes[2:], 2)  # new batch sizes and lengths: the same compiled code
    assert counters["stats"]["unique_graphs"] == graphs
    eager.pack, eager.shape_bucket = True, 8
    for (loss, grads), (ref_loss, ref_grads) in zip(got, _steps(eager, shapes)):
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
        for k, g in grads.items():
            assert (g - ref_grads[k]).abs().max() <= 1e-5 * ref_grads[k].abs().max() + 1e-12, k


def test_fused_adamw_matches_foreach_and_skips_a_flagged_step_on_the_device():
    t = C.TrainConfig(lr=1e-2)
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = adamw(a.parameters(), t, fused=False), adamw(b.parameters(), t, fused=True)
    assert opt_b.defaults["fused"] and not opt_a.defaults["fused"]
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-6, atol=1e-7)
    # a step flagged non-finite on the device: no change, and the step count stays (as if never taken)
    before = [p.detach().clone() for p in b.parameters()]
    opt_b.zero_grad()
    b(x).square().mean().backward()
    opt_b.found_inf = torch.ones(())
    opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))
    assert all(int(s["step"]) == 3 for s in opt_b.state.values())


@pytest.mark.parametrize("extra", [(), ("model.variant=encoder_only",)])
def test_speed_settings_leave_saved_models_alone(extra):
    model = SVQMAE(tiny_cfg(*extra).model)
    keys = set(model.state_dict())
    apply_speed(model, Speed(compile=True, pack=True, shape_bucket=4), backend=BACKEND)
    assert set(model.state_dict()) == keys and model.pack and model.shape_bucket == 4

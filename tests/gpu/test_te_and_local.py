"""On CUDA, bf16: the TransformerEngine spec against the local one (same weights, forward and backward), a TE
training step that learns, a TE-trained checkpoint read by the local spec, and the KV-cached decoder against the
eager forward. Each compares against the other spec or the model's own forward (recurdepth.bench.gpu_check holds
the comparisons and their tolerances; `launch/gpu-check.sh` runs them at ~1B size)."""

from __future__ import annotations

import math

import pytest
import torch

from recurdepth.bench import gpu_check
from recurdepth.model.depth import BackpropWindow
from tests.gpu.conftest import SMALL


def test_te_and_local_specs_agree_in_bf16(te, run):
    row = gpu_check.check_te_vs_local(run)
    assert row.status == "ok", row
    assert "te vs local" in row.result


def test_bf16_te_training_step_runs_and_its_loss_falls(te, run):
    overrides = run.overrides(SMALL + ["optimizer.lr=3e-3", "optimizer.warmup_steps=1", "train.precision=bf16"])
    trainer, metrics = gpu_check.train_steps(run, gpu_check.BENCH_CONFIG, overrides, steps=8)
    assert trainer.dtype == torch.bfloat16 and trainer.device.type == "cuda"
    names = [n for n, _ in trainer.engine.module.named_parameters()]
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names), "not the TE spec"
    losses = [m.loss for m in metrics]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses


def test_te_checkpoint_loads_on_the_local_spec_with_equal_logits(te, run):
    row = gpu_check.check_checkpoint(run)
    assert row.status == "ok", row
    assert "model.spec=te" in row.result


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, gpu_check.TOLERANCE["decode"])])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_kv_cached_decoder_on_cuda_equals_the_eager_forward(spec, dtype, tol):
    from recurdepth.config import load_config
    from recurdepth.infer.decoder import DecodeOptions, LoopedDecoder
    from recurdepth.infer.loading import init_single_process
    from recurdepth.model.build import build_model

    if spec == "te" and not gpu_check.te_available():
        pytest.skip("transformer_engine not installed")
    cfg = load_config(gpu_check.BENCH_CONFIG, SMALL + [f"model.spec={spec}"])
    device = init_single_process(cfg)
    model = gpu_check._perturbed(build_model(cfg, 300, dtype, device)).eval()
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    r = cfg.recurrence.depth
    s0 = torch.zeros(24, 2, cfg.model.hidden_size, dtype=dtype, device=device)
    with torch.no_grad():
        ref = model(x, window=BackpropWindow(r, 0), s0=s0)
        dec = LoopedDecoder(model, 2, 24, DecodeOptions(depth=r, init="zeros"))
        out = torch.cat([dec.step(x[:, :10])] + [dec.step(x[:, t:t + 1]) for t in range(10, 24)], 1)
    assert out.device.type == "cuda"
    assert gpu_check.relative_diff(out, ref) <= tol
    with torch.no_grad():  # the comparison can fail: one iteration more is another function
        other = model(x, window=BackpropWindow(r + 1, 0), s0=s0)
    assert gpu_check.relative_diff(other, ref) > 2 * tol

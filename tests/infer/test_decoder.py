"""The KV-cached decoder against the model's own forward: prefill and token-by-token decoding give the same
logits; a shared cache with m = r is the per-iteration cache; eps = 0 early exit is full-depth decoding."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.infer.decoder import DecodeOptions, LoopedDecoder
from recurdepth.infer.generate import generate
from recurdepth.model.depth import BackpropWindow

VOCAB = 300


def make_model(*overrides, dtype=torch.float64):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.num_query_groups=2",
                             "model.seq_length=16", "model.prelude_layers=1", "model.core_layers=2",
                             "model.coda_layers=1", "model.embedding_scale=1.5", "model.initial_state=zeros",
                             *overrides])
    model = build_model(cfg, VOCAB, params_dtype=dtype)
    model.eval()
    return model


def tokens(b=2, s=12, seed=0):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def native(model, x, r):
    with torch.no_grad():
        return model(x, window=BackpropWindow(r, 0))


@pytest.mark.parametrize("r,extra", [(1, ()), (4, ()), (3, ("model.norm_before_coda=true",)),
                                     (2, ("model.block_norm=pre", "model.adapter=gate"))])
def test_prefill_and_incremental_decoding_equal_native_forward(megatron_single_process, r, extra):
    model = make_model(*extra)
    x = tokens()
    ref = native(model, x, r)
    full = LoopedDecoder(model, 2, 12, DecodeOptions(depth=r)).step(x)
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-10)
    dec = LoopedDecoder(model, 2, 12, DecodeOptions(depth=r))
    parts = [dec.step(x[:, :5])] + [dec.step(x[:, t:t + 1]) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), ref, rtol=0, atol=1e-10)
    assert (native(model, x, r + 1) - ref).abs().max() > 1e-6  # the comparison can fail


def test_shared_cache_with_m_equal_r_is_the_per_iteration_cache(megatron_single_process):
    model = make_model()
    x, r = tokens(), 4
    outs = {}
    for share in (None, r, 2):
        dec = LoopedDecoder(model, 2, 12, DecodeOptions(depth=r, kv_share=share))
        outs[share] = torch.cat([dec.step(x[:, :4])] + [dec.step(x[:, t:t + 1]) for t in range(4, 12)], 1)
    assert torch.equal(outs[None], outs[r])
    assert (outs[2] - outs[None]).abs().max() > 1e-8  # fewer slots than iterations: another computation
    torch.testing.assert_close(outs[2][:, :4], outs[None][:, :4], rtol=0, atol=0)  # same prefill


def test_exit_kl_zero_is_full_depth_and_positive_eps_exits_early(megatron_single_process):
    model = make_model()
    prompt = tokens(2, 5, seed=3)
    full = generate(model, prompt, 8, DecodeOptions(depth=6), eod=None)
    zero = generate(model, prompt, 8, DecodeOptions(depth=6, exit_kl=0.0), eod=None)
    assert torch.equal(full.tokens, zero.tokens)
    assert zero.mean_depth == 6.0
    early = generate(model, prompt, 8, DecodeOptions(depth=6, exit_kl=1e-2), eod=None)
    assert early.mean_depth < 6.0


def test_rows_that_exit_keep_their_state_and_cache(megatron_single_process):
    """With one row stopping early, the other row decodes exactly as it does alone."""
    model = make_model()
    prompt = tokens(2, 5, seed=4)
    both = generate(model, prompt, 6, DecodeOptions(depth=6, exit_kl=1e-3), eod=None)
    for row in range(2):
        alone = generate(model, prompt[row:row + 1], 6, DecodeOptions(depth=6, exit_kl=1e-3), eod=None)
        assert torch.equal(alone.tokens[0], both.tokens[row])


def test_warm_start_and_sampling(megatron_single_process):
    model = make_model()
    prompt = tokens(1, 5, seed=5)
    warm = generate(model, prompt, 6, DecodeOptions(depth=3, warm_start=True), eod=None)
    assert warm.tokens.shape == (1, 6)
    a = generate(model, prompt, 6, DecodeOptions(depth=3), eod=None, temperature=1.0, seed=1)
    b = generate(model, prompt, 6, DecodeOptions(depth=3), eod=None, temperature=1.0, seed=1)
    assert torch.equal(a.tokens, b.tokens)

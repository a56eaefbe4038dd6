"""The bench's plain-PyTorch baseline (recurdepth/bench/plain.py) computes the same function as the looped model:
with the model's weights copied in, the same per-token losses and gradients in float64 (so the speed ratio the
bench reports compares the same work)."""

from __future__ import annotations

import pytest
import torch

from recurdepth.bench.plain import copy_weights
from recurdepth.config import load_config

OVERRIDES = ["model.hidden_size=32", "model.num_heads=4", "model.prelude_layers=1", "model.core_layers=2",
             "model.coda_layers=1", "model.seq_length=16", "model.initial_state=zeros"]


@pytest.mark.parametrize("r,k", [(3, 2), (2, 2)])
def test_plain_baseline_is_the_same_function(megatron_single_process, r, k):
    from recurdepth.bench.plain import PlainLoopedModel
    from recurdepth.model.build import build_model
    from recurdepth.model.depth import BackpropWindow

    cfg = load_config(None, OVERRIDES)
    model = build_model(cfg, 300, torch.float64)
    plain = PlainLoopedModel(cfg, model.vocab_size).double()
    copy_weights(model, plain)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 16), generator=g)
    ours = model(tokens, window=BackpropWindow.of(r, k))  # logits [b, s, V] (the loss is megatron's, in fp32)
    theirs = plain.logits(tokens, r, k)
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-10)
    weights = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(plain.embedding.weight.grad, model.embedding.word_embeddings.weight.grad,
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(plain.core[1].fc2.weight.grad, model.core["1"].mlp.linear_fc2.weight.grad,
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(plain.adapter.weight.grad, model.adapter.proj.weight.grad, rtol=1e-9, atol=1e-11)


def test_the_huginn_reference_needs_a_checkout(tmp_path):
    from recurdepth.bench.reference import huginn_baseline
    from recurdepth.errors import ConfigError

    with pytest.raises(ConfigError, match="no recpre/raven_modeling_minimal.py there; pass a checkout of "
                                          "seal-rg/recurrent-pretraining"):
        huginn_baseline(None, str(tmp_path))

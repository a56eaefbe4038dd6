"""`train.compile`: the looped model with torch.compile'd blocks gives the eager model's loss and gradients."""

from __future__ import annotations

import torch

from recurdepth.model.depth import BackpropWindow
from tests.model.test_recurrence import batch, make_model


def loss_and_grads(model, tokens, labels):
    per_token = model(tokens, labels=labels, window=BackpropWindow.of(3, 2), sample_ids=[0, 1])
    loss = per_token.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_match_eager(megatron_single_process):
    from torch._dynamo.utils import counters

    tokens, labels = batch()
    _, eager = make_model(dtype=torch.float32)
    cfg, compiled = make_model("train.compile=true", dtype=torch.float32)
    assert cfg.train.compile
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = sum(counters["graph_break"].values())
    want, want_grads = loss_and_grads(eager, tokens, labels)
    got, got_grads = loss_and_grads(compiled, tokens, labels)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the blocks really ran through dynamo
    # one graph per block: a break (megatron's rank-0 warning, RoPE's strided out=) splits it and loses the fusion
    assert sum(counters["graph_break"].values()) == breaks_before, dict(counters["graph_break"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)

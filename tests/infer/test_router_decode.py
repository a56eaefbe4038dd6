"""Decoding a recursion_router model (`exit_router`): each position routed as the model was trained, the rows that
go on compacted, keys and values recursion-wise (at iteration i a token sees only the earlier positions that ran
iteration i). Against the training code's own routed forward over the whole sequence with the same causal
decisions (`RouterObjective.causal_forward`: gathered batches, no cache): logits 1e-10 in float64 and the same
iterations per token, prompt chunk and token-by-token steps alike; a batch equals each row decoded alone; and
the check fails when the decoder attends to the skipped iterations' filled keys instead (mutation below)."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.infer.decoder import DecodeOptions, LoopedDecoder
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import build_objective
from tests.infer.test_decoder import VOCAB, tokens

R = 4


def routed_model(mode: str, gating: str = "weighted"):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.num_query_groups=2",
                             "model.seq_length=16", "model.prelude_layers=1", "model.core_layers=2",
                             "model.coda_layers=1", "model.initial_state=zeros", "recurrence.sampler=fixed",
                             f"recurrence.depth={R}", "objective.kind=recursion_router", f"objective.router={mode}",
                             f"objective.router_gating={gating}"])
    model = build_model(cfg, VOCAB, params_dtype=torch.float64)
    with torch.no_grad():  # scores around 0: some tokens stop at every iteration
        model.recursion_router.weight.normal_(0, 0.4, generator=torch.Generator().manual_seed(11))
    model.eval()
    return cfg, model


def decode(model, x, prompt: int):
    dec = LoopedDecoder(model, x.shape[0], x.shape[1], DecodeOptions(depth=R, exit_router=True))
    parts = [dec.step(x[:, :prompt])] + [dec.step(x[:, t:t + 1]) for t in range(prompt, x.shape[1])]
    return torch.cat(parts, 1), dec.reached[:, :x.shape[1]]


@pytest.mark.parametrize("mode,gating", [("expert", "weighted"), ("token", "weighted"), ("expert", "none")])
def test_routed_decoding_equals_the_routed_forward_and_each_row_alone(megatron_single_process, mode, gating):
    cfg, model = routed_model(mode, gating)
    obj = build_objective(cfg, None)
    x = tokens(b=3, s=12, seed=4)
    with torch.no_grad():
        ref, runs = obj.causal_forward(model, x, BackpropWindow(R, 0), torch.zeros(12, 3, 32, dtype=torch.float64))
    got, reached = decode(model, x, prompt=5)
    assert torch.equal(reached.t().double(), runs)
    assert 0 < float(runs.mean()) < R and len(set(runs.flatten().tolist())) >= 3  # tokens really stop early
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for row in range(3):
        alone, _ = decode(model, x[row:row + 1], prompt=5)
        torch.testing.assert_close(alone, got[row:row + 1], rtol=0, atol=1e-10)


def test_the_recursion_wise_mask_is_what_matches_training(megatron_single_process, monkeypatch):
    """Mutation: without the mask over positions that skipped an iteration, a token reads their filled keys (the
    rule for the other exits) and the decoder no longer computes what the router was trained on."""
    cfg, model = routed_model("expert")
    obj = build_objective(cfg, None)
    x = tokens(b=2, s=10, seed=2)
    with torch.no_grad():
        ref, _ = obj.causal_forward(model, x, BackpropWindow(R, 0), torch.zeros(10, 2, 32, dtype=torch.float64))
    original = LoopedDecoder._attention

    def unmasked(self, layer, x_, name, start, iteration, rows):
        reached, self.reached = self.reached, None
        try:
            return original(self, layer, x_, name, start, iteration, rows)
        finally:
            self.reached = reached

    monkeypatch.setattr(LoopedDecoder, "_attention", unmasked)
    got, _ = decode(model, x, prompt=1)
    assert (got - ref).abs().max() > 1e-6


def test_router_decoding_refuses_what_it_cannot_do(megatron_single_process):
    _, model = routed_model("token")
    with pytest.raises(ValueError, match="exactly 4 iterations"):
        LoopedDecoder(model, 1, 8, DecodeOptions(depth=3, exit_router=True))
    with pytest.raises(ValueError, match="kv_share"):
        LoopedDecoder(model, 1, 8, DecodeOptions(depth=4, exit_router=True, kv_share=2))
    from tests.infer.test_decoder import make_model

    with pytest.raises(ValueError, match="objective.kind=recursion_router"):
        LoopedDecoder(make_model(), 1, 8, DecodeOptions(depth=4, exit_router=True))

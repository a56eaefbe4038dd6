"""The looped model against an explicitly unrolled float64 reference, and truncated backprop against a
reference that detaches the state entering the last k iterations."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.model.depth import BackpropWindow
from tests.model.reference import reference_logits

VOCAB = 300


def make_model(*overrides, dtype=torch.float64):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.num_query_groups=2",
                             "model.seq_length=16", "model.prelude_layers=1", "model.core_layers=2",
                             "model.coda_layers=1", "model.embedding_scale=1.5", *overrides])
    return cfg, build_model(cfg, VOCAB, params_dtype=dtype)


def batch(seed=0, b=2, s=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s), generator=g), torch.randint(0, VOCAB, (b, s), generator=g)


@pytest.mark.parametrize("r,k", [(1, 1), (3, 5), (6, 6)])
def test_forward_equals_unrolled_reference(megatron_single_process, r, k):
    cfg, model = make_model()
    tokens, _ = batch()
    sample_ids = [7, 8]
    logits = model(tokens, window=BackpropWindow.of(r, k), sample_ids=sample_ids)
    s0 = model.initial_state(torch.zeros(16, 2, 32, dtype=torch.float64), sample_ids).transpose(0, 1)
    sd = {name: t.detach() for name, t in model.state_dict().items() if torch.is_tensor(t) and t.dtype == torch.float64}
    ref = reference_logits(sd, cfg, tokens, s0, r)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits[..., :VOCAB], ref[..., :VOCAB], rtol=0, atol=1e-10)


def test_reference_sees_a_wrong_depth(megatron_single_process):
    """The comparison above can fail: one iteration more changes the logits far beyond 1e-10."""
    cfg, model = make_model()
    tokens, _ = batch()
    logits = model(tokens, window=BackpropWindow.of(3, 3), sample_ids=[0, 1])
    s0 = model.initial_state(torch.zeros(16, 2, 32, dtype=torch.float64), [0, 1]).transpose(0, 1)
    sd = {n: t.detach() for n, t in model.state_dict().items() if torch.is_tensor(t) and t.dtype == torch.float64}
    assert (logits - reference_logits(sd, cfg, tokens, s0, 4)).abs().max() > 1e-4


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_truncated_backprop_matches_detached_reference(megatron_single_process):
    cfg, model = make_model()
    tokens, labels = batch(1)
    r, k = 5, 2
    model.zero_grad()
    model(tokens, labels=labels, window=BackpropWindow.of(r, k), sample_ids=[0, 1]).sum().backward()
    truncated = _grads(model)

    def reference(detach: bool):
        model.zero_grad()
        e = model.embed(tokens)
        state = model.initial_state(e, [0, 1])
        rope = model.rope(tokens.shape[1])
        for _ in range(r - k):  # with autograd on: the detach alone must cut them off
            state = model.core_step(state, e, rope)
        if detach:
            state = state.detach()
        for _ in range(k):
            state = model.core_step(state, e, rope)
        model.head(state, labels).sum().backward()
        return _grads(model)

    ref = reference(detach=True)
    assert truncated.keys() == ref.keys() == {n for n, _ in model.named_parameters()}
    for name in ref:
        torch.testing.assert_close(truncated[name], ref[name], rtol=0, atol=1e-12, msg=name)
    assert truncated["prelude.0.self_attention.linear_qkv.weight"].abs().sum() > 0  # through the injected e
    full = reference(detach=False)  # and the test can fail: full backprop gives other core gradients
    assert (full["core.0.mlp.linear_fc1.weight"] - ref["core.0.mlp.linear_fc1.weight"]).abs().max() > 1e-8


def test_saved_activations_do_not_grow_with_r(megatron_single_process):
    """Autograd keeps the tensors of the last k iterations only: the no-grad trips save nothing."""
    _, model = make_model(dtype=torch.float32)
    tokens, labels = batch(2)

    def saved_bytes(r, k):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, labels=labels, window=BackpropWindow.of(r, k), sample_ids=[0, 1]).sum()
        loss.backward()
        return total

    assert saved_bytes(32, 4) == saved_bytes(4, 4)
    assert saved_bytes(8, 8) > 1.5 * saved_bytes(4, 4)


def test_iteration_checkpointing_gives_identical_gradients(megatron_single_process):
    tokens, labels = batch(3)
    grads = []
    for flag in ("false", "true"):
        _, model = make_model(f"recurrence.checkpoint_iterations={flag}")
        model(tokens, labels=labels, window=BackpropWindow.of(4, 3), sample_ids=[0, 1]).sum().backward()
        grads.append(_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("option", ["model.adapter=add", "model.adapter=gate", "model.block_norm=pre",
                                    "model.initial_state=zeros", "model.tie_embeddings=false",
                                    "model.activation=gelu"])
def test_options_train_every_parameter(megatron_single_process, option):
    _, model = make_model(option)
    tokens, labels = batch(4)
    model(tokens, labels=labels, window=BackpropWindow.of(3, 1), sample_ids=[0, 1]).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_initial_state_depends_on_sample_not_batch_layout(megatron_single_process):
    _, model = make_model()
    e = torch.zeros(16, 4, 32, dtype=torch.float64)
    whole = model.initial_state(e, [10, 11, 12, 13])
    part = model.initial_state(e[:, :2], [12, 13])
    torch.testing.assert_close(whole[:, 2:], part, rtol=0, atol=0)
    assert not torch.equal(whole[:, 0], whole[:, 1])
    std = model.state_std * 1.5
    assert whole.abs().max() <= 3 * std + 1e-12  # truncated at 3 sigma, scaled by embedding_scale


def test_recurrence_health_metrics(megatron_single_process):
    _, model = make_model()
    tokens, _ = batch(5)
    model(tokens, window=BackpropWindow.of(3, 3), sample_ids=[0, 1], collect_health=True)
    h = model.last_health
    assert set(h) == {"rel_residual", "state_norm", "token_cosine"}
    assert 0 < float(h["rel_residual"]) and float(h["state_norm"]) > 0 and -1 <= float(h["token_cosine"]) <= 1

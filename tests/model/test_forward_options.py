"""The forward's optional inputs used by objectives and inference: explicit position ids and attention
masks, ready token embeddings, and the final hidden state."""

from __future__ import annotations

import torch

from recurdepth.model.depth import BackpropWindow
from tests.model.test_recurrence import VOCAB, batch, make_model

W = BackpropWindow.of(3, 3)


def test_permuted_tokens_with_their_positions_and_mask_give_permuted_logits(megatron_single_process):
    """Feeding the tokens in a shuffled order, each with its true position and a mask that lets it see exactly
    the tokens before it in the true order, must reproduce the causal forward's logits row for row. This needs
    both the position ids (RoPE) and the mask to reach every block: dropping either changes the logits."""
    cfg, model = make_model("model.initial_state=zeros")
    tokens, _ = batch()
    s = tokens.shape[1]
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(3))
    mask = perm[None, :] > perm[:, None]  # query j may see key j' iff perm[j'] <= perm[j]; True = masked
    plain = model(tokens, window=W)
    shuffled = model(tokens[:, perm], window=W, position_ids=perm, attention_mask=mask)
    torch.testing.assert_close(shuffled, plain[:, perm], rtol=0, atol=1e-10)
    no_positions = model(tokens[:, perm], window=W, attention_mask=mask)
    assert (no_positions - plain[:, perm]).abs().max() > 1e-4
    no_mask = model(tokens[:, perm], window=W, position_ids=perm)
    assert (no_mask - plain[:, perm]).abs().max() > 1e-4


def test_causal_mask_and_default_positions_equal_the_default_forward(megatron_single_process):
    cfg, model = make_model()
    tokens, _ = batch()
    s = tokens.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    plain = model(tokens, window=W, sample_ids=[0, 1])
    explicit = model(tokens, window=W, sample_ids=[0, 1], position_ids=torch.arange(s), attention_mask=causal)
    torch.testing.assert_close(explicit, plain, rtol=0, atol=1e-12)


def test_inputs_embeds_and_hidden_state(megatron_single_process):
    cfg, model = make_model()
    tokens, labels = batch()
    plain = model(tokens, window=W, sample_ids=[0, 1])
    embeds = model.token_embeddings(tokens)
    via_embeds, hidden = model(None, window=W, sample_ids=[0, 1], inputs_embeds=embeds, return_hidden=True)
    torch.testing.assert_close(via_embeds, plain, rtol=0, atol=1e-12)
    logits = hidden @ model.shared_embedding_or_output_weight().t()
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-10)
    # gradients reach a spliced-in vector through inputs_embeds
    embeds = embeds.detach().requires_grad_(True)
    model(None, labels, window=W, sample_ids=[0, 1], inputs_embeds=embeds).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_rms_norm_equals_torchs_in_value_and_gradient():
    """The CPU RMSNorm autograd function (`layers.RMSNorm`) against torch's own, fp64, random weight: output and both
    gradients to 1e-12, and torch's numerical gradient check. Fails if rstd, the mean term of dx or dw is wrong."""
    from recurdepth.model.layers import RMSNorm

    ours = RMSNorm(24, eps=1e-5, dtype=torch.float64)
    torch.nn.init.normal_(ours.weight)
    ref = torch.nn.RMSNorm(24, eps=1e-5, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 3, 24, dtype=torch.float64)
    got, want = ours(x), ref(x)
    assert got.grad_fn is not None and "RMSNormFunction" in type(got.grad_fn).__name__  # ours ran, not torch's
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [x, ours.weight], grad), torch.autograd.grad(want, [x, ref.weight], grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x[:2, :2].detach().requires_grad_(),))

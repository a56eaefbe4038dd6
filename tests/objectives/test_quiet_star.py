"""Quiet-STaR: the thought streams' block mask, the loss at the mixing head's initial value, the REINFORCE
gradient against a reference that runs each thought stream as its own causal sequence, and per-thought
checkpointing. Float64 toy models (tests/model/test_recurrence.py's shapes)."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.data.pipeline import MicroBatch
from recurdepth.data.tokenizer import ByteTokenizer
from recurdepth.errors import ConfigError
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import LMObjective, build_objective
from recurdepth.parallel.passes import StageLink
from recurdepth.objectives.quiet_star import reinforce_surrogate, stream_mask, stream_positions
from tests.model.test_recurrence import make_model

W = BackpropWindow.of(3, 2)
TOK = ByteTokenizer()


def setup(*overrides, b=2, s=8, seed=0):
    cfg, model = make_model("objective.kind=quiet_star", *overrides)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (b, s), generator=g)
    labels = torch.randint(0, 256, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.2).double()
    return cfg, model, build_objective(cfg, TOK), MicroBatch(tokens, labels, mask, list(range(10, 10 + b)))


def perturb_mixing_head(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.quiet_star.mix_out.copy_(torch.randn(model.quiet_star.mix_out.shape, generator=g, dtype=torch.float64))
        model.quiet_star.mix_out_bias.fill_(0.3)


def stream_logits(obj, model, mb, thoughts):
    """Logits `[rows, blocks, s, V]` of every stream block for the given thoughts."""
    tokens = mb.tokens.repeat(obj.passes, 1)
    ids = list(mb.sample_ids) * obj.passes
    s0 = obj.initial_state(model, tokens, ids)
    blocks = obj.T + 2 + obj.n_ahead
    logits, _ = obj.run_streams(model, StageLink(), tokens, thoughts, s0, blocks, W)
    return logits.reshape(tokens.shape[0], blocks, tokens.shape[1], -1)


def test_stream_mask_and_positions():
    s, blocks = 3, 3
    mask = stream_mask(s, blocks)
    allowed = set()
    for jq in range(blocks):
        for iq in range(s):
            for jk in range(blocks):
                for ik in range(s):
                    if (jk == 0 and ik <= iq) or (jq >= 1 and 1 <= jk <= jq and ik == iq):
                        allowed.add((jq * s + iq, jk * s + ik))
    expected = torch.ones(s * blocks, s * blocks, dtype=torch.bool)
    for q, k in allowed:
        expected[q, k] = False
    assert torch.equal(mask, expected)
    assert stream_positions(s, blocks).tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4]


def test_a_thought_token_is_seen_by_its_own_stream_only(megatron_single_process):
    cfg, model, obj, mb = setup("objective.thought_length=3", "objective.n_ahead=2")
    rows, s = 2 * mb.tokens.shape[0], mb.tokens.shape[1]
    thoughts = torch.randint(0, 256, (rows, 3, s), generator=torch.Generator().manual_seed(5))
    changed = thoughts.clone()
    row, pos, step = 1, 4, 1  # thought token t_2 of position 4 (block 3)
    changed[row, step, pos] = (changed[row, step, pos] + 7) % 256
    a, b = stream_logits(obj, model, mb, thoughts), stream_logits(obj, model, mb, changed)
    diff = (a - b).abs().amax(-1)  # [rows, blocks, s]
    untouched = torch.ones_like(diff, dtype=torch.bool)
    untouched[row, step + 2:, pos] = False  # the blocks after the changed one, in its own stream
    assert diff[untouched].max() == 0
    assert diff[row, step + 2:, pos].min() > 1e-6


def test_a_future_token_changes_no_earlier_thought(megatron_single_process):
    # a low temperature lets the logits, not the noise, pick the thoughts (so changed logits show)
    cfg, model, obj, mb = setup("objective.thought_length=3", "objective.n_ahead=2",
                                "objective.thought_temperature=0.001")
    s, q = mb.tokens.shape[1], 5
    future = MicroBatch(mb.tokens.clone(), mb.labels, mb.loss_mask, mb.sample_ids)
    future.tokens[:, q] = (future.tokens[:, q] + 11) % 256
    t_a = obj.terms(model, mb, W, StageLink()).thoughts
    t_b = obj.terms(model, future, W, StageLink()).thoughts
    assert torch.equal(t_a[..., :q], t_b[..., :q])  # the sampled thoughts of positions < q
    assert not torch.equal(t_a[..., q:], t_b[..., q:])
    a, b = stream_logits(obj, model, mb, t_a), stream_logits(obj, model, future, t_a)
    thought_blocks = slice(0, obj.T + 2)  # real tokens, start, thoughts, end (the talk blocks see x_{i+1}..)
    assert (a - b)[:, thought_blocks, :q].abs().max() == 0
    assert (a - b)[:, thought_blocks, q:].abs().max() > 1e-6


def test_loss_equals_the_base_lm_loss_at_the_initial_mixing_weight(megatron_single_process):
    cfg, model, obj, mb = setup("objective.thought_length=2", "objective.n_ahead=3")
    assert model.quiet_star.mix_out.abs().max() == 0 and model.quiet_star.mix_out_bias.item() == 0
    lm = LMObjective().loss_sum(model, mb, W)
    qs = obj.loss_sum(model, mb, W)
    assert torch.equal(qs, lm)
    terms = obj.terms(model, mb, W, StageLink())
    assert torch.equal(terms.talk_loss, terms.base_loss.expand_as(terms.talk_loss))
    perturb_mixing_head(model)  # the comparison can fail: with w != 0 the loss moves
    assert (obj.loss_sum(model, mb, W) - lm).abs() > 1e-6


def test_reinforce_surrogate_by_hand():
    logp = torch.tensor([[[-1.0, -2.0]], [[-0.5, -3.0]]], dtype=torch.float64, requires_grad=True)  # [2 passes, 1, 2]
    reward = torch.tensor([[[1.0, 4.0]], [[3.0, -2.0]]], dtype=torch.float64)
    reinforce_surrogate(logp, reward, 0.5).backward()
    # baseline per position: mean over passes (2, 1); advantage [[-1, 3], [1, -3]]; d/dlogp = -0.5 * A / 2
    assert logp.grad.tolist() == [[[0.25, -0.75]], [[-0.25, 0.75]]]


def test_reinforce_gradient_matches_a_per_stream_reference(megatron_single_process):
    """Two positions, two passes: each thought stream re-run on its own as an ordinary causal sequence
    [x_0..x_i, start, t_1, t_2, end, x_{i+1}] (default mask, explicit positions) gives the thought
    log-probabilities and talk losses; REINFORCE computed from them by hand must give the objective's gradient."""
    cfg, model, obj, mb = setup("objective.thought_length=2", "objective.n_ahead=2", "model.initial_state=zeros",
                                b=1, s=2)
    perturb_mixing_head(model)
    terms = obj.terms(model, mb, W, StageLink())
    model.zero_grad()
    terms.surrogate.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    x, labels, mask = mb.tokens[0], mb.labels[0], mb.loss_mask[0]
    _, base_h = model(mb.tokens, labels=mb.labels, window=W, return_hidden=True)
    base_h = base_h[0].detach()  # [s, h]
    start, end = model.quiet_star.thought_embeddings
    bias = obj.sampling_bias(model.vocab_size, "cpu")
    logp, talk = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, 2, dtype=torch.float64)  # talk[p, k, label]
    logp_terms = {}
    for p in range(2):
        for i in range(2):
            t = terms.thoughts[p, :, i]
            nxt = x[i + 1:i + 2] if i + 1 < 2 else torch.tensor([TOK.pad])
            emb = torch.cat([model.token_embeddings(x[None, :i + 1])[0], start[None],
                             model.token_embeddings(t[None])[0], end[None], model.token_embeddings(nxt[None])[0]])
            pos = torch.cat([torch.arange(i + 1), i + 1 + torch.arange(5)])
            logits, hid = model(None, window=W, inputs_embeds=emb[None], position_ids=pos, return_hidden=True)
            lp = (logits[0] / cfg.objective.thought_temperature + bias).log_softmax(-1)
            logp_terms[p, i] = lp[i + 1, t[0]] + lp[i + 2, t[1]]  # start predicts t_1, t_1 predicts t_2
            logp[p, i] = logp_terms[p, i].detach()
            for k in range(2):  # end (k = 0) and x_{i+1} (k = 1) predict label i + k
                if i + k < 2:
                    h = hid[0, i + 4 + k].detach()  # end sits at i + 4
                    w = model.quiet_star.mixing_weight(base_h[i + k], h)
                    mixed = base_h[i + k] + w * (h - base_h[i + k])
                    z = mixed @ model.shared_embedding_or_output_weight().t()
                    talk[p, k, i + k] = (z.logsumexp(-1) - z[labels[i + k]]).detach()
    torch.testing.assert_close(terms.logp[:, 0], logp, rtol=0, atol=1e-10)
    reward = torch.stack([-(mask[0] * talk[:, 0, 0] + mask[1] * talk[:, 1, 1]), -mask[1] * talk[:, 0, 1]], 1)
    torch.testing.assert_close(terms.reward[:, 0], reward, rtol=1e-6, atol=0)  # megatron's CE is float32
    reward = terms.reward[:, 0].double()  # equal to the reference's to float32 precision; A = R - mean cancels
    advantage = reward - reward.mean(0, keepdim=True)
    weight = cfg.objective.reinforce_weight
    surrogate = sum(-weight * advantage[p, i] * logp_terms[p, i] / 2 for p in range(2) for i in range(2))
    surrogate.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert advantage.abs().max() > 1e-6 and got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12, msg=name)


def test_checkpointed_thoughts_give_the_same_loss_and_gradients(megatron_single_process):
    grads = []
    for ckpt in ("false", "true"):
        cfg, model, obj, mb = setup("objective.thought_length=2", "objective.n_ahead=2",
                                    f"objective.checkpoint_thoughts={ckpt}")
        perturb_mixing_head(model)
        loss = obj.loss_sum(model, mb, W)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-10)
    assert g0.keys() == g1.keys() and "quiet_star.thought_embeddings" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("overrides,key", [
    (["objective.n_passes=1"], "objective.n_passes"),
    (["objective.n_ahead=16"], "objective.n_ahead"),
    (["objective.checkpoint_thoughts=true", "parallel.pipeline=2"], "objective.checkpoint_thoughts"),
])
def test_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["objective.kind=quiet_star", "model.seq_length=16", *overrides])


@pytest.mark.parametrize("extra", [(), ("recurrence.checkpoint_iterations=true",), ("objective.stream_attention=dense",)])
def test_cached_block_sparse_streams_equal_the_dense_reference(megatron_single_process, extra):
    """The block-sparse attention (sampling: block j alone over the cached keys/values of blocks < j; the final
    pass: every block at once) against the dense masked SDPA that reruns the growing prefix (the implementation
    before it, `dense_streams`): the same sampled thoughts, loss, REINFORCE terms and gradients (float64,
    truncated window r=3 k=2, grouped-query heads, samples seeded apart)."""
    cfg, model, obj, mb = setup("objective.thought_length=3", "objective.n_ahead=3", *extra, s=16)
    perturb_mixing_head(model)
    runs = []
    for dense in (True, False):
        obj.dense_streams = dense
        model.zero_grad()
        terms = obj.terms(model, mb, W, StageLink())
        obj.total(terms).backward()
        runs.append((terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, got_grads) = runs
    assert torch.equal(got.thoughts, ref.thoughts)
    assert len(set(ref.thoughts.flatten().tolist())) > 3  # sampled, not a constant
    for name in ("nll_sum", "logp", "talk_loss", "reward"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-10, msg=name)
    assert ref_grads.keys() == got_grads.keys() and "quiet_star.thought_embeddings" in ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=0, atol=1e-10, msg=name)

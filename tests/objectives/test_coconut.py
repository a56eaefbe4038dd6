"""Coconut: the stage layout of the data, exactly k*c + 1 forward passes per stage-k micro-batch (counted on the
model), a gradient from the answer loss into the first continuous thought, a fed-back thought that really is
the hidden state, the KV-cached passes against the recomputing ones (loss and every gradient, float64), and
determinism of the problem draw."""

from __future__ import annotations

import copy

import pytest
import torch

import recurdepth.objectives.coconut as coconut

from recurdepth.config import load_config
from recurdepth.data.pipeline import build_datasets, micro_batches
from recurdepth.data.stepwise import Problem, StageLayout, encode_problem
from recurdepth.data.tokenizer import ByteTokenizer
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import build_objective

IDS = ByteTokenizer().special_ids
C, MAX_STAGE = 2, 2
WINDOW = BackpropWindow.of(3, 2)


def build(data_cache, *overrides):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=80",
                             "model.prelude_layers=1", "model.core_layers=2", "model.coda_layers=1",
                             "objective.kind=coconut", f"objective.coconut_thoughts_per_step={C}",
                             f"objective.coconut_max_stage={MAX_STAGE}", "objective.coconut_stage_steps=10",
                             f"data.cache_dir={data_cache}",
                             "data.sources=[{procedural: multiplication, n: 200, difficulty: {max_digits: 2}}]",
                             *overrides])
    data = build_datasets(cfg, 32, 8)
    model = build_model(cfg, data.tokenizer.vocab_size, params_dtype=torch.float64)
    return cfg, data, model


@pytest.fixture(scope="module")
def setup(megatron_single_process, data_cache):
    return build(data_cache)


@pytest.fixture(scope="module")
def gqa_setup(megatron_single_process, data_cache):
    """Grouped-query attention (2 key/value heads for 4 queries) with megatron's own core attention, and an
    embedding scale (the fed-back thought and s_0 are scaled too)."""
    return build(data_cache, "model.num_query_groups=2", "model.attention=megatron", "model.embedding_scale=2.0")


def heads_counted(model):
    """Count the model's real forward passes: one output-layer call each."""
    calls = [0]
    handle = model.output_layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 5])
def test_stage_k_runs_k_c_plus_one_passes(setup, stage):
    cfg, data, model = setup
    objective = build_objective(cfg, data.tokenizer)
    objective.set_step(stage * 10 + 3)
    mb = micro_batches(data.train, 0, 4, 4, 0, 1)[0]
    calls, handle = heads_counted(model)
    try:
        loss = objective.loss_sum(model, mb, WINDOW)
    finally:
        handle.remove()
    expected = min(stage, MAX_STAGE) * C + 1
    assert calls[0] == objective.forward_passes == expected
    assert torch.isfinite(loss) and loss > 0


def test_gradient_flows_from_the_answer_into_the_first_thought(setup):
    cfg, data, model = setup
    objective = build_objective(cfg, data.tokenizer)
    objective.set_step((MAX_STAGE + 1) * 10)  # every step latent: the loss is the answer's (and eod's) only
    mb = micro_batches(data.train, 4, 4, 4, 0, 1)[0]
    tokens, labels, mask, first = objective.encode(mb, "cpu")
    eot = first + MAX_STAGE * C
    assert (tokens[torch.arange(4), eot] == IDS["<eot>"]).all()
    for row in range(4):  # the targets are exactly the answer digits and eod
        answer = list(mb.problems[row].answer)
        assert labels[row][mask[row] == 1].tolist() == answer
    grads = {}
    objective.on_thought = lambda i, t: t.register_hook(lambda g, i=i: grads.__setitem__(i, g.norm().item()))
    model.zero_grad()
    objective.loss_sum(model, mb, WINDOW).backward()
    assert sorted(grads) == list(range(MAX_STAGE * C))
    assert grads[0] > 0 and all(g > 0 for g in grads.values())


def test_the_fed_back_thought_is_the_hidden_state_before_the_latent(setup):
    """Pass 1's thought equals the plain model's final hidden state at the <bot> position (the prefix run
    alone), and pass 2 sees it: replacing the latent's embedding by it reproduces pass 2's thought."""
    cfg, data, model = setup
    objective = build_objective(cfg, data.tokenizer)
    objective.set_step(10)  # stage 1: C latents
    mb = micro_batches(data.train, 8, 2, 2, 0, 1)[0]
    thoughts = {}
    objective.on_thought = lambda i, t: thoughts.__setitem__(i, t.detach())
    with torch.no_grad():
        objective.loss_sum(model, mb, WINDOW)
        tokens, _, _, first = objective.encode(mb, "cpu")
        rows = torch.arange(2)
        embeds = model.token_embeddings(tokens)
        _, hidden = model(None, window=WINDOW, sample_ids=mb.sample_ids, inputs_embeds=embeds, return_hidden=True)
        torch.testing.assert_close(thoughts[0], hidden[rows, first - 1], rtol=0, atol=1e-10)
        embeds = embeds.index_put((rows, first), thoughts[0])
        _, hidden = model(None, window=WINDOW, sample_ids=mb.sample_ids, inputs_embeds=embeds, return_hidden=True)
        torch.testing.assert_close(thoughts[1], hidden[rows, first], rtol=0, atol=1e-10)


def loss_and_grads(cfg, data, model, mb, step: int, window: BackpropWindow, kv_cache: bool):
    cfg = copy.deepcopy(cfg)
    cfg.objective.coconut_kv_cache = kv_cache
    objective = build_objective(cfg, data.tokenizer)
    objective.set_step(step)
    model.zero_grad()
    loss = objective.loss_sum(model, mb, window)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("step,window", [(20, BackpropWindow.of(4, 2)), (30, BackpropWindow.of(3, 3)),
                                         (20, BackpropWindow.of(3, 1))])
@pytest.mark.parametrize("model_setup", ["setup", "gqa_setup"])
def test_kv_cached_passes_equal_the_recomputed_prefix(request, monkeypatch, model_setup, step, window):
    """Stage 2 (c = 2: 4 latents, a language step left) and stage 3 (every step latent), with r > k (the
    no-grad iterations' keys and values cached without gradient) and r = k, on a batch whose questions differ in
    length (pass i starts at the earliest changed latent; rows whose latent lies later recompute theirs): the
    cached passes give the recomputing passes' loss and every parameter gradient to 1e-10 (a float64 model; the
    per-token losses, float32 from megatron's cross entropy, are summed in float64 here, where the objective sums
    them in float32, whose rounding depends on the sum's shape: the last pass's covers fewer positions)."""
    cfg, data, model = request.getfixturevalue(model_setup)
    monkeypatch.setattr(coconut, "masked_loss_sum", lambda per_token, mask: (per_token.double() * mask).sum())
    mb = micro_batches(data.train, 0, 4, 4, 0, 1)[0]
    first = build_objective(cfg, data.tokenizer).encode(mb, "cpu")[3]
    assert first.unique().numel() > 1, "the batch should mix question lengths"
    loss, grads = loss_and_grads(cfg, data, model, mb, step, window, kv_cache=True)
    ref_loss, ref_grads = loss_and_grads(cfg, data, model, mb, step, window, kv_cache=False)
    assert loss.dtype == torch.float64 and loss > 0
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    assert grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, grad in grads.items():
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-10, msg=name)


def test_kv_cached_passes_compute_only_the_changed_positions(setup):
    """Pass i (1-based) computes [min f + i - 2, max f + i - 1) (from 0 for the first), the last pass from the
    earliest last latent to s; without the cache every pass starts at 0."""
    cfg, data, model = setup
    objective = build_objective(cfg, data.tokenizer)
    objective.set_step(20)  # 4 latents
    first, s = torch.tensor([7, 9, 8]), 80
    assert objective.spans(first, s, model, cached=True) == [(0, 9), (7, 10), (8, 11), (9, 12), (10, 80)]
    assert objective.spans(first, s, model, cached=False) == [(0, 9), (0, 10), (0, 11), (0, 12), (0, 80)]
    objective.set_step(0)
    assert objective.spans(first, s, model, cached=True) == [(0, 80)]


def test_stage_layouts():
    problem = Problem(question=(1, 2, 3), steps=((4, 4), (5,), (6, 6, 6)), answer=(7, 8))
    for stage, latents, kept in [(0, 0, [4, 4, 5, 6, 6, 6]), (1, 2, [5, 6, 6, 6]), (2, 4, [6, 6, 6]), (3, 4, [])]:
        tokens, labels, mask, first = encode_problem(problem, StageLayout.of(stage, C, MAX_STAGE), IDS, 20, 0)
        seq = [1, 2, 3, IDS["<bot>"], *[IDS["<latent>"]] * latents, IDS["<eot>"], *kept, 7, 8]
        assert tokens.tolist()[:len(seq)] == seq and first == 4
        assert labels[mask == 1].tolist() == [*kept, 7, 8]  # loss after <eot> only


def test_problem_draw_is_deterministic_and_split(setup):
    cfg, data, _ = setup
    again = build_datasets(cfg, 32, 8)
    assert [again.train.problem(i) for i in range(32)] == [data.train.problem(i) for i in range(32)]
    train = {data.train.problem(i).question for i in range(len(data.train))}
    assert not train & {data.valid.problem(i).question for i in range(len(data.valid))}

"""Coconut: the stage layout of the data, exactly k*c + 1 forward passes per stage-k micro-batch (counted on the
model), a gradient from the answer loss into the first continuous thought, a fed-back thought that really is
the hidden state, and determinism of the problem draw."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.data.pipeline import build_datasets, micro_batches
from recurdepth.data.stepwise import Problem, StageLayout, encode_problem
from recurdepth.data.tokenizer import ByteTokenizer
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import build_objective

IDS = ByteTokenizer().special_ids
C, MAX_STAGE = 2, 2
WINDOW = BackpropWindow.of(3, 2)


@pytest.fixture(scope="module")
def setup(megatron_single_process, data_cache):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=80",
                             "model.prelude_layers=1", "model.core_layers=2", "model.coda_layers=1",
                             "objective.kind=coconut", f"objective.coconut_thoughts_per_step={C}",
                             f"objective.coconut_max_stage={MAX_STAGE}", "objective.coconut_stage_steps=10",
                             f"data.cache_dir={data_cache}",
                             "data.sources=[{procedural: multiplication, n: 200, difficulty: {max_digits: 2}}]"])
    data = build_datasets(cfg, 32, 8)
    model = build_model(cfg, data.tokenizer.vocab_size, params_dtype=torch.float64)
    return cfg, data, model


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

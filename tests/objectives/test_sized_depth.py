"""Per-sample depth (objective.kind=depth_by_size): a batch whose rows run different r, each with its own truncated
window, equals each row run alone through the plain loop at its own r (float64, loss and every gradient at
1e-10); controls show the test tells per-row depth apart from one r for all rows. The data: one procedural
problem per sequence with its size, encoded as evaluation decodes it; bad settings refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import build_objective

BASE = ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=64", "model.prelude_layers=1",
        "model.core_layers=2", "model.coda_layers=1", "recurrence.sampler=fixed", "recurrence.depth=4",
        "objective.kind=depth_by_size", "objective.depth_offset=1",
        "data.sources=[{procedural: hops, n: 200, difficulty: {min_hops: 1, max_hops: 4}}]"]


def build(*overrides, rows: int = 6):
    from recurdepth.data.pipeline import build_datasets, micro_batches
    from recurdepth.model.build import build_model

    cfg = load_config(None, [*BASE, *overrides])
    data = build_datasets(cfg, 32, 8)
    model = build_model(cfg, data.tokenizer.vocab_size, params_dtype=torch.float64)
    # megatron's cross-entropy runs in float32: both sides use float64 cross-entropy on the model's logits
    model.compute_language_model_loss = lambda labels, logits: torch.nn.functional.cross_entropy(
        logits.permute(1, 2, 0), labels, reduction="none")
    mb = micro_batches(data.train, 0, rows, rows, 0, 1, torch.device("cpu"))[0]
    return cfg, data, model, mb


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def each_row_alone(model, mb, depths, k):
    """The restatement: row b through the plain loop (`forward`, `recur`) by itself, r_b iterations, gradients
    through its last min(r_b, k); the losses summed."""
    total = 0.0
    for b, r in enumerate(depths):
        per_token = model(mb.tokens[b:b + 1], labels=mb.labels[b:b + 1], window=BackpropWindow.of(r, k),
                          sample_ids=mb.sample_ids[b:b + 1])
        total = total + (per_token * mb.loss_mask[b:b + 1]).sum()
    return total


@pytest.mark.parametrize("k", [1, 2, 8])
def test_rows_at_their_own_depth_equal_each_row_alone(megatron_single_process, k):
    cfg, data, model, mb = build(f"recurrence.backprop_depth={k}")
    obj = build_objective(cfg, data.tokenizer)
    depths = [obj.depth(n) for n in mb.sizes]
    assert len(set(depths)) >= 3, depths  # rows of several depths in the batch
    ours = obj.loss_sum(model, mb, BackpropWindow.of(4, k))
    g_ours = grads(model, ours)
    theirs = each_row_alone(model, mb, depths, k)
    g_theirs = grads(model, theirs)
    assert math.isclose(ours.item(), theirs.item(), rel_tol=0, abs_tol=1e-10), (ours.item(), theirs.item())
    assert g_ours.keys() == g_theirs.keys() and any(n.startswith("core.") for n in g_ours)
    for n in g_ours:
        assert torch.allclose(g_ours[n], g_theirs[n], atol=1e-10, rtol=0), n
    # controls: every row at the batch's largest r, and every row's gradients through the last k of that r
    one_r = (model(mb.tokens, labels=mb.labels, window=BackpropWindow.of(max(depths), k), sample_ids=mb.sample_ids)
             * mb.loss_mask).sum()
    assert abs(one_r.item() - ours.item()) > 1e-3


def test_without_gradients_the_rows_equal_each_row_alone(megatron_single_process):
    cfg, data, model, mb = build()
    obj = build_objective(cfg, data.tokenizer)
    depths = [obj.depth(n) for n in mb.sizes]
    with torch.no_grad():
        ours = obj.loss_sum(model, mb, BackpropWindow(4, 0))  # evaluation: the trainer's window without grad
        theirs = each_row_alone(model, mb, depths, 0)
    assert math.isclose(ours.item(), theirs.item(), rel_tol=0, abs_tol=1e-10)


def test_the_window_is_each_rows_own(megatron_single_process):
    """k = 1 with rows of r = 2..5: each row's gradient flows through its own last iteration only. Run as one
    window over the batch's largest r (rows not truncated at their own end) it differs."""
    cfg, data, model, mb = build("recurrence.backprop_depth=1")
    obj = build_objective(cfg, data.tokenizer)
    depths = [obj.depth(n) for n in mb.sizes]
    ours = grads(model, obj.loss_sum(model, mb, BackpropWindow.of(4, 1)))
    wider = grads(model, each_row_alone(model, mb, depths, 2))
    assert any(not torch.allclose(ours[n], wider[n], atol=1e-8) for n in ours if n.startswith("core."))


def test_the_data_is_one_problem_per_sequence_with_its_size():
    from recurdepth.data.procedural import get_task
    from recurdepth.data.sized import SizedProblems
    from recurdepth.data.tokenizer import build_tokenizer

    tok = build_tokenizer("byte")
    sources = [{"procedural": "hops", "n": 50, "difficulty": {"min_hops": 1, "max_hops": 4}},
               {"procedural": "parity", "n": 50, "difficulty": {"min_len": 3, "max_len": 9}, "weight": 0.5}]
    ds = SizedProblems(sources, tok, 40, 64, seed=3)
    task_sizes = set()
    for i in range(len(ds)):
        item = ds[i]
        ids = item["tokens"].tolist()
        assert ids[0] == tok.eod  # as evaluation prompts it: a document starts after an eod
        text = tok.detokenize([t for t in ids[1:] if t != tok.pad])
        prompt, _, answer = text.partition("Answer: ")
        task = get_task("hops" if " hop" in prompt else "parity")
        assert item["size"] == task.size(prompt + "Answer:") == ds.sizes([i])[0]
        assert task.verify(prompt + "Answer:", tok.detokenize([t for t, m in zip(item["labels"].tolist(),
                                                                               item["loss_mask"].tolist())
                                                                 if m and t != tok.eod]))
        task_sizes.add((task.name, item["size"]))
    assert {n for t, n in task_sizes if t == "hops"} == {1, 2, 3, 4}
    assert ds.sizes([len(ds) + 1]) == ds.sizes([1])  # ids wrap as the micro-batches' do
    again = SizedProblems(sources, tok, 40, 64, seed=3)
    assert all(torch.equal(ds[i]["tokens"], again[i]["tokens"]) for i in range(len(ds)))  # the same on every rank


@pytest.mark.parametrize("overrides,names", [
    (["recurrence.sampler=lognormal_poisson", "recurrence.mean=4"], "recurrence.sampler"),
    (["parallel.pipeline=2"], "parallel.pipeline"),
    (["objective.depth_scale=-1"], "objective.depth_scale"),
    (["model.kind=dense"], "objective.kind")])
def test_what_per_sample_depth_cannot_run_is_refused_in_one_line(overrides, names):
    from recurdepth.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, *overrides])
    line = str(err.value)
    assert "\n" not in line and line.startswith(names), line


@pytest.mark.parametrize("sources,says", [
    ("[{procedural: sort, n: 20}]", "task 'sort' has none"),
    ("[{builtin: stdlib-docs}]", "procedural tasks only"),
    ("[{procedural: hops, n: 20, difficulty: {nodes: 26}}]", "raise model.seq_length")])
def test_data_it_cannot_use_is_refused_in_one_line(sources, says):
    from recurdepth.data.pipeline import build_datasets
    from recurdepth.errors import DataError

    cfg = load_config(None, [*BASE, f"data.sources={sources}"])
    with pytest.raises(DataError) as err:
        build_datasets(cfg, 8, 4)
    assert "\n" not in str(err.value) and says in str(err.value), str(err.value)


def test_the_depth_rule_rounds_and_caps():
    cfg = load_config(None, [*BASE, "objective.depth_scale=1.5", "objective.depth_offset=-2", "recurrence.max_depth=6"])
    obj = build_objective(cfg, None)
    assert [obj.depth(n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 4, 6]  # max(1, round(1.5 n - 2)), capped at 6

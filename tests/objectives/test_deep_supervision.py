"""Deep supervision (TRM-style segments, the state detached between them): the segments' split of r, each
readout equal to the model run to that depth, and the loss and every parameter's gradient equal to a
restatement that runs each segment as its own forward from the detached state before it (float64, 1e-10)."""

from __future__ import annotations

import math

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from recurdepth.model.depth import BackpropWindow, segment_windows
from recurdepth.objectives import build_objective


def test_segments_split_r_evenly_and_truncate_each():
    assert [(w.total, w.with_grad) for w in segment_windows(7, 3, 2)] == [(3, 2), (2, 2), (2, 2)]
    assert [(w.total, w.with_grad) for w in segment_windows(2, 4, 1)] == [(1, 1), (1, 1)]  # r < S: r segments
    assert sum(w.total for w in segment_windows(13, 4, 3)) == 13


@pytest.mark.parametrize("bad,needle", [(["objective.supervision_segments=1"], "2 or more"),
                                        (["objective.supervision_weights=[1, 2, 3]"], "one weight per segment")])
def test_bad_options_are_refused_with_the_fix(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, ["objective.kind=deep_supervision", *bad])


@pytest.fixture(scope="module")
def setup(megatron_single_process, data_cache):
    from recurdepth.data.pipeline import build_datasets, micro_batches
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=32",
                             "model.prelude_layers=1", "model.core_layers=2", "model.coda_layers=1",
                             "recurrence.backprop_depth=2", "objective.kind=deep_supervision",
                             "objective.supervision_segments=3", "objective.supervision_weights=[0.2, 0.3, 0.5]",
                             f"data.cache_dir={data_cache}", "data.sources=[{builtin: stdlib-docs}]"])
    data = build_datasets(cfg, 16, 4)
    model = build_model(cfg, data.tokenizer.vocab_size, params_dtype=torch.float64)
    mb = micro_batches(data.train, 0, 4, 4, 0, 1, torch.device("cpu"))[0]
    return cfg, build_objective(cfg, data.tokenizer), model, mb


def restated(model, mb, r, weights, k):
    """sum_j w_j sum_t mask L_j: segment j is its own forward (`s0=` the state it starts from, detached)."""
    with torch.no_grad():
        e = model.embed(mb.tokens)
        state = model.initial_state(e, mb.sample_ids)
    total = 0
    for w, seg in zip(weights, segment_windows(r, len(weights), k)):
        per_token = model(mb.tokens, labels=mb.labels, window=seg, s0=state.detach()).double()
        total = total + w * (per_token * mb.loss_mask.double()).sum()
        with torch.no_grad():
            state = model.recur(state, e, BackpropWindow.of(seg.total, 0))
    return total


@pytest.mark.parametrize("r", [7, 3])
def test_loss_and_every_gradient_equal_the_segment_by_segment_restatement(setup, r):
    cfg, objective, model, mb = setup
    window = BackpropWindow.of(r, 2)
    model.zero_grad(set_to_none=True)
    ours = objective.loss_sum(model, mb, window)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    theirs = restated(model, mb, r, [0.2, 0.3, 0.5], 2)
    theirs.backward()
    assert math.isclose(ours.item(), theirs.item(), rel_tol=0, abs_tol=1e-10)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-10, rtol=0), n
    m = objective.metrics()
    assert m["supervision/first_loss"] > 0 and m["supervision/last_loss"] > 0


def test_without_the_detach_the_gradients_differ(setup, monkeypatch):
    """The restatement is sharp: a loop that does not detach between segments gives other core gradients."""
    cfg, objective, model, mb = setup
    window = BackpropWindow.of(4, 4)  # every iteration in a segment's window: gradients would cross segments
    model.zero_grad(set_to_none=True)
    objective.loss_sum(model, mb, window).backward()
    detached = model.core["0"].self_attention.linear_proj.weight.grad.clone()
    monkeypatch.setattr(torch.Tensor, "detach", lambda t: t)
    model.zero_grad(set_to_none=True)
    objective.loss_sum(model, mb, window).backward()
    assert not torch.allclose(detached, model.core["0"].self_attention.linear_proj.weight.grad, atol=1e-8)

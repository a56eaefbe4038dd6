"""Mixture-of-Recursions routers (objective.kind=recursion_router): the routed step (tokens gathered, the core run on
the routed ones only, scattered back) against a float64 restatement that never gathers — every token through the
core over the whole sequence, a boolean attention mask keeping each routed token to the routed tokens at or
before it, the others' outputs discarded — with the papers' auxiliary losses written out (BCE to the top-k choice;
Switch's balancing loss); loss and every gradient at 1e-10. A control shows the restatement tells routing apart
from the plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import build_objective
from recurdepth.objectives.router import expert_counts

BASE = ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=24", "model.prelude_layers=1",
        "model.core_layers=2", "model.coda_layers=1", "recurrence.sampler=fixed", "recurrence.depth=4",
        "objective.kind=recursion_router"]


def build(data_cache, *overrides):
    from recurdepth.data.pipeline import build_datasets, micro_batches
    from recurdepth.model.build import build_model

    cfg = load_config(None, [*BASE, *overrides, f"data.cache_dir={data_cache}", "data.sources=[{builtin: stdlib-docs}]"])
    data = build_datasets(cfg, 16, 4)
    model = build_model(cfg, data.tokenizer.vocab_size, params_dtype=torch.float64)
    with torch.no_grad():  # spread scores: no near-ties in the top-k
        model.recursion_router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
        model.recursion_router.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(6))
    # megatron's cross-entropy runs in float32, which would round both paths' float64 logits apart: the routing is
    # what is compared here, so the loss is float64 cross-entropy on the model's logits `[s, b, v]` for both
    model.compute_language_model_loss = lambda labels, logits: torch.nn.functional.cross_entropy(
        logits.permute(1, 2, 0), labels, reduction="none")
    mb = micro_batches(data.train, 0, 3, 3, 0, 1, torch.device("cpu"))[0]
    return cfg, data, model, mb


def masked_iteration(model, it, state, e, rope, routed, gate):
    """One iteration without gathering: the core on every token, routed tokens [s, b] attending to routed keys at
    or before them (the rest see only themselves), s + g (f - s) kept where routed."""
    s = state.shape[0]
    later = torch.ones(s, s, dtype=torch.bool).triu(1)  # [query, key]: key after query
    keys_ok = routed.t().unsqueeze(1)  # [b, 1, key]
    masked = later.unsqueeze(0) | ~keys_ok
    own = torch.eye(s, dtype=torch.bool).unsqueeze(0) & ~routed.t().unsqueeze(2)
    mask = (masked & ~own).unsqueeze(1)  # [b, 1, s, s], True = masked out
    with torch.enable_grad() if it.grad else torch.no_grad():
        f = model.core_step(state, e, rope, mask)
        new = f if gate is None else state + gate.unsqueeze(-1) * (f - state)
        return torch.where(routed.unsqueeze(-1), new, state)


def bce(z, t):
    return -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))


def restated_expert(model, section, mb, window):
    e = model.embed(mb.tokens)
    state = model.initial_state(e, mb.sample_ids)
    rope = model.rope(e.shape[0])
    s, b = state.shape[:2]
    W, c = model.recursion_router.weight, model.recursion_router.bias
    active, aux = torch.ones(s, b, dtype=torch.bool), 0.0
    counts = expert_counts(window.total, s, section.router_capacity)
    for it, k in zip(window.iterations(), counts):
        with torch.enable_grad() if it.grad else torch.no_grad():
            z = torch.cat([state, e], -1) @ W[it.index - 1] + c[it.index - 1]  # [s, b]
            order = torch.where(active, z, torch.tensor(-math.inf, dtype=z.dtype)).argsort(0, descending=True)
            routed = torch.zeros(s, b, dtype=torch.bool)
            for row in range(b):
                routed[order[:k, row], row] = True
            aux = aux + bce(z, routed.to(z.dtype))[active].mean()
            gate = None if section.router_gating == "none" else torch.sigmoid(z)
            state = masked_iteration(model, it, state, e, rope, routed, gate)
            active = routed
    losses = model.head(state, mb.labels)
    tokens = mb.loss_mask.sum()
    return (losses * mb.loss_mask).sum() + section.router_aux_weight * aux * tokens, sum(counts) / s


def restated_token(model, section, mb, window):
    e = model.embed(mb.tokens)
    state = model.initial_state(e, mb.sample_ids)
    rope = model.rope(e.shape[0])
    r = window.total
    W, c = model.recursion_router.weight[:r], model.recursion_router.bias[:r]
    logits = torch.cat([state, e], -1) @ W.t() + c
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)  # [s, b, r]
    depth = p.argmax(-1) + 1  # iterations each token runs
    gate = p.gather(-1, (depth - 1).unsqueeze(-1))[..., 0]
    f = torch.stack([(depth == j).double().mean() for j in range(1, r + 1)])
    P = p.reshape(-1, r).mean(0)
    balance = r * (f * P).sum()
    for it in window.iterations():
        state = masked_iteration(model, it, state, e, rope, depth >= it.index,
                                 None if section.router_gating == "none" else gate)
    losses = model.head(state, mb.labels)
    tokens = mb.loss_mask.sum()
    return (losses * mb.loss_mask).sum() + section.router_balance_weight * balance * tokens, depth.double().mean()


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("expert default capacity", ["objective.router=expert"], (4, 4)),
         ("expert half after the first, k<r", ["objective.router=expert", "objective.router_capacity=[1.0,0.5]"],
          (4, 2)),
         ("expert ungated, uneven capacity", ["objective.router=expert", "objective.router_gating=none",
                                              "objective.router_capacity=[0.8,0.6,0.3]"], (4, 3)),
         ("token choice", ["objective.router=token"], (4, 4)),
         ("token choice ungated k<r", ["objective.router=token", "objective.router_gating=none"], (4, 2))]


@pytest.mark.parametrize("name,overrides,window", CASES, ids=[c[0] for c in CASES])
def test_routed_step_equals_the_masked_float64_restatement(megatron_single_process, data_cache, name, overrides,
                                                           window):
    cfg, data, model, mb = build(data_cache, *overrides)
    obj = build_objective(cfg, data.tokenizer)
    w = BackpropWindow.of(*window)
    ours = obj.loss_sum(model, mb, w)
    g_ours = grads(model, ours)
    restate = restated_expert if cfg.objective.router == "expert" else restated_token
    theirs, depth = restate(model, cfg.objective, mb, w)
    g_theirs = grads(model, theirs)
    assert math.isclose(ours.item(), theirs.item(), rel_tol=0, abs_tol=1e-10), (ours.item(), theirs.item())
    assert g_ours.keys() == g_theirs.keys() and "recursion_router.weight" in g_ours
    for n in g_ours:
        assert torch.allclose(g_ours[n], g_theirs[n], atol=1e-10, rtol=0), n
    metrics = obj.metrics()
    assert metrics["router/mean_depth"] == pytest.approx(float(depth), abs=1e-12)
    # control: the plain loop (every token every iteration) is a different loss, so routing is what was checked
    plain = (model(mb.tokens, labels=mb.labels, window=w, sample_ids=mb.sample_ids) * mb.loss_mask).sum()
    assert abs(plain.item() - ours.item()) > 1e-3


def test_expert_capacity_is_hierarchical_and_at_least_one():
    assert expert_counts(4, 24, []) == [24, 18, 12, 6]  # MoR's (r - i + 1) / r
    assert expert_counts(4, 24, [1.0, 0.5]) == [24, 12, 12, 12]
    assert expert_counts(3, 10, [0.3, 0.9, 0.01]) == [3, 3, 1]  # never more than before, never none


@pytest.mark.parametrize("overrides,names", [
    (["parallel.pipeline=2"], "parallel.pipeline"),
    (["objective.router=token", "recurrence.sampler=lognormal_poisson", "recurrence.mean=4"], "recurrence.sampler"),
    (["recurrence.sampler=lognormal_poisson", "recurrence.mean=4"], "recurrence.max_depth"),
    (["model.spec=te"], "model.spec"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["objective.router_capacity=[1.0,0.0]"], "objective.router_capacity"),
    (["objective.router=both"], "objective.router")])
def test_what_the_router_cannot_run_is_refused_in_one_line(overrides, names):
    from recurdepth.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, *overrides])
    line = str(err.value)
    assert "\n" not in line and line.startswith(names), line


def test_a_bounded_sampler_gets_one_router_per_possible_iteration():
    from recurdepth.objectives.router import RouterObjective

    cfg = load_config(None, [*BASE, "recurrence.sampler=lognormal_poisson", "recurrence.mean=4",
                             "recurrence.max_depth=6"])
    assert RouterObjective.extra_modules(cfg, True, True)["recursion_router"].weight.shape == (6, 64)
    assert RouterObjective.extra_modules(cfg, False, True) == {}

"""Learned exits (exit_gate: Ouro; ponder: PonderNet): each loss against a float64 restatement of its paper's
formula written as the paper writes it (products of lambdas, no log space), gradients included (1e-10); the
per-iteration readouts against the model's own forward at that depth; and a model-level step whose gate
gradients match the restatement."""

from __future__ import annotations

import math

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import build_objective
from recurdepth.objectives.halting import halting_log_probs


def restated_p(lam: torch.Tensor) -> torch.Tensor:
    """p(i) = lambda_i prod_{j<i} (1 - lambda_j) for i < n, p(n) = prod_{j<n} (1 - lambda_j) (Ouro eq. 3)."""
    n = lam.shape[0]
    rows, survive = [], torch.ones_like(lam[0])
    for i in range(n - 1):
        rows.append(lam[i] * survive)
        survive = survive * (1 - lam[i])
    rows.append(survive)
    return torch.stack(rows)


def restated_exit_gate(z, L, beta):
    p = restated_p(torch.sigmoid(z))
    entropy = -(p * torch.log(p)).sum(0)
    return (p * L).sum(0) - beta * entropy


def restated_ponder(z, L, beta, rate):
    p = restated_p(torch.sigmoid(z))
    n = z.shape[0]
    q = torch.tensor([rate * (1 - rate) ** i for i in range(n)], dtype=torch.float64)
    q = (q / q.sum()).reshape(n, 1, 1)
    return (p * L).sum(0) + beta * (p * torch.log(p / q)).sum(0)


def objective(kind, *overrides):
    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
                             f"objective.kind={kind}", *overrides])
    return cfg, build_objective(cfg, None)


def test_halting_distribution_sums_to_one_and_matches_the_products():
    z = torch.randn(5, 3, 7, dtype=torch.float64)
    p = halting_log_probs(z).exp()
    assert torch.allclose(p.sum(0), torch.ones(3, 7, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(p, restated_p(torch.sigmoid(z)), atol=1e-14, rtol=0)
    assert torch.equal(halting_log_probs(z[:1]), torch.zeros(1, 3, 7, dtype=torch.float64))  # r = 1: all mass there


@pytest.mark.parametrize("kind", ["exit_gate", "ponder"])
def test_each_loss_and_its_gradients_equal_the_float64_restatement(kind):
    _, obj = objective(kind, "objective.exit_beta=0.3", *(["objective.ponder_prior=0.2"] if kind == "ponder" else []))
    gen = torch.Generator().manual_seed(7)
    z = (2 * torch.randn(6, 2, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    L = (3 * torch.rand(6, 2, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    ours, _ = obj.token_losses(L, z)
    theirs = restated_exit_gate(z, L, 0.3) if kind == "exit_gate" else restated_ponder(z, L, 0.3, 0.2)
    assert torch.allclose(ours, theirs, atol=1e-10, rtol=0)
    weights = torch.rand(2, 5, generator=gen, dtype=torch.float64)  # a loss mask-like weighting of the tokens
    g_ours = torch.autograd.grad((ours * weights).sum(), (z, L))
    g_theirs = torch.autograd.grad((theirs * weights).sum(), (z, L))
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert g_ours[0][-1].abs().max() == 0  # the last iteration's gate is not used


def test_the_entropy_bonus_and_the_prior_pull_the_way_the_papers_say():
    """beta > 0: exit_gate's loss falls as p spreads (entropy), ponder's rises away from its prior."""
    _, gate = objective("exit_gate", "objective.exit_beta=1.0")
    L = torch.zeros(4, 1, 1, dtype=torch.float64)
    peaked, spread = torch.full((4, 1, 1), 8.0, dtype=torch.float64), torch.zeros(4, 1, 1, dtype=torch.float64)
    assert gate.token_losses(L, spread)[0] < gate.token_losses(L, peaked)[0]
    _, ponder = objective("ponder", "objective.exit_beta=1.0", "objective.ponder_prior=0.5")
    q = torch.tensor([0.5 * 0.5 ** i for i in range(4)], dtype=torch.float64)
    q = q / q.sum()  # the prior, truncated to 4 and renormalised: the gate that halts as it does
    lam = q[:3] / (1 - torch.cat([torch.zeros(1, dtype=torch.float64), q.cumsum(0)[:2]]))
    at_prior = torch.cat([torch.logit(lam), torch.zeros(1, dtype=torch.float64)]).reshape(4, 1, 1)
    assert ponder.token_losses(L, at_prior)[0].abs().item() < 1e-12
    assert ponder.token_losses(L, peaked)[0].item() > 0.1


@pytest.fixture(scope="module")
def model_setup(megatron_single_process, data_cache):
    from recurdepth.data.pipeline import build_datasets, micro_batches
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=32",
                             "model.prelude_layers=1", "model.core_layers=2", "model.coda_layers=1",
                             "objective.kind=exit_gate", "objective.exit_beta=0.2", f"data.cache_dir={data_cache}",
                             "data.sources=[{builtin: stdlib-docs}]"])
    data = build_datasets(cfg, 16, 4)
    model = build_model(cfg, data.tokenizer.vocab_size, params_dtype=torch.float64)
    with torch.no_grad():  # a gate that is not 1/2 everywhere
        model.exit_gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        model.exit_gate.bias.fill_(-0.3)
    mb = micro_batches(data.train, 0, 4, 4, 0, 1, torch.device("cpu"))[0]
    return cfg, data, model, mb


@pytest.mark.parametrize("read_at", [None, [3, 5]])
def test_each_readout_is_the_model_run_to_that_depth(model_setup, read_at):
    cfg, _, model, mb = model_setup
    window = BackpropWindow.of(5, 2)
    picked, losses, hidden = model.readout_forward(mb.tokens, mb.labels, window, mb.sample_ids, read_at)
    assert picked == (read_at or [1, 2, 3, 4, 5]) and losses.shape[:2] == (len(picked), mb.tokens.shape[0])
    for i, depth in enumerate(picked):
        alone, h = model(mb.tokens, labels=mb.labels, window=BackpropWindow.of(depth, 2), sample_ids=mb.sample_ids,
                         return_hidden=True)
        assert torch.allclose(losses[i], alone, atol=1e-12, rtol=0)
        assert torch.allclose(hidden[i], h, atol=1e-12, rtol=0)


def test_a_model_step_gives_the_restated_loss_and_gate_gradients(model_setup):
    cfg, data, model, mb = model_setup
    obj = build_objective(cfg, data.tokenizer)
    window = BackpropWindow.of(4, 2)
    model.zero_grad(set_to_none=True)
    loss = obj.loss_sum(model, mb, window)
    loss.backward()
    ours = (loss.item(), model.exit_gate.weight.grad.clone(), model.exit_gate.bias.grad.clone())
    with torch.no_grad():
        _, L, hidden = model.readout_forward(mb.tokens, mb.labels, window, mb.sample_ids)
    w = model.exit_gate.weight.detach().clone().requires_grad_()
    b = model.exit_gate.bias.detach().clone().requires_grad_()
    theirs = (restated_exit_gate(hidden @ w + b, L, 0.2) * mb.loss_mask).sum()
    theirs.backward()
    assert math.isclose(ours[0], theirs.item(), rel_tol=0, abs_tol=1e-10)
    assert torch.allclose(ours[1], w.grad, atol=1e-10, rtol=0) and torch.allclose(ours[2], b.grad, atol=1e-10, rtol=0)
    m = obj.metrics()
    assert 1 <= m["exit/mean_depth"] <= 4 and m["exit/entropy"] > 0
    # every core weight gets a gradient from the readouts inside the window
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".core." in n
               or n.startswith("core."))


def test_the_naive_pipeline_split_is_refused_with_the_reason():
    """Under PP the readouts run inside the looped schedule (tests/objectives/test_objective_layouts.py); the naive
    split, which runs every iteration inside one trip of the first stage, has no per-iteration state to read."""
    from recurdepth.errors import ConfigError

    load_config(None, ["objective.kind=ponder", "parallel.pipeline=2", "model.core_layers=2"])
    with pytest.raises(ConfigError, match="parallel.pipeline_split=looped"):
        load_config(None, ["objective.kind=ponder", "parallel.pipeline=2", "model.core_layers=2",
                           "parallel.pipeline_split=naive"])


def test_the_gate_tuning_loss_equals_ouros_stage_two_restated():
    """exit_gate_tune: BCE of the gate's continue probability against w = sigmoid(50 (max(0, L_i - L_{i+1}) -
    0.005)), averaged over the n - 1 decisions; the readout losses are targets (no gradient into them)."""
    _, obj = objective("exit_gate_tune")
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    L = (2 * torch.rand(5, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    ours, _ = obj.token_losses(L, z)
    lam = torch.sigmoid(z)
    terms = []
    for i in range(4):
        w = torch.sigmoid(50 * (torch.clamp(L[i] - L[i + 1], min=0) - 0.005)).detach()
        terms.append(-(w * torch.log(1 - lam[i]) + (1 - w) * torch.log(lam[i])))
    theirs = torch.stack(terms).mean(0)
    assert torch.allclose(ours, theirs, atol=1e-10, rtol=0)
    g_ours, = torch.autograd.grad(ours.sum(), z)
    g_theirs, = torch.autograd.grad(theirs.sum(), z)
    assert torch.allclose(g_ours, g_theirs, atol=1e-10, rtol=0)
    assert torch.autograd.grad(obj.token_losses(L, z)[0].sum(), L, allow_unused=True)[0] is None


def test_gate_tuning_freezes_everything_but_the_gate(megatron_single_process):
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
                             "objective.kind=exit_gate_tune"])
    model = build_model(cfg, 300)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["exit_gate.bias", "exit_gate.weight"]

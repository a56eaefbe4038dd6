"""Depth sampling: per-step determinism, the published lognormal-Poisson distribution, and the window."""

import numpy as np
import pytest

from recurdepth.config import RecurrenceConfig
from recurdepth.model.depth import BackpropWindow, DepthSampler


def test_same_r_for_same_seed_and_step_across_instances():
    cfg = RecurrenceConfig(sampler="lognormal_poisson", mean=8, sigma=0.5)
    a, b = DepthSampler(cfg, 42), DepthSampler(cfg, 42)
    seq_a = [a.sample(s) for s in range(200)]
    assert seq_a == [b.sample(s) for s in range(200)]
    assert seq_a[150:] == [DepthSampler(cfg, 42).sample(s) for s in range(150, 200)]  # resume at step 150
    assert seq_a != [DepthSampler(cfg, 43).sample(s) for s in range(200)]


def test_lognormal_poisson_matches_huginn_definition():
    """tau ~ N(log(mean) - sigma^2/2, sigma), r = Poisson(e^tau) + 1, so E[r] = mean + 1."""
    cfg = RecurrenceConfig(sampler="lognormal_poisson", mean=6, sigma=0.5)
    draws = np.array([DepthSampler(cfg, 0).sample(s) for s in range(20000)])
    assert draws.min() >= 1
    assert abs(draws.mean() - 7.0) < 0.1
    rng = np.random.default_rng(0)  # an independent draw of the same law: same spread
    tau = rng.normal(np.log(6) - 0.125, 0.5, 20000)
    ref = rng.poisson(np.exp(tau)) + 1
    assert abs(draws.std() - ref.std()) < 0.1


def test_uniform_fixed_cap_and_curriculum():
    uni = DepthSampler(RecurrenceConfig(sampler="uniform", low=2, high=5), 1)
    vals = {uni.sample(s) for s in range(500)}
    assert vals == {2, 3, 4, 5}
    assert DepthSampler(RecurrenceConfig(sampler="fixed", depth=7), 1).sample(3) == 7
    capped = DepthSampler(RecurrenceConfig(sampler="lognormal_poisson", mean=20, sigma=1.0, max_depth=9), 1)
    assert max(capped.sample(s) for s in range(500)) == 9
    cur = DepthSampler(RecurrenceConfig(sampler="curriculum", mean=16, curriculum_start=2, curriculum_steps=100), 1)
    assert cur.mean_at(0) == 2 and cur.mean_at(50) == 9 and cur.mean_at(100) == 16 and cur.mean_at(1000) == 16
    early = np.mean([cur.sample(s) for s in range(0, 10)])
    late = np.mean([cur.sample(s) for s in range(200, 260)])
    assert early < late


@pytest.mark.parametrize("r,k,no_grad,with_grad", [(1, 4, 0, 1), (4, 4, 0, 4), (10, 4, 6, 4), (3, 1, 2, 1)])
def test_backprop_window(r, k, no_grad, with_grad):
    w = BackpropWindow.of(r, k)
    assert (w.total, w.no_grad, w.with_grad) == (r, no_grad, with_grad)

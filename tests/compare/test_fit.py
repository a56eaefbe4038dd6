"""fit.py against known laws: the power law and its inverse, bounds, and the batched refit."""

import numpy as np
import pytest

from recurdepth.compare.fit import PowerLaw, fit_power_law, invert_power_law, refit_power_law


@pytest.mark.parametrize("E,A,alpha", [(2.0, 4.0, 0.3), (0.0, 30.0, 0.08), (3.1, 0.5, 0.9)])
def test_power_law_recovered_from_noiseless_points(E, A, alpha):
    c = np.geomspace(1e15, 1e18, 5)
    truth = PowerLaw(E, A, alpha, 1e15)
    law, residuals = fit_power_law(c, truth.loss(c))
    assert np.abs(residuals).max() < 1e-6
    assert law.alpha == pytest.approx(alpha, rel=1e-3)
    assert law.E == pytest.approx(E, abs=1e-3 * (1 + E))
    assert law.compute_at(truth.loss(3e16)) == pytest.approx(3e16, rel=1e-3)


def test_inverse_is_infinite_at_or_below_the_asymptote():
    law = PowerLaw(2.0, 1.0, 0.5, 1.0)
    c = law.compute_at([2.5, 2.0, 1.9])
    assert c[0] == pytest.approx(4.0) and np.isinf(c[1:]).all()
    assert invert_power_law(np.array([[2.5]]), np.array([[2.0]]), np.array([[1.0]]), np.array([[0.5]]), 1.0)[0, 0] \
        == pytest.approx(4.0)


def test_batched_refit_matches_one_fit_per_row():
    rng = np.random.default_rng(0)
    c = np.repeat(np.geomspace(1e15, 1e18, 5), 2)
    loss = PowerLaw(2.0, 4.0, 0.3, 1e15).loss(c)
    law, _ = fit_power_law(c, loss)
    noisy = np.log(loss)[None, :] + rng.normal(0, 0.01, (4, len(c)))
    batch = refit_power_law(law, c, noisy)
    for row, params in zip(noisy, batch):
        one, _ = fit_power_law(c, np.exp(row))
        assert params[2] == pytest.approx(one.alpha, rel=1e-3)
        assert params[0] == pytest.approx(one.E, abs=1e-3)

"""Scaling-law fits for `recurdepth compare`, numpy only, vectorised over bootstrap replicates.

Conventions. Every fit minimises squared residuals of *log* loss: sum_i (log L_i - log f(x_i))^2, so a 1% error
weighs the same at every rung. The saturating power law is f(C) = E + A (C / C0)^-alpha with E >= 0, A > 0,
alpha > 0; C0 (the geometric mean of the fitted C) only keeps A in loss units, it is not a parameter. The
recurrence-equivalence law (the issue's phi) is

    L = E + A (N / N0)^-alpha + B (D / D0)^-beta,    N = N_once + r^phi N_rec,

with N_once the parameters run once per token (embedding, prelude, coda, head), N_rec those of the recurrent
core, r the mean recurrence and D the training tokens: phi = 1 counts every iteration as fresh parameters,
phi = 0 counts the core once. The minimiser is one Levenberg-Marquardt loop (`levenberg_marquardt`) run on a
batch: a row per bootstrap replicate or per starting point, each row with its own damping, so a thousand
replicates cost about as much as a few fits. Bounds are kept by projecting each trial step onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LOG_ALPHA_BOUNDS = (np.log(1e-3), np.log(5.0))
LOG_AMPLITUDE_BOUNDS = (-40.0, 40.0)
PHI_BOUNDS = (-1.0, 3.0)


def levenberg_marquardt(residuals: Callable[[np.ndarray, np.ndarray], np.ndarray], p0: np.ndarray,
                        lower: np.ndarray, upper: np.ndarray, iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Minimise sum(residuals(p, rows)^2) for each row of p: `residuals` maps parameters [b, P] of the batch rows
    `rows` [b] to residuals [b, n]. Forward-difference Jacobian, Marquardt's diagonal scaling, a step kept only
    where it lowers the cost (non-finite costs never win); a row stops once its steps stop paying. Returns
    (p [B, P], cost [B])."""
    p = np.clip(np.array(p0, dtype=float), lower, upper)
    active = np.arange(len(p))
    r = residuals(p, active)
    cost = _cost(r)
    lam = np.full(len(p), 1e-3)
    eye = np.eye(p.shape[1])
    for _ in range(iters):
        pa, ra, la, ca = p[active], r, lam[active], cost[active]
        h = 1e-7 * np.maximum(1.0, np.abs(pa))
        jac = np.stack([(residuals(pa + h[:, j:j + 1] * eye[j], active) - ra) / h[:, j:j + 1]
                        for j in range(p.shape[1])], -1)
        jac = np.nan_to_num(jac, nan=0.0, posinf=0.0, neginf=0.0)
        grad = np.einsum("bnp,bn->bp", jac, np.nan_to_num(ra))
        hess = np.einsum("bnp,bnq->bpq", jac, jac)
        diag = np.einsum("bpp->bp", hess) + 1e-12
        step = np.linalg.solve(hess + la[:, None, None] * diag[:, :, None] * eye, -grad[:, :, None])[..., 0]
        trial = np.clip(pa + step, lower, upper)
        r_trial = residuals(trial, active)
        c_trial = _cost(r_trial)
        better = c_trial < ca
        gain = np.where(better, ca - c_trial, 0.0)
        p[active] = np.where(better[:, None], trial, pa)
        cost[active] = np.where(better, c_trial, ca)
        ra = np.where(better[:, None], r_trial, ra)
        lam[active] = la = np.clip(np.where(better, la / 3.0, la * 4.0), 1e-12, 1e12)
        stalled = ~better & (la >= 1e6)  # no step lowers the cost even when damped to gradient descent
        settled = better & (gain <= 1e-10 * cost[active] + 1e-24)
        going = ~(stalled | settled)
        active, r = active[going], ra[going]
        if not len(active):
            break
    return p, cost


def _cost(r: np.ndarray) -> np.ndarray:
    cost = np.sum(r * r, axis=1)
    return np.where(np.isfinite(cost), cost, np.inf)


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A (C / C0)^-alpha, fitted in log loss; `x` names what C is (model FLOPs, tokens, ...)."""

    E: float
    A: float
    alpha: float
    C0: float

    def loss(self, c) -> np.ndarray:
        return self.E + self.A * (np.asarray(c, dtype=float) / self.C0) ** -self.alpha

    def compute_at(self, loss) -> np.ndarray:
        """The C at which the law reaches `loss`: (A / (L - E))^(1/alpha) C0; inf where L <= E (never reached)."""
        return invert_power_law(np.asarray(loss, dtype=float), self.E, self.A, self.alpha, self.C0)

    @staticmethod
    def from_params(p: np.ndarray, c0: float) -> "PowerLaw":
        return PowerLaw(float(p[0]), float(np.exp(p[1])), float(np.exp(p[2])), c0)


def invert_power_law(loss, E, A, alpha, c0) -> np.ndarray:
    """Elementwise C(L) of E + A (C / C0)^-alpha (arrays broadcast); inf where L <= E."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gap = loss - E
        c = c0 * np.exp(np.log(A / np.where(gap > 0, gap, np.nan)) / alpha)
    return np.where(gap > 0, c, np.inf)


def power_law_log_residuals(x: np.ndarray, log_loss: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """r(p) = log L - log(E + e^logA x^-e^logalpha) for p = (E, log A, log alpha) rows; x [n] is C / C0 and
    log_loss is [n] or [B, n] (one row of losses per replicate)."""
    log_x = np.log(x)

    def residuals(p: np.ndarray, rows: np.ndarray) -> np.ndarray:
        y = log_loss if log_loss.ndim == 1 else log_loss[rows]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            pred = p[:, :1] + np.exp(p[:, 1:2] - np.exp(p[:, 2:3]) * log_x)
            return y - np.log(pred)

    return residuals


def _power_law_bounds():
    lower = np.array([0.0, LOG_AMPLITUDE_BOUNDS[0], LOG_ALPHA_BOUNDS[0]])
    upper = np.array([np.inf, LOG_AMPLITUDE_BOUNDS[1], LOG_ALPHA_BOUNDS[1]])
    return lower, upper


def _grid_starts(x: np.ndarray, loss: np.ndarray, keep: int = 6) -> np.ndarray:
    """Starting points from a grid over alpha and E (E a fraction of the smallest loss), A in closed form from
    the straight line log(L - E) = log A - alpha log x; the `keep` lowest log-loss costs."""
    alphas = np.geomspace(0.01, 3.0, 48)
    fractions = np.linspace(0.0, 0.99, 34)
    E = fractions * loss.min()
    log_x = np.log(x)
    gap = np.log(loss[None, :] - E[:, None])  # [nE, n]
    log_a = gap.mean(axis=1)[None, :] + alphas[:, None] * log_x.mean()  # [na, nE]
    pred = E[None, :, None] + np.exp(log_a[:, :, None] - alphas[:, None, None] * log_x[None, None, :])
    cost = np.sum((np.log(loss) - np.log(pred)) ** 2, axis=-1)
    best = np.argsort(cost, axis=None)[:keep]
    ia, ie = np.unravel_index(best, cost.shape)
    return np.stack([E[ie], log_a[ia, ie], np.log(alphas[ia])], axis=1)


def fit_power_law(c, loss) -> tuple[PowerLaw, np.ndarray]:
    """Least-squares fit in log loss of L = E + A (C / C0)^-alpha to points (c, loss), from the best of a grid
    of starts; returns the law and each point's residual log L - log L_fit."""
    c, loss = np.asarray(c, dtype=float), np.asarray(loss, dtype=float)
    c0 = float(np.exp(np.log(c).mean()))
    x = c / c0
    lower, upper = _power_law_bounds()
    p, cost = levenberg_marquardt(power_law_log_residuals(x, np.log(loss)), _grid_starts(x, loss), lower, upper)
    best = p[np.argmin(cost)]
    law = PowerLaw.from_params(best, c0)
    return law, np.log(loss) - np.log(law.loss(c))


def refit_power_law(law: PowerLaw, c, log_losses: np.ndarray) -> np.ndarray:
    """The fit repeated on each row of `log_losses` ([B, n], the same c), started from `law`: params [B, 3] as
    (E, A, alpha) columns, C0 kept."""
    x = np.asarray(c, dtype=float) / law.C0
    lower, upper = _power_law_bounds()
    p0 = np.tile([law.E, np.log(law.A), np.log(law.alpha)], (len(log_losses), 1))
    p, _ = levenberg_marquardt(power_law_log_residuals(x, log_losses), p0, lower, upper, iters=60)
    return np.stack([p[:, 0], np.exp(p[:, 1]), np.exp(p[:, 2])], axis=1)


@dataclass(frozen=True)
class RecurrenceLaw:
    """L = E + A (N / N0)^-alpha + B (D / D0)^-beta with N = N_once + r^phi N_rec (see the module docstring)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    phi: float
    N0: float
    D0: float


def recurrence_log_residuals(n_once, n_rec, depth, tokens, log_loss) -> Callable[[np.ndarray], np.ndarray]:
    """r(p) = log L - log f for p = (E, log A, log alpha, log B, log beta, phi) rows; inputs already divided by
    N0 (the parameter counts) and D0 (tokens); log_loss [n] or [B, n]."""
    log_r, log_d = np.log(depth), np.log(tokens)

    def residuals(p: np.ndarray, rows: np.ndarray) -> np.ndarray:
        y = log_loss if log_loss.ndim == 1 else log_loss[rows]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            n = n_once + np.exp(p[:, 5:6] * log_r) * n_rec
            pred = (p[:, :1] + np.exp(p[:, 1:2] - np.exp(p[:, 2:3]) * np.log(n))
                    + np.exp(p[:, 3:4] - np.exp(p[:, 4:5]) * log_d))
            return y - np.log(pred)

    return residuals


def _recurrence_bounds():
    lo_a, hi_a = LOG_AMPLITUDE_BOUNDS
    lower = np.array([0.0, lo_a, LOG_ALPHA_BOUNDS[0], lo_a, LOG_ALPHA_BOUNDS[0], PHI_BOUNDS[0]])
    upper = np.array([np.inf, hi_a, LOG_ALPHA_BOUNDS[1], hi_a, LOG_ALPHA_BOUNDS[1], PHI_BOUNDS[1]])
    return lower, upper


def fit_recurrence_law(n_once, n_rec, depth, tokens, loss) -> tuple[RecurrenceLaw, np.ndarray]:
    """Least-squares fit in log loss of the recurrence-equivalence law; starts from a grid over (phi, alpha,
    beta) with E, A, B solved linearly at each. Returns the law and the residuals log L - log L_fit."""
    n_once, n_rec, depth, tokens, loss = (np.asarray(v, dtype=float) for v in (n_once, n_rec, depth, tokens, loss))
    n0 = float(np.exp(np.log(n_once + n_rec).mean()))
    d0 = float(np.exp(np.log(tokens).mean()))
    args = (n_once / n0, n_rec / n0, depth, tokens / d0)
    starts = []
    for phi in np.linspace(0.0, 1.25, 6):
        n = args[0] + depth ** phi * args[1]
        for alpha in (0.1, 0.3, 0.7):
            for beta in (0.1, 0.3, 0.7):
                design = np.stack([np.ones_like(loss), n ** -alpha, args[3] ** -beta], axis=1)
                e, a, b = np.linalg.lstsq(design, loss, rcond=None)[0]
                starts.append([max(e, 0.0), np.log(max(a, 1e-3)), np.log(alpha), np.log(max(b, 1e-3)),
                               np.log(beta), phi])
    lower, upper = _recurrence_bounds()
    p, cost = levenberg_marquardt(recurrence_log_residuals(*args, np.log(loss)), np.array(starts), lower, upper,
                                  iters=300)
    best = p[np.argmin(cost)]
    law = RecurrenceLaw(float(best[0]), float(np.exp(best[1])), float(np.exp(best[2])), float(np.exp(best[3])),
                        float(np.exp(best[4])), float(best[5]), n0, d0)
    resid = recurrence_log_residuals(*args, np.log(loss))(best[None, :], np.arange(1))[0]
    return law, resid


def refit_recurrence_phi(law: RecurrenceLaw, n_once, n_rec, depth, tokens, log_losses: np.ndarray) -> np.ndarray:
    """phi [B] of the recurrence law refitted to each row of `log_losses` ([B, n]), started from `law`."""
    args = (np.asarray(n_once, float) / law.N0, np.asarray(n_rec, float) / law.N0, np.asarray(depth, float),
            np.asarray(tokens, float) / law.D0)
    p0 = np.tile([law.E, np.log(law.A), np.log(law.alpha), np.log(law.B), np.log(law.beta), law.phi],
                 (len(log_losses), 1))
    lower, upper = _recurrence_bounds()
    p, _ = levenberg_marquardt(recurrence_log_residuals(*args, log_losses), p0, lower, upper, iters=80)
    return p[:, 5]

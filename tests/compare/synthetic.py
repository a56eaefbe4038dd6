"""Result tables drawn from known laws, for the compare tests: the baseline follows L = E + A (C / 1e15)^-alpha
with multiplicative log-normal noise exp(N(0, sigma)), and the candidate reaches at C the baseline's loss at
m C (its compute multiplier is m by construction)."""

from __future__ import annotations

import json

import numpy as np

E, A, ALPHA = 2.0, 4.0, 0.3
RUNGS = (1e15, 4e15, 1.6e16, 6.4e16, 2.56e17)
TOKENS_PER_FLOP = 1 / (6 * 5e6)  # a 5M-parameter model at 6 N FLOPs per token


def law(c):
    return E + A * (np.asarray(c, dtype=float) / 1e15) ** -ALPHA


def row(family: str, seed: int, rung: int, flops: float, loss: float, **extra) -> dict:
    base = {"variant": f"{family}-r{rung}-s{seed}", "family": family, "seed": seed, "rung": rung,
            "budget_flops": flops, "config_hash": "abc", "tokenizer": "tok-v1", "dataset": "data-v1",
            "unique_params": 5_000_000, "effective_params": 5_000_000, "params_once": 1_000_000,
            "params_rec": 4_000_000, "depth": 1.0, "backprop_depth": 1, "tokens": int(flops * TOKENS_PER_FLOP),
            "model_flops": flops, "hardware_flops": 1.2 * flops, "wall_seconds": flops / 1e12,
            "peak_memory_bytes": 10 ** 9, "final_val_loss": float(loss), "best_val_loss": float(loss),
            "accuracy": {}}
    base.update(extra)
    return base


def table(m: float, sigma: float, rng, seeds: int = 2, cand_seeds: int = 2, rungs=RUNGS) -> list:
    """Baseline 'dense' and candidate 'looped' runs, `seeds` and `cand_seeds` per rung."""
    noise = (lambda: float(np.exp(rng.normal(0.0, sigma)))) if sigma else (lambda: 1.0)
    rows = [row("dense", s, i, c, law(c) * noise()) for i, c in enumerate(rungs) for s in range(seeds)]
    rows += [row("looped", s, i, c, law(m * c) * noise(), depth=4.0) for i, c in enumerate(rungs)
             for s in range(cand_seeds)]
    return rows


def write(rows: list, path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)

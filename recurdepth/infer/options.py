"""How the decoder computes each position (`DecodeOptions`), torch-free so that the command line can be built
without importing torch or megatron (`recurdepth --help` and the light verbs stay fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

INITS = ("zeros", "random")


@dataclass
class DecodeOptions:
    """How each position is computed: `depth` iterations at most; `exit_kl` eps (None = fixed depth);
    `kv_share` m (None = a cache slot per iteration); `warm_start` s_0 from the previous token's final state
    (decoding only); `init` of s_0 otherwise (zeros, or the model's truncated normal from a seeded generator)."""

    depth: int = 4
    exit_kl: Optional[float] = None
    exit_gate: Optional[float] = None  # q in (0, 1]: stop at the first iteration whose gate exit CDF reaches q
    exit_router: bool = False  # route each token as a recursion_router model was trained to (recursion-wise KV)
    kv_share: Optional[int] = None
    warm_start: bool = False
    init: str = "zeros"
    seed: int = 0

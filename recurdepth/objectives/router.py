"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): routers decide, token by token, which tokens go on
through the core; the others keep their state and skip the core's compute.

Both routers read a token's state and its injected prelude output: z = w . [s_{i-1}; e] + b (a linear map of
2h, float32 at least), so the first iteration's decision does not rest on the random s_0 alone. A routed token's
update is weighed by the router's score g,

    s_i = s_{i-1} + g (core(adapter(s_{i-1}, e)) - s_{i-1})   at the routed tokens,   s_i = s_{i-1} elsewhere

(`objective.router_gating=weighted`; `none`: g = 1, the router trained by its auxiliary loss only). MoR adds
g f(x) to a residual stream; recurdepth's core replaces the state (Huginn), so g interpolates between staying and
iterating, and g = 1 is the plain loop. The core runs on the routed tokens only, gathered into a `[K, b, h]`
batch (`LoopedGPTModel.routed_iteration`): they attend causally to each other at their own RoPE positions, so at
iteration i only the tokens active there write keys and values (MoR's recursion-wise KV caching).

Expert-choice (`objective.router=expert`, MoR's default): a router per iteration i = 1..r scores the tokens still
active, g = sigmoid(z_i); the top k_i = max(1, floor(c_i s)) of each sequence continue (hierarchical: a token that
stopped never comes back; at most the tokens active before). c_i is `objective.router_capacity[i]` (the last entry
repeats past its end), by default (r - i + 1) / r, MoR's linear schedule; so the step's r must be bounded
(`recurrence.max_depth`, or a fixed or uniform sampler): one router per possible iteration. Top-k over a sequence
looks at later tokens, which a decoder cannot: MoR's auxiliary loss trains g to predict the choice,
BCE(z_i, 1[selected]) averaged over each iteration's candidate tokens and summed over iterations, weighted by
`objective.router_aux_weight`, so that a decoder can continue a token where g >= 1/2.

Token-choice (`objective.router=token`): one router before iteration 1 gives each token a distribution over the r
depths, p = softmax(z) (r logits; `recurrence.sampler=fixed`), depth d = argmax p, the token active at iterations
i <= d with g = p_d at each of them. Switch Transformer's balancing loss r sum_j f_j P_j (f_j: the fraction of the
micro-batch's tokens given depth j, P_j: their mean p_j), weighted by `objective.router_balance_weight`, keeps the
depths used. Rows have different counts of active tokens: padded to the longest, the padding after a row's real
tokens (causality keeps it out of their attention).

Both auxiliary terms are per-token means: they enter the step's loss sum times the micro-batch's loss-masked token
count. Iterations outside the truncated-backprop window route without autograd (their routers get no gradient:
use k = r to train every router). The LM loss is read out at s_r for every token. Metrics: `router/mean_depth`
(iterations per token), `router/aux_loss` or `router/balance_loss`, `router/aux_accuracy` (expert: how often
g >= 1/2 agrees with the top-k choice, the fidelity a decoder's causal routing will have).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from recurdepth.config import require
from recurdepth.model.depth import max_depth
from recurdepth.model.looped_gpt import gather_rows
from recurdepth.objectives.base import Objective, ObjectiveSection, TokenMeans
from recurdepth.parallel.passes import unwrap


def expert_capacities(r: int, capacity: list) -> list:
    """c_1..c_r: `capacity` (its last entry repeated past its end), or MoR's linear (r - i + 1) / r."""
    if not capacity:
        return [(r - i) / r for i in range(r)]
    return [float(capacity[min(i, len(capacity) - 1)]) for i in range(r)]


def expert_counts(r: int, seq: int, capacity: list) -> list:
    """k_1..k_r: tokens per sequence that run iteration i (top-k of the ones active before, at least 1)."""
    counts, prev = [], seq
    for c in expert_capacities(r, capacity):
        prev = min(prev, max(1, int(c * seq)))
        counts.append(prev)
    return counts


@dataclass
class RouterSection(ObjectiveSection):
    kind: str = "recursion_router"
    router: str = "expert"  # expert: top-k per iteration (MoR's expert-choice); token: a depth per token up front
    router_capacity: list = field(default_factory=list)  # expert: c_i per iteration (default (r - i + 1) / r)
    router_gating: str = "weighted"  # weighted: s + g (f - s) at routed tokens; none: s <- f
    router_aux_weight: float = 0.1  # expert: the BCE auxiliary loss's weight
    router_balance_weight: float = 0.01  # token: the balancing loss's weight

    def validate(self, cfg) -> None:
        require(self.router in ("expert", "token"), "objective.router", self.router, "use expert or token")
        require(self.router_gating in ("weighted", "none"), "objective.router_gating", self.router_gating,
                "use weighted or none")
        require(all(isinstance(c, (int, float)) and 0 < c <= 1 for c in self.router_capacity),
                "objective.router_capacity", self.router_capacity, "use fractions in (0, 1], one per iteration")
        require(self.router_aux_weight >= 0, "objective.router_aux_weight", self.router_aux_weight, "use >= 0")
        require(self.router_balance_weight >= 0, "objective.router_balance_weight", self.router_balance_weight,
                "use >= 0")
        rec = cfg.recurrence
        if self.router == "token":
            require(rec.sampler == "fixed", "recurrence.sampler", rec.sampler,
                    "objective.router=token chooses among r depths: use recurrence.sampler=fixed")
        require(math.isfinite(max_depth(rec)), "recurrence.max_depth", rec.max_depth,
                "objective.kind=recursion_router has one router per iteration: bound r (recurrence.max_depth, or "
                "a fixed or uniform sampler)")
        require(cfg.parallel.pipeline == 1, "parallel.pipeline", cfg.parallel.pipeline,
                "objective.kind=recursion_router does not run under pipeline parallelism yet; use "
                "parallel.pipeline=1 (data or tensor parallelism instead)")
        require(not cfg.parallel.sequence_parallel, "parallel.sequence_parallel", True,
                "objective.kind=recursion_router gathers tokens along whole sequences: use "
                "parallel.sequence_parallel=false")
        require(cfg.model.spec != "te", "model.spec", cfg.model.spec,
                "objective.kind=recursion_router gives each routed token its own RoPE position, which "
                "TransformerEngine's fused RoPE does not take: use model.spec=local")


class RecursionRouter(torch.nn.Module):
    """`model.recursion_router` (first stage): `outputs` linear maps of [s; e] (2h): one logit per iteration
    (expert-choice: row i - 1 at iteration i) or r logits over the depths (token-choice). The weight is 2-D,
    drawn like every projection (a zero router would tie every score); the bias starts at zero."""

    def __init__(self, hidden_size: int, outputs: int, mode: str = "expert", gating: str = "weighted"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(outputs, 2 * hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(outputs))
        torch.nn.init.normal_(self.weight, std=0.02)
        self.mode, self.gating = mode, gating  # how it was trained: the decoder routes the same way

    def token_choice(self, state: torch.Tensor, e: torch.Tensor, r: int) -> tuple:
        """Token-choice over r depths: (p `[..., r]`, iterations each token runs `[...]` (1..r), its gate p_d)."""
        p = torch.softmax(self(state, e, slice(0, r)), dim=-1)
        depth = p.argmax(-1)
        return p, depth + 1, p.gather(-1, depth.unsqueeze(-1))[..., 0]

    def causal_choice(self, index: int, state: torch.Tensor, e: torch.Tensor, token_plan=None) -> tuple:
        """Before iteration `index` (1-based), the choice a decoder can make for each token: (continue `[...]`,
        gate `[...]`). Expert-choice: sigmoid(z_i) >= 1/2 (MoR's auxiliary-loss inference); token-choice: its
        depth reaches `index`, from `token_plan` = `token_choice(...)` made before iteration 1."""
        if self.mode == "token":
            _, runs, gate = token_plan
            return runs >= index, gate
        z = self(state, e, slice(index - 1, index))[..., 0]
        return z >= 0, torch.sigmoid(z)

    def forward(self, state: torch.Tensor, e: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Logits `[..., n]` of the rows `rows` of the map, from `state` and `e` `[..., h]` (float32 at least)."""
        dtype = torch.promote_types(state.dtype, torch.float32)
        x = torch.cat([state, e], dim=-1).to(dtype)
        return torch.nn.functional.linear(x, self.weight[rows].to(dtype), self.bias[rows].to(dtype))


class RouterObjective(Objective):
    kind = "recursion_router"
    Section = RouterSection

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.section = cfg.objective
        expert = self.section.router == "expert"
        self.means = TokenMeans("router/mean_depth", *(("router/aux_loss", "router/aux_accuracy") if expert
                                                       else ("router/balance_loss",)))

    @classmethod
    def extra_modules(cls, cfg, first_stage: bool, last_stage: bool) -> dict:
        if not first_stage:
            return {}
        o = cfg.objective
        return {"recursion_router": RecursionRouter(cfg.model.hidden_size, int(max_depth(cfg.recurrence)), o.router,
                                                    o.router_gating)}

    def set_step(self, step: int) -> None:
        self.means.reset()

    def loss_sum(self, model, mb, window, collect_health: bool = False) -> torch.Tensor:
        m = unwrap(model)
        e = m.embed(mb.tokens)
        state = previous = m.initial_state(e, mb.sample_ids)
        rope = m.rope(m.full_seq_len(e))
        route = self._expert if self.section.router == "expert" else self._token
        state, previous, aux, depth, accuracy = route(m, state, e, rope, window)
        if collect_health:
            from recurdepth.model.looped_gpt import recurrence_health

            m.last_health = recurrence_health(previous.detach(), state.detach())
        losses = m.head(state, mb.labels).to(torch.promote_types(state.dtype, torch.float32))
        mask = mb.loss_mask.to(losses.dtype)
        tokens = mask.sum()
        self.means.add(tokens, depth * tokens, aux.detach() * tokens, *(() if accuracy is None else
                                                                         (accuracy * tokens,)))
        weight = self.section.router_aux_weight if self.section.router == "expert" else \
            self.section.router_balance_weight
        return (losses * mask).sum() + weight * aux.to(losses.dtype) * tokens

    def _update(self, m, it, state, e, rope, index, gate):
        if self.section.router_gating == "none":
            gate = None
        if index is None:  # every token: the plain iteration, no gather
            with contextlib.nullcontext() if it.grad else torch.no_grad():
                out = m.iteration(it, state, e, rope)
                return out if gate is None else state + gate.t().unsqueeze(-1).to(out.dtype) * (out - state)
        return m.routed_iteration(it, state, e, rope, index, gate)

    def _expert(self, m, state, e, rope, window):
        """Expert-choice: per iteration, the top k_i of the active tokens by sigmoid(z_i) run the core."""
        s, b = state.shape[:2]
        counts = expert_counts(window.total, s, self.section.router_capacity)
        active = None  # [b, K] ascending positions of the tokens still active (None: all s)
        aux = torch.zeros((), dtype=torch.promote_types(state.dtype, torch.float32), device=state.device)
        hits, n = torch.zeros((), device=state.device), 0
        previous = state
        for it, k in zip(window.iterations(), counts):
            with contextlib.nullcontext() if it.grad else torch.no_grad():
                x, ex = (state, e) if active is None else (gather_rows(state, active), gather_rows(e, active))
                z = m.recursion_router(x, ex, slice(it.index - 1, it.index))[..., 0]  # [K_prev, b]
                chosen = torch.topk(z, k, dim=0, sorted=False).indices.sort(dim=0).values  # [k, b]
                target = torch.zeros_like(z).scatter_(0, chosen, 1.0)
                aux = aux + torch.nn.functional.binary_cross_entropy_with_logits(z, target)
                hits = hits + ((z >= 0) == (target > 0)).sum()
                n += z.numel()
                gate = torch.sigmoid(z).gather(0, chosen).t()  # [b, k]
                picked = chosen.t() if active is None else active.gather(1, chosen.t())  # [b, k] positions
                previous = state
                state = self._update(m, it, state, e, rope, None if k == s else picked, gate)
                active = None if k == s else picked
        depth = sum(counts) / s
        return state, previous, aux, depth, float(hits) / max(n, 1)

    def _token(self, m, state, e, rope, window):
        """Token-choice: a depth per token from one router before iteration 1; the balancing loss on its use."""
        r = window.total
        # with autograd even before the window: the gates of the window's iterations and the balancing loss train it
        p, runs, gate = m.recursion_router.token_choice(state, e, r)  # [s, b, r], [s, b], [s, b]
        used = torch.nn.functional.one_hot(runs - 1, r).to(p.dtype).reshape(-1, r).mean(0)  # f_j
        balance = r * (used * p.reshape(-1, r).mean(0)).sum()
        state, previous, ran = self.per_token_loop(m, state, e, rope, window, lambda it, s_, alive: (
            alive & (runs >= it.index), gate))
        return state, previous, balance, float(ran.mean()), None

    def per_token_loop(self, m, state, e, rope, window, decide) -> tuple:
        """Iterations whose routed tokens each decide for themselves: `decide(it, state, alive [s, b]) -> (routed
        [s, b], gate [s, b])` before iteration `it` (alive: routed at the iteration before). Rows are gathered and
        padded to the longest. Returns (s_r, s_{r-1}, iterations each token ran `[s, b]`)."""
        s = state.shape[0]
        positions = torch.arange(s, device=state.device)
        alive = torch.ones(state.shape[:2], dtype=torch.bool, device=state.device)
        previous, runs = state, torch.zeros(state.shape[:2], dtype=torch.float64, device=state.device)
        for it in window.iterations():
            with contextlib.nullcontext() if it.grad else torch.no_grad():
                alive, gate = decide(it, state, alive)
            count = alive.sum(0)  # [b]
            K = int(count.max())
            if K == 0:
                break
            runs = runs + alive.double()
            previous = state
            if K == s and bool((count == s).all()):
                state = self._update(m, it, state, e, rope, None, gate.t())
                continue
            key = torch.where(alive.t(), positions, positions + s)  # [b, s]: active first, in order
            order = key.sort(dim=1).values[:, :K]
            index, valid = order % s, order < s
            row_gate = None if self.section.router_gating == "none" else gate.t().gather(1, index)
            state = m.routed_iteration(it, state, e, rope, index, row_gate, valid)
        return state, previous, runs

    def causal_forward(self, model, tokens: torch.Tensor, window, s0: Optional[torch.Tensor] = None,
                       sample_ids=None, labels: Optional[torch.Tensor] = None) -> tuple:
        """The routed model on `tokens [b, s]` from `s0 [s, b, h]` (default: the model's per-sample draw) with
        decisions a decoder can make: token-choice as trained; expert-choice by threshold, a token continuing past
        iteration i while sigmoid(z_i) >= 1/2 (MoR's auxiliary-loss inference). Returns (logits `[b, s, V]`, or
        per-token losses `[b, s]` with `labels`; iterations per token `[s, b]`)."""
        m = unwrap(model)
        e = m.embed(tokens)
        s0 = m.initial_state(e, sample_ids) if s0 is None else s0
        rope = m.rope(m.full_seq_len(e))
        router = m.recursion_router
        plan = router.token_choice(s0, e, window.total) if router.mode == "token" else None

        def decide(it, state, alive):
            go, gate = router.causal_choice(it.index, state, e, plan)
            return alive & go, gate

        state, _, runs = self.per_token_loop(m, s0, e, rope, window, decide)
        return m.head(state, labels), runs

    def metrics(self) -> dict[str, float]:
        return self.means.pop()

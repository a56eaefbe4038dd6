"""Learned depth: an exit gate read out after every iteration, trained as Ouro's or PonderNet's halting.

After iteration i = 1..n the model is read out (coda, final norm, head: `LoopedGPTModel.readout_forward`), which
gives each token a loss L_i and a final-norm hidden state h_i. A gate (`model.exit_gate`, last stage) maps h_i to
the probability of stopping there,

    lambda_i = sigmoid(w . h_i + b)                                   per token and iteration
    p(i)     = lambda_i prod_{j<i} (1 - lambda_j)     for i < n,      p(n) = prod_{j<n} (1 - lambda_j)

(the mass left after n-1 continues is the last iteration's; lambda_n is not used), computed in log space:
log p(i) = log sigma(z_i) + sum_{j<i} log sigma(-z_j). Per token, with the loss mask:

    exit_gate (Ouro, Zhu et al. 2025, arXiv 2510.25741, eq. 4):  sum_i p(i) L_i - beta H(p),   H(p) = -sum p log p
    ponder    (PonderNet, Banino et al. 2021, arXiv 2107.05407): sum_i p(i) L_i + beta KL(p || q),
              q(i) = lambda_p (1 - lambda_p)^(i-1) / Z  (the geometric prior truncated to the n readouts, Z its mass)

`objective.readout=all` reads out every iteration of the step's r (so n = r and the gate learns every exit);
`last` reads out the last `recurrence.backprop_depth` only (fewer head passes; the exits before are not
learned). Readouts of iterations outside the truncated-backprop window are constants to the core, but their
coda, head and gate terms carry gradients. The per-token losses and the gate run in float32 at least.

exit_gate_tune (Ouro's second stage, sec. 3.4): the LM frozen (every parameter but the gate), its readouts
computed without gradients; per token and iteration i < n the detached improvement of going on,
I_i = max(0, L_i - L_{i+1}), gives the target probability of continuing w_i = sigmoid(k (I_i - gamma)) (k = 50,
gamma = 0.005: `objective.tune_slope`, `objective.tune_margin`), and the gate is trained with the binary cross-entropy
-[w_i log(1 - lambda_i) + (1 - w_i) log lambda_i], averaged over the n - 1 decisions. Start it from a stage-1
checkpoint with `checkpoint.init_from=RUN_DIR` (a fresh run: new optimizer state).

Metrics: `exit/mean_depth` (E_p[i] over the loss-masked tokens, in iterations), `exit/entropy`, `exit/final_loss`
(the last readout's token-mean loss), `exit/expected_loss` (E_p[L]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from recurdepth.config import require
from recurdepth.objectives.base import Objective, ObjectiveSection, TokenMeans
from recurdepth.parallel.passes import unwrap


def halting_log_probs(z: torch.Tensor) -> torch.Tensor:
    """log p(i) `[n, ...]` of the halting distribution from gate logits z `[n, ...]` (z[n-1] is not used)."""
    n = z.shape[0]
    if n == 1:
        return torch.zeros_like(z)
    stop = torch.nn.functional.logsigmoid(z[:-1])
    go_on = torch.nn.functional.logsigmoid(-z[:-1]).cumsum(0)  # sum_{j<=i} log(1 - lambda_j)
    before = torch.cat([torch.zeros_like(go_on[:1]), go_on[:-1]])  # sum_{j<i}
    return torch.cat([stop + before, go_on[-1:]])


def geometric_log_prior(n: int, rate: float, like: torch.Tensor) -> torch.Tensor:
    """log q(i), i = 1..n, of Geometric(rate) truncated to n and renormalised; shaped `[n, 1, ...]` to broadcast
    against `like` `[n, ...]`."""
    i = torch.arange(n, dtype=torch.float64)
    log_q = torch.log(torch.tensor(rate, dtype=torch.float64)) + i * torch.log1p(torch.tensor(-rate, dtype=torch.float64))
    log_q = log_q - torch.logsumexp(log_q, 0)
    return log_q.to(like.dtype).to(like.device).reshape(n, *([1] * (like.dim() - 1)))


class ExitGate(torch.nn.Module):
    """`model.exit_gate` (last pipeline stage): lambda = sigmoid(w . h + b). w `[h]` and b `[1]` are 1-D, which
    `initialize_parameters` fills with zeros: lambda = 1/2 at init."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate logits z `[...]` from hidden states `[..., h]` (in float32 at least)."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return hidden.to(dtype) @ self.weight.to(dtype) + self.bias.to(dtype)


@dataclass
class HaltingSection(ObjectiveSection):
    """`objective.*` of the learned-exit objectives."""

    kind: str = "exit_gate"
    readout: str = "all"  # all: every iteration is read out (every exit learned); last: the last backprop_depth
    exit_beta: float = 0.1  # exit_gate: the entropy bonus's weight (Ouro's beta); ponder: the KL's weight
    ponder_prior: float = 0.25  # ponder: lambda_p of the geometric prior (prior mean depth 1 / lambda_p)

    def validate(self, cfg) -> None:
        require(self.readout in ("all", "last"), "objective.readout", self.readout, "use all or last")
        require(self.exit_beta >= 0, "objective.exit_beta", self.exit_beta, "use a weight >= 0")
        require(0 < self.ponder_prior < 1, "objective.ponder_prior", self.ponder_prior, "use a rate in (0, 1)")
        require(cfg.parallel.pipeline == 1 or cfg.parallel.pipeline_split == "looped", "parallel.pipeline_split",
                cfg.parallel.pipeline_split, f"objective.kind={self.kind} reads the state out after iterations "
                f"inside the looped pipeline schedule; use parallel.pipeline_split=looped")


class HaltingObjective(Objective):
    """Shared by `exit_gate` and `ponder`: readouts, gate, halting distribution; `regulariser(log_p)` differs."""

    kind = "exit_gate"
    Section = HaltingSection

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.section = cfg.objective
        self.means = TokenMeans("exit/mean_depth", "exit/entropy", "exit/final_loss", "exit/expected_loss")

    @classmethod
    def extra_modules(cls, cfg, first_stage: bool, last_stage: bool) -> dict:
        return {"exit_gate": ExitGate(cfg.model.hidden_size)} if last_stage else {}

    def set_step(self, step: int) -> None:
        self.means.reset()  # the metrics cover one step's (or one evaluation's) micro-batches

    def read_at(self, window) -> Optional[list]:
        """The iterations read out: every one, or the last `recurrence.backprop_depth`."""
        if self.section.readout == "all":
            return None
        k = max(1, self.cfg.recurrence.backprop_depth)
        return list(range(max(1, window.total - k + 1), window.total + 1))

    def regulariser(self, log_p: torch.Tensor) -> torch.Tensor:
        """-beta H(p) per token `[b, s]` (Ouro's entropy bonus)."""
        return self.section.exit_beta * (log_p.exp() * log_p).sum(0)

    def token_losses(self, losses: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token objective `[b, s]`, log p `[n, b, s]`) from readout losses and gate logits `[n, b, s]`."""
        log_p = halting_log_probs(z)
        expected = (log_p.exp() * losses).sum(0)
        return expected + self.regulariser(log_p), log_p

    def loss_sum(self, model, mb, window, collect_health: bool = False) -> torch.Tensor:
        m = unwrap(model)
        frozen = getattr(self.section, "forward_only", False)  # exit_gate_tune: the readouts are data for the gate
        with torch.no_grad() if frozen else contextlib.nullcontext():
            picked, losses, hidden = m.readout_forward(mb.tokens, mb.labels, window, mb.sample_ids,
                                                       self.read_at(window), collect_health)
        return self.readout_loss(m, picked, losses, hidden, mb)

    def readout_loss(self, m, picked, losses, hidden, mb) -> torch.Tensor:
        losses = losses.to(torch.promote_types(hidden.dtype, torch.float32))  # megatron's cross-entropy is float32
        per_token, log_p = self.token_losses(losses, m.exit_gate(hidden))
        self._record(picked, losses.detach(), log_p.detach(), mb.loss_mask)
        return (per_token * mb.loss_mask).sum()

    def pipeline_readouts(self, window) -> list:
        """Under PP: the last stage reads out these iterations inside the looped schedule (parallel/pipeline.py)."""
        return self.read_at(window) or list(range(1, window.total + 1))

    def pipeline_readout_loss(self, picked, losses, hidden, mb) -> torch.Tensor:
        if getattr(self.section, "forward_only", False):  # exit_gate_tune: the readouts are data for the gate
            losses, hidden = losses.detach(), hidden.detach()
        return self.readout_loss(unwrap(self.model), picked, losses, hidden, mb)

    def _record(self, picked, losses, log_p, mask) -> None:
        p = log_p.exp()
        depth = torch.tensor(picked, dtype=p.dtype, device=p.device).reshape(-1, 1, 1)
        mask = mask.to(p.dtype)
        self.means.add(mask.sum(), ((p * depth).sum(0) * mask).sum(), (-(p * log_p).sum(0) * mask).sum(),
                       (losses[-1] * mask).sum(), ((p * losses).sum(0) * mask).sum())

    def metrics(self) -> dict[str, float]:
        """This rank's token means over the step's micro-batches (data-parallel ranks see their own tokens)."""
        return self.means.pop()


class ExitGateObjective(HaltingObjective):
    """Ouro's entropy-regularised expected loss over the exits."""

    kind = "exit_gate"


@dataclass
class PonderSection(HaltingSection):
    kind: str = "ponder"
    exit_beta: float = 0.01  # PonderNet's beta (the KL's weight)


class PonderObjective(HaltingObjective):
    """PonderNet: the expected loss plus beta KL(p || truncated Geometric(lambda_p))."""

    kind = "ponder"
    Section = PonderSection

    def regulariser(self, log_p: torch.Tensor) -> torch.Tensor:
        log_q = geometric_log_prior(log_p.shape[0], self.section.ponder_prior, log_p)
        return self.section.exit_beta * (log_p.exp() * (log_p - log_q)).sum(0)


@dataclass
class ExitGateTuneSection(HaltingSection):
    forward_only: ClassVar[bool] = True  # FLOPs: the LM is only read (recurdepth/train/flops.py)
    kind: str = "exit_gate_tune"
    tune_slope: float = 50.0  # k of w = sigmoid(k (I - gamma))
    tune_margin: float = 0.005  # gamma: the improvement in loss worth one more iteration

    def validate(self, cfg) -> None:
        super().validate(cfg)
        require(self.tune_slope > 0, "objective.tune_slope", self.tune_slope, "use a slope > 0 (Ouro: 50)")


class ExitGateTuneObjective(HaltingObjective):
    """Ouro's stage II: only the gate trains, towards continuing where the next iteration still helps."""

    kind = "exit_gate_tune"
    Section = ExitGateTuneSection

    @classmethod
    def trainable(cls, cfg, name: str) -> bool:
        return name.startswith("exit_gate.")

    def token_losses(self, losses: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token BCE `[b, s]`, log p `[n, b, s]`) from detached readout losses and gate logits `[n, b, s]`."""
        log_p = halting_log_probs(z)
        n = z.shape[0]
        if n == 1:
            return z[0] * 0, log_p
        improvement = (losses[:-1] - losses[1:]).clamp_min(0).detach()
        go_on = torch.sigmoid(self.section.tune_slope * (improvement - self.section.tune_margin))
        log_stop, log_go = torch.nn.functional.logsigmoid(z[:-1]), torch.nn.functional.logsigmoid(-z[:-1])
        return -(go_on * log_go + (1 - go_on) * log_stop).mean(0), log_p

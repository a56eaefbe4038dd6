"""FLOPs of the looped model and the peak they are measured against (MFU / HFU).

Per token and forward pass (matmuls only, 2 FLOPs per multiply-add; attention scores counted over the
full s x s square, megatron's convention):
    F_layer   = 2h(d_q + 2 d_kv) + 2 d_q h + 4 s d_q + F_mlp,   F_mlp = (6 h f for swiglu | 4 h f for gelu)
    (d_q = heads x head_dim, d_kv = groups x head_dim; d_q = h unless model.head_dim says otherwise)
    with experts (model.num_experts = E, top-k routing, dropless): F_mlp = k_top (6|4) h f_moe + 2 h E (router);
    the core's layers have experts, the prelude's and coda's too with model.moe_layers=all
    F_core    = R F_layer + F_adapter          (F_adapter = 4h^2 for concat/gate, 0 for add)
    F_prelude = P F_layer,  F_coda = C F_layer,  F_head = 2 h V
A training step with r iterations, gradients through min(r, k) of them, costs per token
    MFU FLOPs = 3 (F_prelude + F_coda + F_head) + (r + 2 min(r, k)) F_core
(no-grad iterations are forward only; backward costs twice a forward). The adaptive-depth objectives read the
model out after n iterations (`objective.readout`: n = r for all, min(r, k) for last), each readout
back-propagated through coda and head: 3 n (F_coda + F_head) in place of 3 (F_coda + F_head). Deep supervision
(`objective.supervision_segments` = S) reads out n = min(S, r) segment ends and back-propagates min(m, k) of each
segment's m iterations: min(r, k) above becomes the sum over segments. An objective that only reads a frozen model
(exit_gate_tune, `forward_only`) costs one forward: F_prelude + n (F_coda + F_head) + r F_core. With per-iteration activation
checkpointing the hardware also re-runs min(r, k) core forwards: HFU FLOPs add min(r, k) F_core.
The recursion router (objective.kind=recursion_router) runs iteration i on a fraction a_i of each sequence's tokens
(expert-choice: a_i = k_i / s exactly, objectives/router.py `expert_counts`; token-choice: (r - i + 1) / r, the
balanced share, an estimate: its counts depend on the data). Their attention is over a_i s tokens, so per token
of the batch iteration i costs a_i (F_core - R 4 s h) + a_i^2 R 4 s h, plus the router: expert-choice 4h on each
of the a_{i-1} s candidates (a_0 = 1), token-choice 4 h r once per token (always back-propagated); every
iteration's term is 3x in the window and 1x before it, and a_i = 1 for every i is the plain count.
The dense-equivalent GPT (same h, P + r R + C layers, every layer back-propagated) costs
    3 ((P + r R + C) F_layer + F_head)   per token (`dense_flops_per_token`; dense MLPs).
torch's FlopCounterMode counts exactly these on the real forward and backward (tests/train/test_flop_counter.py),
plus, with SDPA, the flash backward's recomputation of Q K^T (2 s h per token and back-propagated layer), which
this count leaves out as megatron's does.

The denominator of MFU/AFU on CPU is the best FLOP/s of a large fp32 `torch.mm` measured in the same process
with the same thread count: several sizes, several repeats, the best kept (a shared machine only ever makes a
measurement slower, so the best is the least disturbed one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recurdepth.config import Config
from recurdepth.devices import ACCELERATORS, datasheet_peak_flops
from recurdepth.model.depth import dense_layers, segment_windows
from recurdepth.model.layers import default_ffn_hidden_size

# Dense bf16 peak FLOP/s of common accelerators (datasheet, without sparsity), by CUDA device-name substring:
# the one table is recurdepth/devices.py, which `recurdepth plan` reads too.
GPU_PEAK_FLOPS = {acc.match: acc.peak_flops for acc in ACCELERATORS}


@dataclass(frozen=True)
class LoopedFlops:
    prelude: float
    core: float
    coda: float
    head: float
    readout: str = "final"  # objective.readout of the adaptive-depth objectives: all | last (| final: s_r only)
    readout_depth: int = 0  # `last`: the readouts are the last readout_depth iterations (recurrence.backprop_depth)
    segments: int = 1  # deep supervision: the step's r split into this many segments, each read out, each truncated
    forward_only: bool = False  # the model is frozen and only read (exit_gate_tune): no backward through it
    router: str = ""  # recursion_router: expert | token ("" for every other objective: a_i = 1)
    router_capacity: tuple = ()  # its objective.router_capacity
    core_attention: float = 0.0  # R 4 s h: the part of F_core over the s x s square
    seq_length: int = 0
    hidden_size: int = 0

    def readouts(self, r: int) -> int:
        """How many times coda + head run on one token's states: once, or per read-out iteration or segment."""
        if self.segments > 1:
            return min(self.segments, r)
        if self.readout == "all":
            return r
        if self.readout == "last":
            return min(r, max(1, self.readout_depth))
        return 1

    def active_fractions(self, r: int) -> list:
        """a_1..a_r: the share of a sequence's tokens that runs each core iteration (1 without a router)."""
        if self.router == "expert":
            from recurdepth.objectives.router import expert_counts

            return [k / self.seq_length for k in expert_counts(r, self.seq_length, list(self.router_capacity))]
        if self.router == "token":
            return [(r - i) / r for i in range(r)]
        return [1.0] * r

    def _routed_per_token(self, r: int, k: int, recompute: bool) -> float:
        grad_from = r - min(r, k)  # iterations 1..grad_from run without autograd
        fractions, total = self.active_fractions(r), 0.0
        for i, a in enumerate(fractions):
            core = a * (self.core - self.core_attention) + a * a * self.core_attention
            router = 4 * self.hidden_size * (fractions[i - 1] if i else 1.0) if self.router == "expert" else 0.0
            grad = i >= grad_from
            total += (3 if grad else 1) * (core + router) + (core if grad and recompute else 0.0)
        if self.router == "token":
            total += 3 * 4 * self.hidden_size * r
        return 3 * (self.prelude + self.coda + self.head) + total

    def per_token(self, r: int, k: int, recompute: bool = False) -> float:
        if self.router:
            return self._routed_per_token(r, k, recompute)
        if self.forward_only:  # one forward of everything, every readout included; nothing back-propagated
            return self.prelude + self.readouts(r) * (self.coda + self.head) + r * self.core
        grad = min(r, k) if self.segments <= 1 else sum(w.with_grad for w in segment_windows(r, self.segments, k))
        core_passes = r + 2 * grad + (grad if recompute else 0)
        return 3 * self.prelude + 3 * self.readouts(r) * (self.coda + self.head) + core_passes * self.core


def mlp_flops(cfg: Config, experts: bool) -> float:
    """F_mlp: forward FLOPs per token of a block's MLP; with `experts`, the top-k experts a token is routed to
    (each of megatron's MoE ffn size) and the router."""
    m = cfg.model
    h, per_width = m.hidden_size, (6 if m.activation == "swiglu" else 4) * m.hidden_size
    dense_f = m.ffn_hidden_size or default_ffn_hidden_size(h, m.activation)
    if not experts:
        return per_width * dense_f
    return m.moe_top_k * per_width * (m.moe_ffn_hidden_size or dense_f) + 2 * h * m.num_experts


def layer_flops(cfg: Config, experts: Optional[bool] = None) -> float:
    """F_layer: forward FLOPs per token of one transformer block (see the module docstring); `experts`: whether
    its MLP is the MoE layer (default: as the core's blocks are built, i.e. when model.num_experts is set)."""
    m = cfg.model
    h, s = m.hidden_size, m.seq_length
    d = m.head_width
    q, kv = m.num_heads * d, (m.num_query_groups or m.num_heads) * d  # q = h unless model.head_dim says otherwise
    experts = bool(m.num_experts) if experts is None else experts
    return 2 * h * (q + 2 * kv) + 2 * q * h + 4 * s * q + mlp_flops(cfg, experts)


def looped_flops(cfg: Config, vocab_size: int) -> LoopedFlops:
    """The model's FLOPs per token by part. model.kind=dense (megatron GPTModel, `dense_layers(cfg)` blocks) is
    all "prelude": no core, so `per_token(r, k)` is its 3 (L F_layer + F_head) whatever r and k."""
    m = cfg.model
    if m.kind == "dense":
        return LoopedFlops(prelude=dense_layers(cfg) * layer_flops(cfg, experts=False), core=0.0, coda=0.0,
                           head=2 * m.hidden_size * vocab_size)
    core_layer, h = layer_flops(cfg), m.hidden_size
    outer_layer = layer_flops(cfg, experts=bool(m.num_experts) and m.moe_layers == "all")
    adapter = 4 * h * h if m.adapter in ("concat", "gate") else 0
    return LoopedFlops(prelude=m.prelude_layers * outer_layer, core=m.core_layers * core_layer + adapter,
                       coda=m.coda_layers * outer_layer, head=2 * h * vocab_size,
                       readout=getattr(cfg.objective, "readout", "final"), readout_depth=cfg.recurrence.backprop_depth,
                       segments=getattr(cfg.objective, "supervision_segments", 1),
                       forward_only=getattr(cfg.objective, "forward_only", False),
                       router=getattr(cfg.objective, "router", "") if cfg.objective.kind == "recursion_router" else "",
                       router_capacity=tuple(getattr(cfg.objective, "router_capacity", ())),
                       core_attention=m.core_layers * 4 * m.seq_length * h, seq_length=m.seq_length, hidden_size=h)


def dense_flops_per_token(cfg: Config, vocab_size: int, num_layers: int) -> float:
    """Training FLOPs per token of a dense GPT with `num_layers` of the looped model's blocks (dense MLPs, as
    `recurdepth bench dense` builds it)."""
    return 3 * (num_layers * layer_flops(cfg, experts=False) + 2 * cfg.model.hidden_size * vocab_size)


def peak_flops(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The denominator of MFU: configured, a datasheet bf16 figure on known GPUs, else the matmul peak of this
    machine in the step's dtype and threads, measured once and cached (`recurdepth/peak.py`)."""
    from recurdepth.peak import cached_peak, mfu_peak

    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if device.type == "cuda":
        datasheet = datasheet_peak_flops(torch.cuda.get_device_name(device))
        if datasheet is not None:
            return datasheet
        return cached_peak(str(device), torch.bfloat16).flops
    return mfu_peak("cpu", dtype)  # bf16 on a CPU that emulates it: at least the fp32 peak (MFU <= 1)

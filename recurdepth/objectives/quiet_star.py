"""Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629) on the looped model: think T tokens after every position.

For a sequence x_0..x_{s-1} the objective runs the model on s parallel *thought streams*, one after every position
i, laid out as blocks of s tokens each (block-major, `nb = T + 2 + n_ahead` blocks):

    block 0            x_0 .. x_{s-1}                   the real tokens (causal among themselves)
    block 1            <|start_thought|>  (learned vector)
    blocks 2..T+1      t_1 .. t_T         sampled thought tokens, t_j ~ softmax(head(block j) / temperature)
    block T+2          <|end_thought|>    (learned vector)
    blocks T+3..       x_{i+1} .. x_{i+n_ahead-1}  (teacher forcing of the true continuation)

Token (block j, position i) has RoPE position i + j and sees the real tokens <= i and its own stream's blocks
1..j only (`stream_mask`, a boolean block mask for SDPA), so every stream is a causal continuation of its
prefix. The hidden states h_k (k = 0..n_ahead-1) of blocks T+2+k predict x_{i+k+1}; the mixing head combines
each with the plain forward's hidden state h_base at position i+k:

    w     = tanh(v . relu(W [h_base; h_k] + b) + c)       v, c zero at init: w = 0 exactly
    p_mix = softmax(head(h_base + w (h_k - h_base)))
    NLL   = base + (1 - base_loss_weight) * mean_{passes, k} (L_mix - base)  per true token (= base at init)
    R     = sum_k log p_mix(x_{i+k+1})  of each of the n_passes thoughts at position i
    REINFORCE: - reinforce_weight * (R - mean_passes R) * sum_j log pi(t_j)   (value 0, gradient only)

Thoughts are sampled with Gumbel-max noise from generators seeded by (seed, global sample index, pass), drawn on
the model's device step by step (`GumbelNoise`): the global sample index fixes the optimizer step too, so every
data-parallel layout and a resumed run sample the same thoughts. The T sampling forwards run without autograd,
block by block: step j runs block j alone, attending through `StreamAttention` (block-sparse: a query scores the
s real-token keys and its own stream's j keys, not all blocks * s) to the keys and values cached from blocks
0..j-1 at every layer and iteration. One forward with autograd over all blocks (block-sparse, or dense masked
SDPA: `objective.stream_attention`) then gives the thought log-probabilities and the talk hidden states.
Per micro-batch that is (T + 1) blocks of sampling and T + 2 + n_ahead blocks with autograd, for each pass;
the dense implementation before it (kept as `dense_streams`, the tests' reference) reran the growing prefix,
T (T + 3) / 2 blocks of sampling.

On the looped model every thought token passes through the same r core iterations as the real tokens (its
initial state s_0 is that of the position it thinks after), attending at each iteration to the prefix's
state at that iteration: thinking in depth (r) and in tokens (T) multiply, T + 2 + n_ahead streamed tokens per
position each get r iterations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from recurdepth.config import require
from recurdepth.model.depth import BackpropWindow
from recurdepth.model.layers import hook_output, hook_qkv, hook_unsupported
from recurdepth.objectives.base import Objective, ObjectiveSection
from recurdepth.objectives.lm import masked_loss_sum
from recurdepth.parallel.passes import StageLink, pipelined_forward, run_micro_batches, unwrap
from recurdepth.seeding import derive_seed, device_generator

_NOISE_STREAM = 0x7A1E57  # thought-sampling noise, apart from the other per-sample streams
STREAM_ATTENTION = ("auto", "sparse", "dense")


@dataclass
class QuietStarSection(ObjectiveSection):
    """`objective.*` of Quiet-STaR: T thought tokens after every position, scored on the next n_ahead tokens."""

    kind: str = "quiet_star"
    thought_length: int = 8  # T sampled thought tokens between <|start_thought|> and <|end_thought|>
    n_ahead: int = 4  # true tokens predicted (teacher-forced) after each thought
    n_passes: int = 2  # thoughts sampled per position; their mean reward is the REINFORCE baseline
    reinforce_weight: float = 1.0  # weight of the REINFORCE term on the thought tokens
    thought_temperature: float = 1.0  # sampling temperature of thought tokens (and of their log-probs)
    base_loss_weight: float = 0.5  # share of the plain LM loss in the NLL (the rest: the mixed loss)
    checkpoint_thoughts: bool = False  # recompute each thought pass in backward instead of storing it
    # how the autograd pass over all T + 2 + n_ahead blocks attends: "sparse" (block-sparse, s + j keys per query;
    # saves the attention probabilities, blocks * s^2 per head, layer and iteration), "dense" (masked SDPA, flash
    # kernels: memory linear in blocks * s, compute quadratic), "auto" (sparse on CPU, dense on GPU). Sampling
    # always runs block by block over a KV cache.
    stream_attention: str = "auto"

    def validate(self, cfg) -> None:
        require(self.thought_length >= 1, "objective.thought_length", self.thought_length,
                 "use at least 1 thought token")
        require(1 <= self.n_ahead < cfg.model.seq_length, "objective.n_ahead", self.n_ahead,
                 f"use 1 <= n_ahead < model.seq_length={cfg.model.seq_length}")
        require(self.n_passes >= 1, "objective.n_passes", self.n_passes, "use at least 1 thought per position")
        require(self.reinforce_weight >= 0, "objective.reinforce_weight", self.reinforce_weight, "use a weight >= 0")
        require(self.n_passes >= 2 or self.reinforce_weight == 0, "objective.n_passes", self.n_passes,
                 "REINFORCE needs n_passes >= 2 (their mean reward is the baseline), or set reinforce_weight=0")
        require(self.thought_temperature > 0, "objective.thought_temperature", self.thought_temperature,
                 "use a temperature > 0")
        require(0 <= self.base_loss_weight <= 1, "objective.base_loss_weight", self.base_loss_weight,
                 "use 0 <= w <= 1")
        require(self.stream_attention in STREAM_ATTENTION, "objective.stream_attention", self.stream_attention,
                 f"use one of {', '.join(STREAM_ATTENTION)}")
        require(not cfg.parallel.sequence_parallel, "parallel.sequence_parallel", True,
                 "objective.kind=quiet_star does not support sequence parallelism yet; set it to false")
        require(not (self.checkpoint_thoughts and cfg.parallel.pipeline > 1), "objective.checkpoint_thoughts", True,
                 "per-thought checkpointing is single-stage only; set it to false with parallel.pipeline > 1")


class QuietStarParameters(torch.nn.Module):
    """Quiet-STaR's own weights, a submodule `model.quiet_star` so DDP, the optimizer and checkpoints see them.

    First pipeline stage: `thought_embeddings [2, h]`, the learned input vectors of <|start_thought|> and
    <|end_thought|>. Last stage: the mixing head w = tanh(v . relu(W [h_base; h_thought] + b) + c),
    `mix_in` W `[h, 2h]`, `mix_in_bias` b, `mix_out` v `[h]`, `mix_out_bias` c `[1]`. v and c are 1-D, which
    `initialize_parameters` fills with zeros (as here): w = 0 exactly at init,
    so training starts as the base model, while dw/dv = relu(...) != 0 lets the head learn.
    """

    def __init__(self, hidden_size: int, first_stage: bool = True, last_stage: bool = True):
        super().__init__()
        h = hidden_size
        if first_stage:
            self.thought_embeddings = torch.nn.Parameter(torch.empty(2, h))
            torch.nn.init.normal_(self.thought_embeddings, std=(2.0 / (5.0 * h)) ** 0.5)
        if last_stage:
            self.mix_in = torch.nn.Parameter(torch.empty(h, 2 * h))
            torch.nn.init.normal_(self.mix_in, std=(2.0 / (5.0 * h)) ** 0.5)
            self.mix_in_bias = torch.nn.Parameter(torch.zeros(h))
            self.mix_out = torch.nn.Parameter(torch.zeros(h))
            self.mix_out_bias = torch.nn.Parameter(torch.zeros(1))

    def mixing_weight(self, base: torch.Tensor, thought: torch.Tensor) -> torch.Tensor:
        """w `[..., 1]` from the base and post-thought hidden states `[..., h]`."""
        z = torch.nn.functional.linear(torch.cat([base, thought], -1), self.mix_in, self.mix_in_bias).relu()
        return torch.tanh(z @ self.mix_out.unsqueeze(-1) + self.mix_out_bias)


# ---------------------------------------------------------------- layout of the thought streams


def num_blocks(thought_length: int, n_ahead: int) -> int:
    """Blocks of the stream layout: real tokens, start, T thoughts, end, n_ahead - 1 teacher-forced tokens."""
    return thought_length + 2 + n_ahead


def stream_positions(s: int, blocks: int, device=None) -> torch.Tensor:
    """RoPE positions `[blocks * s]`: token (block j, position i) sits at i + j."""
    return (torch.arange(s, device=device).repeat(blocks) + torch.arange(blocks, device=device).repeat_interleave(s))


def stream_mask(s: int, blocks: int, device=None) -> torch.Tensor:
    """Boolean attention mask `[blocks * s, blocks * s]`, True = masked out. Real tokens are causal; token
    (block j >= 1, position i) sees real tokens <= i and tokens (block j', position i) with 1 <= j' <= j."""
    j = torch.arange(blocks, device=device).repeat_interleave(s)
    i = torch.arange(s, device=device).repeat(blocks)
    jq, iq, jk, ik = j[:, None], i[:, None], j[None, :], i[None, :]
    prefix = (jk == 0) & (ik <= iq)
    own_stream = (jq >= 1) & (jk >= 1) & (ik == iq) & (jk <= jq)
    return ~(prefix | own_stream)


class GumbelNoise:
    """Gumbel(0, 1) noise for thought sampling, drawn one thought step at a time: `next()` gives `[rows, s, V]`
    (pass-major rows), from one generator per (seed, sample id, pass) on `device`, in `dtype` (the sampling
    dtype: float32 or better). Deterministic per sample, so independent of the batch layout, rank and resume
    point; step j's draw continues the generator of step j - 1 (on CPU equal to one `[T, s, V]` draw per
    generator). Memory is one step's logits, not T's, and nothing is drawn on the host."""

    def __init__(self, seed: int, sample_ids, passes: int, s: int, vocab: int, dtype: torch.dtype, device):
        device = torch.device(device)
        self.shape, self.dtype, self.device = (s, vocab), dtype, device
        self.generators = [device_generator(device, derive_seed(seed, _NOISE_STREAM, int(sid), p))
                           for p in range(passes) for sid in sample_ids]

    def next(self) -> torch.Tensor:
        u = torch.stack([torch.rand(self.shape, generator=g, dtype=self.dtype, device=self.device)
                         for g in self.generators])
        return -torch.log(-torch.log(u.clamp_min(1e-20)))


@functools.lru_cache(maxsize=64)
def _stream_masks(s: int, first: int, J: int, B: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal `[s, s]`, own `[J, B]`) of `StreamAttention`: key position <= query position among the real tokens;
    stream block b + 1 <= the query's block (first + j)."""
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    own = torch.arange(1, B + 1, device=device)[None, :] <= torch.arange(first, first + J, device=device)[:, None]
    return causal, own


class StreamAttention:
    """Self-attention over the thought-stream layout, block-sparse: the query of (block j, position i) scores the
    real tokens <= i (block 0, causal) and its own stream's blocks 1..j at position i — s + j keys, not the
    blocks * s of a dense masked SDPA (`stream_mask` is the same pattern, dense):

        a_0[j, i, k] = q[j, i] . k[0, k] / sqrt(d)    (k <= i)        a_1[j, i, j'] = q[j, i] . k[j', i] / sqrt(d)
        (p_0, p_1) = softmax([a_0, a_1])   (1 <= j' <= j)             out[j, i] = p_0 v[0] + sum_j' p_1[j'] v[j', i]

    Each layer keeps its own projections, RoPE (position i + j) and output projection (megatron's
    `get_query_key_value_tensors` and `linear_proj`; grouped-query heads repeated, tensor-parallel heads local).
    With a cache of `blocks` blocks (no autograd: for sampling), the keys and values of every block run so far are
    kept per layer and iteration (stream blocks position-major: `[rows, n, s, blocks - 1, d]`), so a call may run only the new blocks [first, last) (sampling thought j runs
    block j alone). `at(first, last)` gives `pipelined_forward`'s `attend_at` for one call."""

    def __init__(self, model, s: int, blocks: int = 0):
        why = hook_unsupported(model.config) or (
            f"attention_dropout={model.config.attention_dropout}" if model.config.attention_dropout else None)
        if why is not None:
            raise ValueError(f"the thought streams' attention does not reproduce the model's with {why}")
        self.m, self.s, self.blocks, self.cache = model, s, blocks, blocks > 0
        self.kv: dict = {}  # (layer name, iteration) -> (k0, v0 [rows, n, s, d], ks, vs [rows, n, s, blocks - 1, d])

    def at(self, first: int, last: int):
        """`attend_at` for a call over blocks [first, last) (from block 0, unless the cache holds the earlier ones)."""
        assert first == 0 or self.cache, "a call from block > 0 needs the cache of the blocks before it"
        assert not (self.cache and torch.is_grad_enabled()), "the cache is written in place: use it without autograd"
        assert not self.cache or last <= self.blocks, f"blocks up to {last}: the cache holds {self.blocks}"
        freqs = self.m.rope(self.s + last, stream_positions(self.s, last)[first * self.s:])

        def attend_at(iteration: Optional[int]):
            def attend_for(name: str, layer):
                return lambda normed: self.attend(layer, normed, (name, iteration), first, freqs)
            attend_for.recomputable = not self.cache  # checkpointed iterations may rerun it in backward
            return attend_for
        return attend_at

    def attend(self, layer, x: torch.Tensor, key, first: int, freqs: torch.Tensor) -> torch.Tensor:
        """Attention of the blocks [first, first + J) `x [J * s, rows, h]` (normed) -> `[J * s, rows, h]`, at
        the RoPE frequencies `freqs [J * s, 1, 1, d]` of their positions."""
        attn = layer.self_attention
        q, k, v = hook_qkv(attn, x, freqs)  # [J * s, rows, n | g, d]
        (S, rows, n, d), s = q.shape, self.s
        J, g = S // s, k.shape[2]
        q, k, v = (t.reshape(J, s, rows, t.shape[2], d).permute(2, 3, 0, 1, 4) for t in (q, k, v))  # [rows, ., J, s, d]
        if g != n:
            k, v = k.repeat_interleave(n // g, dim=1), v.repeat_interleave(n // g, dim=1)
        k0, v0 = (k[:, :, 0], v[:, :, 0]) if first == 0 else self.kv[key][:2]  # block 0: [rows, n, s, d]
        new = slice(1, None) if first == 0 else slice(None)  # this call's stream blocks, position-major below
        ks, vs = k[:, :, new].transpose(2, 3), v[:, :, new].transpose(2, 3)  # [rows, n, s, B, d]
        if self.cache:  # room for every stream block, written in place as the calls come
            if first == 0:
                room = (rows, n, s, self.blocks - 1, d)
                self.kv[key] = (k0, v0, ks.new_empty(room), vs.new_empty(room))
            kbuf, vbuf = self.kv[key][2:]
            lo, hi = max(first, 1) - 1, first + J - 1
            kbuf[:, :, :, lo:hi], vbuf[:, :, :, lo:hi] = ks, vs
            ks, vs = kbuf[:, :, :, :hi], vbuf[:, :, :, :hi]
        scale = getattr(getattr(attn, "core_attention", None), "softmax_scale", None) or d ** -0.5
        a0 = (q.reshape(rows, n, J * s, d) @ k0.transpose(-1, -2)).view(rows, n, J, s, s) * scale
        a1 = (q.transpose(2, 3) @ ks.transpose(-1, -2)).transpose(2, 3) * scale  # [rows, n, J, s, B]: block b + 1
        B = ks.shape[3]
        causal, own = _stream_masks(s, first, J, B, x.device)
        a0 = a0.masked_fill(~causal, float("-inf"))
        a1 = a1.masked_fill(~own[:, None, :], float("-inf"))
        p = torch.cat([a0, a1], -1).to(at_least_fp32(q.dtype)).softmax(-1).to(q.dtype)
        out = ((p[..., :s].reshape(rows, n, J * s, s) @ v0).view(rows, n, J, s, d)
               + (p[..., s:].transpose(2, 3) @ vs).transpose(2, 3))
        return hook_output(attn, out.permute(2, 3, 0, 1, 4).reshape(S, rows, n * d))


def reinforce_surrogate(logp: torch.Tensor, reward: torch.Tensor, weight: float) -> torch.Tensor:
    """REINFORCE with the mean over passes as baseline: `-weight * sum((R - mean_p R) * log pi) / passes`, for
    thought log-probabilities `logp [passes, b, s]` and rewards `reward [passes, b, s]` (no gradient)."""
    reward = reward.detach()
    advantage = reward - reward.mean(0, keepdim=True)
    return -weight * (advantage * logp).sum() / logp.shape[0]


def thought_rewards(talk_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """R `[passes, b, s]` of the thought after position i: minus the masked losses of labels i..i+n_ahead-1,
    from the talk losses `[passes, n_ahead, b, s]` indexed by label position (label i + k from stream i)."""
    s = talk_loss.shape[-1]
    masked = (talk_loss * loss_mask).detach()
    reward = torch.zeros_like(masked[:, 0])
    for k in range(talk_loss.shape[1]):
        reward[..., :s - k] -= masked[:, k, :, k:]
    return reward


# ---------------------------------------------------------------- the objective


@dataclass
class QuietStarTerms:
    """One micro-batch's pieces: `nll_sum` (the reported loss sum), `surrogate` (REINFORCE, gradient only),
    `thoughts [passes * b, T, s]`, `logp`, `reward [passes, b, s]`, `talk_loss [passes, n_ahead, b, s]`,
    `base_loss [b, s]` (the plain LM per-token loss)."""

    nll_sum: torch.Tensor
    surrogate: torch.Tensor
    thoughts: torch.Tensor
    logp: torch.Tensor
    reward: torch.Tensor
    talk_loss: torch.Tensor
    base_loss: torch.Tensor


class QuietStarObjective(Objective):
    """Quiet-STaR: parallel thoughts after every position, a mixing head, teacher-forced loss on the next n_ahead
    tokens and REINFORCE on the thought tokens (module docstring; docs/objectives.md). Under pipeline
    parallelism every stage runs the same code through `pipelined_forward` (parallel/passes.py)."""

    kind = "quiet_star"
    Section = QuietStarSection
    dense_streams = False  # True: the implementation before the KV cache (dense masked SDPA, the prefix rerun at
    #                        every sampling step): the reference of the equivalence tests

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        o = cfg.objective
        self.T, self.n_ahead, self.passes = o.thought_length, o.n_ahead, o.n_passes
        self.temperature, self.reinforce_weight = o.thought_temperature, o.reinforce_weight
        self.base_weight, self.checkpointed = o.base_loss_weight, o.checkpoint_thoughts
        self.stream_attention = o.stream_attention
        self.seed = cfg.train.seed
        specials = getattr(tokenizer, "special_ids", {})
        self.forbidden = [specials[t] for t in ("<|start_thought|>", "<|end_thought|>") if t in specials]
        self.real_vocab = tokenizer.vocab_size
        self.pad = getattr(tokenizer, "pad", 0)

    @classmethod
    def extra_modules(cls, cfg, first_stage: bool, last_stage: bool) -> dict:
        """`model.quiet_star`: the thought embeddings (first stage) and the mixing head (last stage)."""
        return {"quiet_star": QuietStarParameters(cfg.model.hidden_size, first_stage, last_stage)}

    # the trainer's interface ------------------------------------------------------------

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False) -> torch.Tensor:
        return self.total(self.terms(model, mb, window, StageLink(), collect_health))

    def pipeline_run(self, model, batches: list, window: BackpropWindow) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches on its pipeline stage; the summed loss on the last."""
        return run_micro_batches(model, batches, window,
                                 lambda mdl, mb, w, link: self.total(self.terms(mdl, mb, w, link)))

    @staticmethod
    def total(t: Optional["QuietStarTerms"]) -> Optional[torch.Tensor]:
        """The loss to back-propagate: the NLL sum, plus REINFORCE's gradient (its value cancels to 0)."""
        return None if t is None else t.nll_sum + (t.surrogate - t.surrogate.detach())

    # the pieces ---------------------------------------------------------------------------

    def terms(self, model, mb, window: BackpropWindow, link: "StageLink", collect_health: bool = False,
              thoughts: Optional[torch.Tensor] = None) -> Optional[QuietStarTerms]:
        """Everything of one micro-batch (None on pipeline stages other than the last); `thoughts
        [passes * b, T, s]` replaces the sampled ones (tests)."""
        m = unwrap(model)
        if link.p == 1:
            base_loss, hidden = m(mb.tokens, labels=mb.labels, window=window, sample_ids=mb.sample_ids,
                                  collect_health=collect_health, return_hidden=True)
        else:
            out = pipelined_forward(model, window, link, input_ids=mb.tokens, labels=mb.labels,
                                    sample_ids=mb.sample_ids, return_hidden=True)
            base_loss, hidden = out if out is not None else (None, None)
        base_x = None if hidden is None else hidden.transpose(0, 1)  # the head's [s, b, h]: w = 0 is bit-exact
        tokens = mb.tokens.repeat(self.passes, 1)
        sample_ids = list(mb.sample_ids) * self.passes
        s0 = self.initial_state(m, tokens, sample_ids) if m.is_first else None
        if thoughts is None:
            thoughts = self.sample_thoughts(model, link, tokens, sample_ids, s0, window)
        if self.checkpointed and link.p == 1:
            b = mb.tokens.shape[0]
            outs = [checkpoint(self.stream_terms, model, link, tokens[p * b:(p + 1) * b],
                               thoughts[p * b:(p + 1) * b], s0[:, p * b:(p + 1) * b], window, base_x, mb.labels,
                               use_reentrant=False) for p in range(self.passes)]
            logp, talk_loss = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        else:
            logp, talk_loss = self.stream_terms(model, link, tokens, thoughts, s0, window, base_x, mb.labels)
        if not m.is_last:
            return None
        reward = thought_rewards(talk_loss, mb.loss_mask)
        s = mb.tokens.shape[1]
        valid = (torch.arange(s, device=base_loss.device)[None, :]
                 >= torch.arange(self.n_ahead, device=base_loss.device)[:, None])  # [n_ahead, s]: stream q - k exists
        delta = ((talk_loss - base_loss) * valid[:, None, :]).sum((0, 1)) / (self.passes * valid.sum(0))
        nll = base_loss + (1.0 - self.base_weight) * delta  # exactly base_loss while the mixed losses equal it
        surrogate = reinforce_surrogate(logp, reward, self.reinforce_weight)
        return QuietStarTerms(masked_loss_sum(nll, mb.loss_mask), surrogate, thoughts, logp, reward,
                              talk_loss, base_loss)

    def block_ids(self, tokens: torch.Tensor, thoughts: torch.Tensor, j: int) -> torch.Tensor:
        """The token ids `[rows, s]` fed to stream block j: x, (start), t_1..t_T, (end), x shifted by 1.. (pad
        filled); the start and end blocks take learned vectors instead, their ids are placeholders."""
        if 2 <= j <= self.T + 1:
            return thoughts[:, j - 2]
        k = j - self.T - 2
        if k < 1:
            return tokens
        return torch.cat([tokens[:, k:], tokens.new_full((tokens.shape[0], k), self.pad)], 1)

    def stream_inputs(self, m, tokens: torch.Tensor, thoughts: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Input vectors `[rows, (last - first) * s, h]` of stream blocks [first, last) (first stage)."""
        s = tokens.shape[1]
        start, end = m.quiet_star.thought_embeddings
        ids = torch.cat([self.block_ids(tokens, thoughts, j) for j in range(first, last)], 1)
        pieces = list(m.token_embeddings(ids).split(s, 1))
        for j, vector in ((1, start), (self.T + 2, end)):
            if first <= j < last:
                pieces[j - first] = vector.expand_as(pieces[j - first])
        return torch.cat(pieces, 1)

    def streams(self, m, s: int, cache: int = 0) -> Optional[StreamAttention]:
        """The attention of a pass over the streams: block-sparse `StreamAttention` (with a cache of `cache` blocks
        for sampling), or None for the dense masked SDPA (`objective.stream_attention` of the autograd pass)."""
        if self.dense_streams:
            return None
        if cache:
            return StreamAttention(m, s, cache)
        mode = self.stream_attention
        if mode == "auto":
            mode = "sparse" if next(m.parameters()).device.type == "cpu" else "dense"
        return StreamAttention(m, s) if mode == "sparse" else None

    def run_streams(self, model, link, tokens, thoughts, s0, blocks: int, window: BackpropWindow, first: int = 0,
                    attention: Optional[StreamAttention] = None):
        """The whole model on stream blocks [first, blocks): on the last stage logits `[rows, S, V]` (whole
        vocabulary) and hidden `[S, rows, h]` of those blocks, (None, None) elsewhere. `attention`: the
        block-sparse attention (holding the earlier blocks when first > 0), default a fresh one or dense."""
        m = unwrap(model)
        rows, s = tokens.shape
        if attention is None:
            attention = self.streams(m, s)
        positions = stream_positions(s, blocks, tokens.device)[first * s:]
        mask = attend_at = None
        if attention is None:
            assert first == 0, "the dense reference runs every block from the first"
            mask = stream_mask(s, blocks, tokens.device)
        else:
            attend_at = attention.at(first, blocks)
        inputs = self.stream_inputs(m, tokens, thoughts, first, blocks) if m.is_first else None
        # every thought token starts from the s_0 of the position it thinks after (tiled over the blocks), not a
        # fresh draw for the stream length, which would differ from the plain forward's and between passes
        out = pipelined_forward(model, window, link, inputs_embeds=inputs, position_ids=positions,
                                attention_mask=mask, return_hidden=True, batch_shape_=(rows, (blocks - first) * s),
                                s0=None if s0 is None else s0.repeat(blocks - first, 1, 1), attend_at=attend_at)
        if out is None:
            return None, None
        return full_vocab(out[0]), out[1].transpose(0, 1)

    def initial_state(self, m, tokens: torch.Tensor, sample_ids) -> torch.Tensor:
        """s_0 `[s, rows, h]` of the real tokens, shared by every thought token of their stream."""
        rows, s = tokens.shape
        like = torch.empty(s, rows, m.config.hidden_size, dtype=m.config.params_dtype, device=tokens.device)
        return m.initial_state(like, sample_ids)

    def sampling_bias(self, vocab: int, device) -> torch.Tensor:
        """0 for tokens a thought may contain, -inf for padded vocabulary and the thought delimiters `[V]`."""
        bias = torch.zeros(vocab, device=device)
        bias[self.real_vocab:] = float("-inf")
        bias[self.forbidden] = float("-inf")
        return bias

    @torch.no_grad()
    def sample_thoughts(self, model, link, tokens, sample_ids, s0, window: BackpropWindow) -> torch.Tensor:
        """Thought tokens `[rows, T, s]`, Gumbel-max sampled on the last stage and sent to the first (zeros between):
        step j runs stream block j alone over the keys and values cached from blocks 0..j-1 (block-sparse
        `StreamAttention`; the dense reference reruns blocks 0..j), its noise drawn on the device."""
        m = unwrap(model)
        rows, s = tokens.shape
        vocab = m.vocab_size
        attention = self.streams(m, s, cache=self.T + 1)
        if m.is_last:
            dtype = at_least_fp32(m.config.params_dtype)
            noise = GumbelNoise(self.seed, sample_ids[:rows // self.passes], self.passes, s, vocab, dtype,
                                tokens.device)
            bias = self.sampling_bias(vocab, tokens.device)
        thoughts = tokens.new_zeros(rows, self.T, s)
        for j in range(1, self.T + 1):
            first = 0 if attention is None or j == 1 else j
            logits, _ = self.run_streams(model, link, tokens, thoughts, s0, j + 1, window, first, attention)
            chosen = None
            if m.is_last:
                scores = logits[:, -s:].to(dtype) / self.temperature + bias + noise.next()
                chosen = scores.argmax(-1)
            chosen = link.last_to_first(chosen, (rows, s), tokens.dtype, tokens.device, requires_grad=False)
            if chosen is not None:  # the first stage embeds them, the last scores them, the stages between need neither
                thoughts[:, j - 1] = chosen
        return thoughts

    def stream_terms(self, model, link, tokens, thoughts, s0, window, base_x, labels):
        """On the last stage: log pi of each stream's thought `[passes, b, s]` and the mixed talk losses
        `[passes, n_ahead, b, s]` (label-indexed), from one forward with autograd over all blocks (of the
        rows given: `terms` calls it once per pass under `checkpoint_thoughts`)."""
        m = unwrap(model)
        rows, s = tokens.shape
        logits, hidden = self.run_streams(model, link, tokens, thoughts, s0, num_blocks(self.T, self.n_ahead),
                                          window)
        if not m.is_last:
            return None, None
        b = base_x.shape[1]
        passes = rows // b
        # block j (1..T) predicts thought token t_j
        scores = logits[:, s:(self.T + 1) * s].to(at_least_fp32(logits.dtype)) / self.temperature
        scores = scores + self.sampling_bias(logits.shape[-1], logits.device)
        chosen = thoughts.reshape(rows, self.T * s, 1)
        logp = scores.log_softmax(-1).gather(-1, chosen).reshape(rows, self.T, s).sum(1).reshape(passes, b, s)
        talk = []
        for p in range(passes):
            per_k = []
            for k in range(self.n_ahead):
                block = self.T + 2 + k
                h_k = hidden[block * s:(block + 1) * s, p * b:(p + 1) * b]  # [s, b, h], stream i -> label i + k
                h_k = torch.cat([base_x[:k], h_k[:s - k]])  # label-indexed; labels < k have no stream (w * 0)
                w = m.quiet_star.mixing_weight(base_x, h_k)
                per_k.append(m.output(base_x + w * (h_k - base_x), labels))
            talk.append(torch.stack(per_k))
        return logp, torch.stack(talk)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """Sampling and log-probabilities in float32 or better (bf16 logits are upcast, float64 kept)."""
    return torch.promote_types(dtype, torch.float32)


def full_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Logits over the whole (padded) vocabulary: gathered from the tensor-parallel ranks' shards."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)

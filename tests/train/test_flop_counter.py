"""recurdepth/train/flops.py against torch's `FlopCounterMode` on the real forward and backward of the looped
model and of its dense-equivalent megatron `GPTModel`: every matmul the step runs, counted by torch.

What the counter counts, and how the comparison stays honest (torch 2.13, CPU):
- Linear layers, the adapter and the head are `aten.mm`; megatron's core attention (`model.attention=megatron`)
  is `aten.baddbmm` + `aten.bmm` over the full s x s square, masked afterwards: counted by torch's own formulas,
  and exactly flops.py's convention (backward = 2 forwards, scores over the full square).
- SDPA on CPU runs `aten._scaled_dot_product_flash_attention_for_cpu` (and `..._backward`), which torch's
  counter does not know: it counts 0 for them. We register torch's own SDPA formulas for them (the ones it
  uses for the CUDA flash kernels), which also ignore causality (full square), and whose backward counts five
  bmm's: the four of the gradient plus the flash kernel's recomputation of the scores Q K^T, 2 s h per token
  and back-propagated layer. flops.py (megatron's MFU convention) leaves that recomputation out, so the expected
  count adds it explicitly (`flash_recompute`).
- MoE experts run as one `aten.mm` per expert over the tokens routed to it (dropless routing, no grouped GEMM),
  the router as one more: k_top experts per token, exactly.
- Checkpointed iterations (`recurrence.checkpoint_iterations`) run their forward again inside backward, under
  the counter: they are compared with `per_token(r, k, recompute=True)` (the HFU count).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from recurdepth.config import load_config
from recurdepth.model.depth import BackpropWindow
from recurdepth.train.flops import dense_flops_per_token, looped_flops
from tests.conftest import TINY

VOCAB, BATCH = 300, 2
SMALL = ["model.hidden_size=64", "model.num_heads=4", "model.seq_length=64"]
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread is as fast, and does not spin against other work on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flash_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _flash_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


CPU_FLASH = {aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward}


def counted_flops(step) -> tuple[int, dict]:
    """Total FLOPs torch counts while `step()` runs forward and backward, and the count per aten op."""
    with FlopCounterMode(display=False, custom_mapping=CPU_FLASH) as mode:
        step()
    return mode.get_total_flops(), {str(op): n for op, n in mode.get_flop_counts()["Global"].items()}


def flash_recompute(cfg, backprop_layers: int, tokens: int) -> int:
    """FLOPs of the flash backward's recomputation of Q K^T (2 s h per token and layer), counted by torch's
    SDPA backward formula and not by flops.py; 0 for megatron's attention, whose backward keeps the scores."""
    m = cfg.model
    return 2 * m.seq_length * m.hidden_size * tokens * backprop_layers if m.attention == "sdpa" else 0


def batch(cfg):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, VOCAB, (BATCH, cfg.model.seq_length), generator=g) for _ in range(2))


def check(counted: int, expected: float, ops: dict, case: str) -> None:
    ratio = counted / expected
    print(f"{case}: counted / analytic = {ratio:.6f}  ({ops})")
    assert ratio == pytest.approx(1.0, abs=0.02), (case, counted, expected, ops)


# (name, overrides, windows (r, k)): every variant of the block flops.py distinguishes, k >= r, k < r, r = 1
LOOPED = [
    ("swiglu concat sdpa", [], [(1, 1), (3, 2), (2, 4), (4, 4)]),
    ("gelu add gqa megatron-attention P2 C0", ["model.activation=gelu", "model.adapter=add",
                                               "model.num_query_groups=2", "model.attention=megatron",
                                               "model.prelude_layers=2", "model.coda_layers=0"],
     [(1, 1), (3, 1), (2, 3)]),
    ("swiglu gate gqa sdpa", ["model.adapter=gate", "model.num_query_groups=2"], [(3, 2)]),
    ("checkpointed iterations", ["recurrence.checkpoint_iterations=true"], [(3, 2), (2, 4)]),
    # an imported Qwen3-style block: 4 heads of 32 on h = 64 (d_q = 128 != h), q/k norms, a q/k/v bias
    ("wide heads qk-norm qkv-bias", ["model.head_dim=32", "model.qk_norm=true", "model.qkv_bias=qkv",
                                     "model.num_query_groups=2"], [(3, 2)]),
    # MoE (dropless top-k): each token runs k_top experts and the router; the prelude and coda too with moe_layers=all
    ("moe core top-2", ["model.num_experts=4"], [(3, 2)]),
    ("moe all gelu top-3", ["model.num_experts=4", "model.moe_top_k=3", "model.moe_layers=all",
                            "model.activation=gelu", "model.moe_ffn_hidden_size=96"], [(2, 2)]),
]


@pytest.mark.parametrize("name,overrides,windows", LOOPED, ids=[c[0] for c in LOOPED])
def test_looped_flops_equal_the_counted_forward_and_backward(megatron_single_process, name, overrides, windows):
    from recurdepth.model.build import build_model

    cfg = load_config(TINY, [*SMALL, *overrides])
    model = build_model(cfg, VOCAB)
    tokens, labels = batch(cfg)
    m, recompute = cfg.model, cfg.recurrence.checkpoint_iterations
    analytic = looped_flops(cfg, model.vocab_size)
    for r, k in windows:
        window = BackpropWindow.of(r, k)
        counted, ops = counted_flops(lambda: model(tokens, labels=labels, window=window).sum().backward())
        backprop_layers = m.prelude_layers + m.coda_layers + min(r, k) * m.core_layers
        expected = (analytic.per_token(r, k, recompute=recompute) * tokens.numel()
                    + flash_recompute(cfg, backprop_layers, tokens.numel()))
        check(counted, expected, ops, f"{name} r={r} k={k}")


def dense_gpt(cfg, num_layers: int):
    """megatron's GPTModel with `num_layers` of the looped model's blocks, built as
    `recurdepth.bench.dense.build_dense_equivalent` builds it (without DDP and optimizer)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from recurdepth.model.build import (initialize_parameters, mark_tensor_parallel_params, model_vocab_size,
                                        transformer_config)
    from recurdepth.model.layers import layer_spec_submodules

    config = dataclasses.replace(transformer_config(cfg), num_layers=num_layers)
    spec = ModuleSpec(module=TransformerLayer, submodules=layer_spec_submodules(False, cfg.model.attention)[0])
    model = GPTModel(config, spec, vocab_size=model_vocab_size(cfg, VOCAB), max_sequence_length=cfg.model.seq_length,
                     share_embeddings_and_output_weights=cfg.model.tie_embeddings, position_embedding_type="rope",
                     rotary_base=int(cfg.model.rotary_base))
    mark_tensor_parallel_params(model)
    initialize_parameters(model, cfg)
    return model


DENSE = [("swiglu sdpa", [], 3), ("gelu gqa megatron-attention", ["model.activation=gelu",
                                                                 "model.num_query_groups=2",
                                                                 "model.attention=megatron"], 2)]


@pytest.mark.parametrize("name,overrides,r", DENSE, ids=[c[0] for c in DENSE])
def test_dense_flops_equal_the_counted_forward_and_backward(megatron_single_process, name, overrides, r):
    cfg = load_config(TINY, [*SMALL, *overrides])
    m = cfg.model
    layers = m.prelude_layers + r * m.core_layers + m.coda_layers
    model = dense_gpt(cfg, layers)
    tokens, labels = batch(cfg)
    positions = torch.arange(m.seq_length).unsqueeze(0).expand_as(tokens)
    counted, ops = counted_flops(lambda: model(tokens, positions, None, labels=labels).sum().backward())
    expected = (dense_flops_per_token(cfg, model.vocab_size, layers) * tokens.numel()
                + flash_recompute(cfg, layers, tokens.numel()))
    check(counted, expected, ops, f"dense {name} {layers} layers")


@pytest.mark.parametrize("readout,windows", [("all", [(3, 2), (1, 1)]), ("last", [(4, 2)])])
def test_readout_objectives_count_every_readout(megatron_single_process, readout, windows):
    """exit_gate reads the model out after n iterations (n = r, or the last k): n coda + head passes, each
    back-propagated (plus the gate's 2h per token and readout, below the 2% tolerance)."""
    from types import SimpleNamespace

    from recurdepth.model.build import build_model
    from recurdepth.objectives import build_objective

    cfg = load_config(TINY, [*SMALL, "objective.kind=exit_gate", f"objective.readout={readout}",
                             "recurrence.backprop_depth=2"])
    model = build_model(cfg, VOCAB)
    tokens, labels = batch(cfg)
    mb = SimpleNamespace(tokens=tokens, labels=labels, sample_ids=None, loss_mask=torch.ones_like(tokens))
    objective = build_objective(cfg, None)
    analytic = looped_flops(cfg, model.vocab_size)
    m = cfg.model
    for r, k in windows:
        window = BackpropWindow.of(r, k)
        n = analytic.readouts(r)
        assert n == (r if readout == "all" else min(r, 2))
        counted, ops = counted_flops(lambda: objective.loss_sum(model, mb, window).backward())
        backprop_layers = m.prelude_layers + n * m.coda_layers + min(r, k) * m.core_layers
        expected = analytic.per_token(r, k) * tokens.numel() + flash_recompute(cfg, backprop_layers, tokens.numel())
        check(counted, expected, ops, f"exit_gate readout={readout} r={r} k={k}")


def test_deep_supervision_counts_each_segment_window_and_readout(megatron_single_process):
    from types import SimpleNamespace

    from recurdepth.model.build import build_model
    from recurdepth.model.depth import segment_windows
    from recurdepth.objectives import build_objective

    cfg = load_config(TINY, [*SMALL, "objective.kind=deep_supervision", "objective.supervision_segments=3",
                             "recurrence.backprop_depth=2"])
    model = build_model(cfg, VOCAB)
    tokens, labels = batch(cfg)
    mb = SimpleNamespace(tokens=tokens, labels=labels, sample_ids=None, loss_mask=torch.ones_like(tokens))
    objective, analytic, m = build_objective(cfg, None), looped_flops(cfg, model.vocab_size), cfg.model
    window = BackpropWindow.of(7, 2)  # segments of 3, 2, 2 iterations: 2 + 2 + 2 with gradients
    counted, ops = counted_flops(lambda: objective.loss_sum(model, mb, window).backward())
    grad = sum(w.with_grad for w in segment_windows(7, 3, 2))
    assert grad == 6 and analytic.readouts(7) == 3
    backprop_layers = m.prelude_layers + 3 * m.coda_layers + grad * m.core_layers
    expected = analytic.per_token(7, 2) * tokens.numel() + flash_recompute(cfg, backprop_layers, tokens.numel())
    check(counted, expected, ops, "deep_supervision S=3 r=7 k=2")


def test_gate_tuning_counts_one_forward_of_the_frozen_model(megatron_single_process):
    """exit_gate_tune reads a frozen LM: its FLOPs are one forward with every readout (the gate's own 2h per token
    and readout, forward and backward, is below the 2% tolerance)."""
    from types import SimpleNamespace

    from recurdepth.model.build import build_model
    from recurdepth.objectives import build_objective

    cfg = load_config(TINY, [*SMALL, "objective.kind=exit_gate_tune"])
    model = build_model(cfg, VOCAB)
    tokens, labels = batch(cfg)
    mb = SimpleNamespace(tokens=tokens, labels=labels, sample_ids=None, loss_mask=torch.ones_like(tokens))
    objective, analytic = build_objective(cfg, None), looped_flops(cfg, model.vocab_size)
    window = BackpropWindow.of(3, 2)
    counted, ops = counted_flops(lambda: objective.loss_sum(model, mb, window).backward())
    check(counted, analytic.per_token(3, 2) * tokens.numel(), ops, "exit_gate_tune r=3")


@pytest.mark.parametrize("capacity,window", [("[1.0,0.5]", (4, 4)), ("[1.0,0.5]", (4, 2)), ("[0.75,0.5,0.25]", (3, 3)),
                                             ("[1.0]", (3, 2))])
def test_router_counts_only_the_tokens_that_run_each_iteration(megatron_single_process, capacity, window):
    """recursion_router (expert-choice): iteration i runs the core on k_i of each sequence's s tokens, attention
    over k_i x k_i, plus the router on the candidates; capacity 1 everywhere is the plain count. The flash
    backward's recomputation of Q K^T is a_i^2 of a full layer's here."""
    from types import SimpleNamespace

    from recurdepth.model.build import build_model
    from recurdepth.objectives import build_objective

    cfg = load_config(TINY, [*SMALL, "objective.kind=recursion_router", f"objective.router_capacity={capacity}",
                             "recurrence.sampler=fixed", "recurrence.depth=4"])
    model = build_model(cfg, VOCAB)
    tokens, labels = batch(cfg)
    mb = SimpleNamespace(tokens=tokens, labels=labels, sample_ids=None, loss_mask=torch.ones_like(tokens))
    objective, analytic, m = build_objective(cfg, None), looped_flops(cfg, model.vocab_size), cfg.model
    r, k = window
    counted, ops = counted_flops(lambda: objective.loss_sum(model, mb, BackpropWindow.of(r, k)).backward())
    fractions = analytic.active_fractions(r)
    recompute = sum(a * a for a in fractions[r - min(r, k):]) * m.core_layers
    expected = (analytic.per_token(r, k) * tokens.numel()
                + flash_recompute(cfg, m.prelude_layers + m.coda_layers, tokens.numel())
                + 2 * m.seq_length * m.hidden_size * tokens.numel() * recompute)
    check(counted, expected, ops, f"router capacity={capacity} r={r} k={k}")
    plain = dataclasses.replace(analytic, router="")
    if capacity == "[1.0]":  # every token every iteration: the plain count, router aside
        router = 4 * m.hidden_size * (r + 2 * min(r, k))
        assert analytic.per_token(r, k) == pytest.approx(plain.per_token(r, k) + router, rel=1e-12)
    else:
        assert counted < 0.9 * plain.per_token(r, k) * tokens.numel()  # routing tokens out saves counted FLOPs


def test_per_sample_depth_counts_each_rows_own_iterations(megatron_single_process):
    """objective.kind=depth_by_size: row b runs r_b iterations (gradients through its last min(r_b, k)) and a finished
    row costs nothing, so the step's FLOPs are seq x the sum over rows of per_token(r_b, k), the trainer's count."""
    from types import SimpleNamespace

    from recurdepth.model.build import build_model
    from recurdepth.objectives import build_objective

    cfg = load_config(TINY, [*SMALL, "objective.kind=depth_by_size", "recurrence.sampler=fixed",
                             "recurrence.depth=4", "recurrence.backprop_depth=2",
                             "data.sources=[{procedural: hops, n: 20}]"])
    model = build_model(cfg, VOCAB)
    tokens, labels = batch(cfg)
    sizes = [1, 3]  # one per row (BATCH = 2): r = 1 and 3
    mb = SimpleNamespace(tokens=tokens, labels=labels, sample_ids=None, loss_mask=torch.ones_like(tokens),
                         sizes=sizes)
    objective, analytic, m = build_objective(cfg, None), looped_flops(cfg, model.vocab_size), cfg.model
    depths, k = [objective.depth(n) for n in sizes], 2
    counted, ops = counted_flops(lambda: objective.loss_sum(model, mb, BackpropWindow.of(4, k)).backward())
    s = m.seq_length
    expected = sum(analytic.per_token(r, k) * s + flash_recompute(
        cfg, m.prelude_layers + m.coda_layers + min(r, k) * m.core_layers, s) for r in depths)
    check(counted, expected, ops, f"depth_by_size r={depths} k={k}")
    assert counted < 0.9 * analytic.per_token(max(depths), k) * tokens.numel()  # finished rows cost nothing

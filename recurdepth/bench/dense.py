"""`recurdepth bench dense`: the looped model vs a dense megatron-core GPT with the same FLOPs per token.

The dense model is megatron-core's own `GPTModel` built from the same layer spec as the looped blocks (local
spec: SDPA core attention, RoPE, RMSNorm, SwiGLU; pre-norm `TransformerLayer`), the same hidden size, sequence
length, vocabulary and micro-batches, and P + r R + C layers: the depth a token passes through in the looped
model. Both train on the same fixed micro-batches with the same engine (megatron DDP, AdamW, token-sum loss,
`finalize_model_grads`), data loading excluded, steps interleaved (looped, dense, looped, ...) so both see the
same machine. Achieved FLOP/s use each model's own training FLOPs per token (recurdepth/train/flops.py): looped
3 (F_prelude + F_coda + F_head) + (r + 2 min(r, k)) F_core (truncated backprop); dense 3 ((P + r R + C) F_layer
+ F_head). A ratio of 1 means the loop costs nothing beyond its FLOPs.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from recurdepth.bench.harness import QUICK_OVERRIDES, PeakSampler, bench_trainer, best_and_median, set_threads


def build_dense_equivalent(trainer, num_layers: int):
    """(DDP-wrapped megatron GPTModel with `num_layers` of the looped model's blocks, its optimizer)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from recurdepth.model.build import (compile_blocks, initialize_parameters, mark_tensor_parallel_params,
                                        transformer_config, use_transformer_engine)
    from recurdepth.model.layers import layer_spec_submodules
    from recurdepth.train.trainer import build_optimizer

    cfg, device, dtype = trainer.cfg, trainer.device, trainer.dtype
    use_te = use_transformer_engine(cfg, device)
    config = dataclasses.replace(transformer_config(cfg, dtype, on_cpu=device.type == "cpu"), num_layers=num_layers)
    spec = ModuleSpec(module=TransformerLayer, submodules=layer_spec_submodules(use_te, cfg.model.attention,
                                                                                qk_norm=cfg.model.qk_norm)[0])
    model = GPTModel(config, spec, vocab_size=trainer.model.module.vocab_size,
                     max_sequence_length=cfg.model.seq_length, share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                     position_embedding_type="rope", rotary_base=int(cfg.model.rotary_base))
    model.to(device=device, dtype=dtype)
    mark_tensor_parallel_params(model)
    initialize_parameters(model, cfg)
    if cfg.train.compile:
        compile_blocks(model)
    ddp = DistributedDataParallel(config=model.config, ddp_config=trainer.model.ddp_config, module=model)
    return ddp, build_optimizer(cfg, ddp, dtype)[0]


def timed_update(model, optimizer, loss_fn, batches) -> float:
    """Seconds of one optimizer step of `model` over `batches` (token-sum loss, megatron gradient finalisation)."""
    from megatron.core.distributed import finalize_model_grads

    start = time.perf_counter()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    for mb in batches:
        loss_fn(mb).backward()
    finalize_model_grads([model], num_tokens=sum(mb.loss_mask.sum() for mb in batches).float())
    optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_dense_bench(args) -> int:
    from recurdepth.data.pipeline import micro_batches
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.objectives import masked_loss_sum
    from recurdepth.train.flops import dense_flops_per_token

    threads = set_threads(args.threads)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    steps = 1 if args.quick else args.steps
    trainer = bench_trainer(args.config, overrides, 1)
    cfg, m = trainer.cfg, trainer.cfg.model
    from recurdepth.model.depth import mean_depth

    r = args.depth or round(mean_depth(cfg.recurrence))
    k = cfg.recurrence.backprop_depth
    window = BackpropWindow.of(r, k)
    layers = m.prelude_layers + r * m.core_layers + m.coda_layers
    dense, dense_opt = build_dense_equivalent(trainer, layers)
    t = cfg.train
    batches = micro_batches(trainer.data.train, 0, t.global_batch_size, t.micro_batch_size, 0, 1, trainer.device)
    positions = torch.arange(m.seq_length, device=trainer.device).unsqueeze(0)
    runs = {
        "looped": (trainer.model, trainer.optimizer, trainer.flops.per_token(r, k),
                   lambda mb: trainer.objective.loss_sum(trainer.model, mb, window)),
        "dense": (dense, dense_opt, dense_flops_per_token(cfg, trainer.model.module.vocab_size, layers),
                  lambda mb: masked_loss_sum(dense(mb.tokens, positions.expand_as(mb.tokens), None, labels=mb.labels),
                                             mb.loss_mask)),
    }
    for model, opt, _, loss_fn in runs.values():  # warm-up: optimizer state, allocator pools
        model.train()
        timed_update(model, opt, loss_fn, batches)
    peak = PeakSampler(trainer.dtype, quick=args.quick)
    peak.sample(repeats=3)
    seconds = {name: [] for name in runs}
    for _ in range(steps):
        for name, (model, opt, _, loss_fn) in runs.items():
            seconds[name].append(timed_update(model, opt, loss_fn, batches))
        peak.sample()
    tokens = t.global_batch_size * m.seq_length
    print(f"looped (r={r}, k={k}) vs dense-equivalent megatron GPTModel ({layers} layers = P{m.prelude_layers} + "
          f"{r} x R{m.core_layers} + C{m.coda_layers}): h={m.hidden_size}, seq {m.seq_length}, {len(batches)} "
          f"micro-batches of {t.micro_batch_size}, {trainer.device.type} {str(trainer.dtype).replace('torch.', '')}, "
          f"{threads} threads, {steps} interleaved timed steps each (data loading excluded)")
    print("FLOPs/token: looped 3(F_prelude+F_coda+F_head) + (r+2min(r,k)) F_core; dense 3(L F_layer + F_head) "
          "(flops.py); MFU = achieved / peak")
    print(peak.describe())
    print(f"{'model':<8} {'layers':>6} {'GFLOP/tok':>10} {'best s':>8} {'median s':>9} {'best GFLOP/s':>13} "
          f"{'median GFLOP/s':>15} {'best MFU':>9} {'vs dense':>9}")
    achieved = {}
    for name, (_, _, per_token, _) in runs.items():
        best, median = best_and_median(seconds[name])
        achieved[name] = (tokens * per_token / best, tokens * per_token / median)
    for name, (_, _, per_token, _) in runs.items():
        best, median = best_and_median(seconds[name])
        fast, typical = achieved[name]
        ratio = f"{fast / achieved['dense'][0]:.3f}/{typical / achieved['dense'][1]:.3f}"
        print(f"{name:<8} {layers if name == 'dense' else str(m.prelude_layers + m.core_layers + m.coda_layers):>6} "
              f"{per_token / 1e9:>10.3f} {best:>8.2f} {median:>9.2f} {fast / 1e9:>13.1f} {typical / 1e9:>15.1f} "
              f"{fast / peak.best:>9.3f} {ratio:>9}")
    print("vs dense = achieved FLOP/s ratio, best step / median step")
    return 0

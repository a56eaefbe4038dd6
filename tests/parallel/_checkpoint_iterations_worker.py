"""torchrun worker (2 ranks, PP=2) for tests/parallel/test_checkpoint_iterations_pp.py: the looped schedule over
the real model, once without and once with `recurrence.checkpoint_iterations`, counting the bytes autograd saves.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel/_checkpoint_iterations_worker.py OUT

Writes OUT/rank{R}.pt: per setting, this stage's summed loss, the bytes packed by saved-tensor hooks over the
whole step, and every parameter's gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

OVERRIDES = ["model.hidden_size=32", "model.num_heads=2", "model.prelude_layers=1", "model.core_layers=2",
             "model.coda_layers=1", "model.seq_length=16", "parallel.pipeline=2", "train.micro_batch_size=2"]


def run(checkpoint_iterations: bool) -> dict:
    from megatron.core import parallel_state as ps

    from recurdepth.config import load_config
    from recurdepth.data.pipeline import MicroBatch
    from recurdepth.model.build import build_model
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.pipeline import LoopedPipelineSchedule

    cfg = load_config(None, OVERRIDES + [f"recurrence.checkpoint_iterations={str(checkpoint_iterations).lower()}"])
    model = build_model(cfg, 300)
    schedule = LoopedPipelineSchedule(model, ps.get_pipeline_model_parallel_group(), (16, 2, 32), torch.float32,
                                      "cpu", record_timeline=False)
    g = torch.Generator().manual_seed(5)
    batches = []
    for i in range(4):
        tokens = torch.randint(0, 256, (2, 16), generator=g)
        batches.append(MicroBatch(tokens, tokens.roll(-1, 1), torch.ones(2, 16), [2 * i, 2 * i + 1]))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = schedule.run(batches, BackpropWindow(6, 4), lambda per_token, mb: (per_token * mb.loss_mask).sum())
    return {"loss": loss.detach().clone(), "saved_bytes": saved[0],
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def main(out: str) -> None:
    from recurdepth.compat.megatron_cpu import apply_cpu_compat
    from recurdepth.config import load_config
    from recurdepth.distributed import discover_ranks, init_distributed

    apply_cpu_compat()
    init_distributed(load_config(None, OVERRIDES), discover_ranks())
    results = {flag: run(flag) for flag in (False, True)}
    torch.save(results, Path(out) / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])

"""torchrun worker for tests/objectives/test_pipelined.py, and the cases both sides run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/objectives/_pipelined_worker.py OUT

Each case is multi-pass logic written once against `pipelined_forward` / `StageLink`; run over a pipeline of
P stages (this worker) it must give the loss and every parameter gradient that the same code gives on one
process (the test). The model is a float64 LoopedGPTModel, layout-independently initialised.
Writes OUT/rank{R}.pt: {case: {"loss", "grads" (by parameter name), "passes", "extra"}}.
"""

from __future__ import annotations

import os
import sys

import torch

VOCAB, B, S = 97, 2, 12
OVERRIDES = ["model.hidden_size=32", "model.num_heads=4", "model.num_query_groups=2", "model.seq_length=16",
             "model.prelude_layers=1", "model.core_layers=4", "model.coda_layers=1", "model.embedding_scale=1.5"]


def config(pipeline: int):
    from recurdepth.config import load_config

    return load_config(None, [*OVERRIDES, f"parallel.pipeline={pipeline}"])


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).double()
    return tokens, labels, mask, [5, 9]


def case_lm(model, link, r, k):
    """One pass with labels: the plain LM loss through the primitive."""
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.passes import pipelined_forward

    tokens, labels, mask, ids = inputs()
    out = pipelined_forward(model, BackpropWindow.of(r, k), link, input_ids=tokens, labels=labels, sample_ids=ids)
    return None if out is None else (out * mask).sum(), {}


def case_feedback(model, link, r, k):
    """Coconut-like: the last hidden state of pass 1 at position 2 replaces the input embedding at position 3
    of pass 2 (and again for pass 3 at position 4); the loss of pass 3 back-propagates through all three."""
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.passes import pipelined_forward, unwrap

    m = unwrap(model)
    tokens, labels, mask, ids = inputs(1)
    window = BackpropWindow.of(r, k)
    h = m.config.hidden_size
    embeds = m.token_embeddings(tokens) if m.is_first else None
    extra = {}
    for i, pos in enumerate((3, 4)):
        out = pipelined_forward(model, window, link, input_ids=tokens if embeds is None else None,
                                inputs_embeds=embeds, sample_ids=ids, return_hidden=True)
        hidden = None
        if out is not None:
            hidden = out[1]
            if i == 0 and hidden.requires_grad:
                hidden.register_hook(lambda g: extra.__setitem__("first_hidden_grad", g[:, 2].norm().item()))
        hidden = link.last_to_first(hidden, (B, S, h), torch.float64, "cpu")
        if m.is_first:
            keep = torch.ones(1, S, 1, dtype=torch.float64)
            keep[0, pos] = 0
            thought = torch.zeros_like(embeds)
            thought = thought.index_copy(1, torch.tensor([pos]), hidden[:, pos - 1:pos])
            embeds = embeds * keep + thought
    out = pipelined_forward(model, window, link, inputs_embeds=embeds, labels=labels, sample_ids=ids,
                            batch_shape_=(B, S))
    return None if out is None else (out * mask).sum(), extra


def case_shared_ids(model, link, r, k):
    """Token ids chosen on the last stage (greedy from pass 1's logits) become pass 2's input everywhere."""
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.passes import pipelined_forward

    tokens, labels, mask, ids = inputs(2)
    window = BackpropWindow.of(r, k)
    logits = pipelined_forward(model, window, link, input_ids=tokens, sample_ids=ids)
    chosen = logits.argmax(-1) % VOCAB if logits is not None else None
    chosen = link.share_from_last(chosen, (B, S), torch.int64, "cpu")
    out = pipelined_forward(model, window, link, input_ids=chosen, labels=labels, sample_ids=ids)
    return None if out is None else (out * mask).sum(), {"chosen": chosen.clone()}


CASES = {"lm-r3k2": (case_lm, 3, 2), "lm-r1k1": (case_lm, 1, 1), "feedback-r2k2": (case_feedback, 2, 2),
         "feedback-r3k1": (case_feedback, 3, 1), "shared-ids-r2k2": (case_shared_ids, 2, 2)}


def run_case(model, name: str, grad: bool = True) -> dict:
    """Run one case on this rank: loss (last stage), gradients by parameter name, passes, extra."""
    from recurdepth.parallel.passes import StageLink

    fn, r, k = CASES[name]
    model.zero_grad(set_to_none=True)
    link = StageLink()
    with torch.set_grad_enabled(grad):
        loss, extra = fn(model, link, r, k)
    link.backward(loss if link.is_last and grad else None)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": None if loss is None else loss.detach(), "grads": grads, "passes": link.passes, "extra": extra}


def main(outdir: str) -> None:
    import torch.distributed as dist

    from recurdepth.distributed import discover_ranks, init_distributed
    from recurdepth.model.build import build_model

    torch.set_num_threads(1)
    cfg = config(int(os.environ["WORLD_SIZE"]))
    init_distributed(cfg, discover_ranks())
    model = build_model(cfg, VOCAB, params_dtype=torch.float64)
    out = {name: run_case(model, name) for name in CASES}
    out["eval:lm-r3k2"] = run_case(model, "lm-r3k2", grad=False)
    torch.save(out, os.path.join(outdir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

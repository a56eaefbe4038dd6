"""torchrun worker for tests/parallel/test_pipeline_schedule.py, and the toy looped model both sides use.

    python -m torch.distributed.run --standalone --nproc_per_node P tests/parallel/_pipeline_worker.py OUTDIR

The toy model (float64): e = tanh(prelude(embed(x))); s_0 drawn per sample id; a core iteration is
adapter(cat(s, e)) followed by R=4 residual tanh layers; per-token cross entropy from a linear head. Over
PP=2 stage 0 holds embed, prelude, adapter and core layers 0-1, stage 1 core layers 2-3 and the head;
over PP=4 one core layer per stage.

Writes OUTDIR/rank{R}.pt: for each window, this rank's summed loss, its parameters' gradients (full-model
names), the gathered timeline, bubble fraction and op orders; with P=2 also saved-tensor counts and the
same for a one-stage pipeline (each rank alone in its own group).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

H, SEQ, BATCH, VOCAB, CORE_LAYERS = 8, 5, 3, 11, 4
M = 4  # micro-batches
WINDOWS = [(4, 2), (1, 1), (3, 5), (4, 4), (3, 0)]  # (r, k); k = 0: forward only
SAVED_WINDOWS = [(6, 2), (2, 2)]


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    loss_mask: torch.Tensor  # [b, s]
    sample_ids: list


def full_params(seed: int = 1234) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    params = {"embed.weight": rnd(VOCAB, H, scale=1.0),
              "prelude.weight": rnd(H, H, scale=H ** -0.5), "prelude.bias": rnd(H, scale=0.1),
              "adapter.weight": rnd(H, 2 * H, scale=(2 * H) ** -0.5), "adapter.bias": rnd(H, scale=0.1)}
    for i in range(CORE_LAYERS):
        params[f"core.{i}.weight"] = rnd(H, H, scale=H ** -0.5)
        params[f"core.{i}.bias"] = rnd(H, scale=0.1)
    params["head.weight"] = rnd(VOCAB, H, scale=H ** -0.5)
    params["head.bias"] = rnd(VOCAB, scale=0.1)
    return params


def micro_batches(seed: int = 99) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(M):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).double()
        out.append(MicroBatch(tokens, labels, mask, [i * BATCH + b for b in range(BATCH)]))
    return out


def loss_fn(per_token: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    return (per_token * mb.loss_mask).sum()


class ToyStage(torch.nn.Module):
    """Stage `stage` of `p`: the LoopedStage interface over a slice of `full_params()`."""

    def __init__(self, params: dict[str, torch.Tensor], stage: int, p: int):
        super().__init__()
        self.is_first, self.is_last = stage == 0, stage == p - 1
        per = CORE_LAYERS // p
        self.core_ids = list(range(stage * per, (stage + 1) * per))
        names = [f"core.{i}.{w}" for i in self.core_ids for w in ("weight", "bias")]
        if self.is_first:
            names += ["embed.weight", "prelude.weight", "prelude.bias", "adapter.weight", "adapter.bias"]
        if self.is_last:
            names += ["head.weight", "head.bias"]
        self.names = names
        self.w = torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(params[n].clone()) for n in names})

    def param(self, name: str) -> torch.nn.Parameter:
        return self.w[name.replace(".", "_")]

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: self.param(n).grad.clone() for n in self.names if self.param(n).grad is not None}

    def embed(self, tokens):
        x = self.param("embed.weight")[tokens].transpose(0, 1)  # [s, b, h]
        return torch.tanh(x @ self.param("prelude.weight").T + self.param("prelude.bias"))

    def initial_state(self, e, sample_ids):
        draws = [torch.randn(e.shape[0], e.shape[2], dtype=e.dtype,
                             generator=torch.Generator().manual_seed(1000 + sid)) * 0.5 for sid in sample_ids]
        return torch.stack(draws, dim=1)

    def core_chunk(self, x, e):
        if self.is_first:
            x = torch.cat([x, e], dim=-1) @ self.param("adapter.weight").T + self.param("adapter.bias")
        for i in self.core_ids:
            x = x + torch.tanh(x @ self.param(f"core.{i}.weight").T + self.param(f"core.{i}.bias"))
        return x

    def head(self, x, labels):
        logits = x @ self.param("head.weight").T + self.param("head.bias")  # [s, b, v]
        return torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [b, s]


def reference(r: int, k: int) -> dict:
    """The toy model unsplit with an explicit loop: r-k iterations without grad, then min(r, k) with
    (k = 0: forward only, no backward)."""
    model = ToyStage(full_params(), 0, 1)
    n, kg = max(r - k, 0), min(r, k)
    total = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches():
        with torch.set_grad_enabled(kg > 0):
            e = model.embed(mb.tokens)
            state = model.initial_state(e.detach(), mb.sample_ids)
            with torch.no_grad():
                for _ in range(n):
                    state = model.core_chunk(state, e)
            for _ in range(kg):
                state = model.core_chunk(state, e)
            loss = loss_fn(model.head(state, mb.labels), mb)
        if kg > 0:
            loss.backward()
        total = total + loss.detach()
    return {"loss": total, "grads": model.grads()}


def run_case(stage_idx: int, p: int, group, r: int, k: int, count_saved: bool = False,
             record_timeline: bool = True) -> dict:
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.pipeline import LoopedPipelineSchedule

    stage = ToyStage(full_params(), stage_idx, p)
    sched = LoopedPipelineSchedule(stage, group, (SEQ, BATCH, H), torch.float64, "cpu", record_timeline)
    window = BackpropWindow.of(r, k)
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    if count_saved:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sched.run(micro_batches(), window, loss_fn)
    else:
        loss = sched.run(micro_batches(), window, loss_fn)
    return {"loss": loss, "grads": stage.grads(), "names": stage.names, "saved": saved[0],
            "timeline": [vars(s) for s in sched.timeline], "bubble": sched.bubble_fraction(),
            "orders": [[tuple(op) for op in order] for order in sched.last_orders]}


def main(outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert CORE_LAYERS % world == 0, world
    pp = dist.new_group(list(range(world)))
    stage_idx = dist.get_rank(pp)
    # one-stage groups: on global rank 1 the stage index (rank in the group) is 0
    singles = [dist.new_group([i]) for i in range(world)]
    out = {"pp": {}, "saved": {}, "pp1": {}}
    for r, k in WINDOWS:
        out["pp"][(r, k)] = run_case(stage_idx, world, pp, r, k)
    out["pp_untimed"] = {(4, 2): run_case(stage_idx, world, pp, 4, 2, record_timeline=False)}
    if world == 2:
        for r, k in SAVED_WINDOWS:
            out["saved"][(r, k)] = run_case(stage_idx, world, pp, r, k, count_saved=True)["saved"]
        for r, k in [(4, 2), (3, 5)]:  # a one-stage "pipeline": every message is local
            out["pp1"][(r, k)] = run_case(0, 1, singles[rank], r, k)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

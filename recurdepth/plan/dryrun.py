"""`recurdepth plan --dry-run`: build the real model of one representative rank per pipeline stage on the meta
device under torch's fake process group, build the trainer's pipeline schedule for it, and set the bytes its
modules hold beside the analytic plan's (`recurdepth.plan.memory`).

Nothing is allocated (meta tensors) and nothing is communicated (backend "fake"): a 4096-rank layout checks in
seconds. Per rank: parameters = Σ numel · element size of the rank's parameters; gradients = 4 bytes per
parameter (megatron DDP's fp32 main-grad buffer); optimizer = (4 [bf16 master] + 8 [Adam]) per parameter over
the data-parallel group with optimizer.distributed (expert parameters over the expert-data-parallel group),
the rules of `recurdepth.plan.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from recurdepth import precision
from recurdepth.config import Config
from recurdepth.errors import ConfigError
from recurdepth.plan.memory import optimizer_bytes_per_param
from recurdepth.plan.planner import Plan, plan


@dataclass
class RankBytes:
    """Bytes one representative rank's real modules hold, beside the analytic plan's figures for its stage."""

    stage: int
    rank: int  # global rank (megatron's default order: the pipeline is the outermost dimension)
    param_count: int
    params: int
    grads: int
    optimizer: int
    analytic_params: int
    analytic_grads: int
    analytic_optimizer: int
    schedule_ops: int  # ops of this stage in the pipeline schedule's order (0 without PP)

    @staticmethod
    def rel(measured: int, analytic: int) -> float:
        return (measured - analytic) / analytic if analytic else float(measured != 0)

    @property
    def worst_rel(self) -> float:
        return max(abs(self.rel(self.params, self.analytic_params)), abs(self.rel(self.grads, self.analytic_grads)),
                   abs(self.rel(self.optimizer, self.analytic_optimizer)))


@dataclass
class DryRun:
    plan: Plan
    ranks: list
    seconds: float

    def format(self) -> str:
        gib = 2 ** 30
        lines = [f"dry run: the real model of {len(self.ranks)} representative rank(s) on the meta device, fake "
                 f"process group of {self.plan.world} ranks (TP={self.plan.tp} PP={self.plan.pp} EP={self.plan.ep} "
                 f"DP={self.plan.dp}), {self.seconds:.1f} s",
                 f"{'stage':>5} {'rank':>6} {'params':>14} {'param GiB':>10} {'plan':>10} {'diff':>8} "
                 f"{'grad GiB':>9} {'plan':>9} {'diff':>8} {'optim GiB':>9} {'plan':>9} {'diff':>8} {'ops':>6}"]
        for r in self.ranks:
            lines.append(
                f"{r.stage:>5} {r.rank:>6} {r.param_count:>14,} {r.params / gib:>10.3f} {r.analytic_params / gib:>10.3f} "
                f"{r.rel(r.params, r.analytic_params):>+8.2%} {r.grads / gib:>9.3f} {r.analytic_grads / gib:>9.3f} "
                f"{r.rel(r.grads, r.analytic_grads):>+8.2%} {r.optimizer / gib:>9.3f} "
                f"{r.analytic_optimizer / gib:>9.3f} {r.rel(r.optimizer, r.analytic_optimizer):>+8.2%} "
                f"{r.schedule_ops:>6}")
        return "\n".join(lines)


def representative_ranks(world: int, pp: int) -> list[int]:
    """One global rank per pipeline stage: megatron's default order (tp-cp-ep-dp-pp) puts stage s at s·world/pp."""
    return [s * (world // pp) for s in range(pp)]


def measure_rank(cfg: Config, rank: int, world: int, vocab: int, bf16: bool, dp: int, m: int) -> tuple:
    """(param count, param bytes, grad bytes, optimizer bytes, schedule ops, stage) of `rank`'s real modules."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from recurdepth.model.build import build_model
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.plan.shape import grad_iterations
    from recurdepth.train.step import pipeline_schedule

    p = cfg.parallel
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=p.tensor,
                                                 pipeline_model_parallel_size=p.pipeline,
                                                 expert_model_parallel_size=p.expert,
                                                 create_gloo_process_groups=False)  # gloo needs a real store
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = build_model(cfg, vocab, dtype, device="meta")
        stage = parallel_state.get_pipeline_model_parallel_rank()
        sched = pipeline_schedule(cfg, model, dtype, torch.device("meta"))
        g = grad_iterations(cfg)
        ops = 0 if sched is None else len((getattr(sched, "inner", sched)).orders(
            m, BackpropWindow.of(g, g if p.pipeline_split != "naive" else 1))[stage])
        dp_opt = dp if cfg.optimizer.distributed else 1
        edp_opt = max(1.0, dp / p.expert) if cfg.optimizer.distributed else 1.0
        count = nbytes = 0
        opt = 0.0
        per = optimizer_bytes_per_param(bf16)
        for param in model.parameters():
            n = param.numel()
            count, nbytes = count + n, nbytes + n * param.element_size()
            expert = not getattr(param, "allreduce", True)  # megatron marks expert weights allreduce=False
            opt += per * n / (edp_opt if expert else dp_opt)
        return count, nbytes, 4 * count, int(opt), ops, stage
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def dry_run(cfg: Config, nodes: int, gpus_per_node: int, gpu: str, vocab_size: Optional[int] = None,
            config_name: str = "") -> DryRun:
    """The analytic plan and, for one rank per pipeline stage, the bytes of the real modules beside it."""
    import time

    import torch.distributed as dist

    from recurdepth.compat.megatron_cpu import apply_cpu_compat
    from recurdepth.plan.shape import resolve_vocab_size

    start = time.perf_counter()
    result = plan(cfg, nodes, gpus_per_node, gpu, vocab_size, runtime_bytes=0, suggest=False,
                  config_name=config_name)
    if dist.is_initialized():
        raise ConfigError("plan --dry-run needs a process without torch.distributed initialised; run it on its own")
    apply_cpu_compat(force=True)
    vocab = resolve_vocab_size(cfg, vocab_size)
    bf16 = precision.uses_bf16(cfg.train.precision, gpu != "cpu")
    ranks = []
    for rank in representative_ranks(result.world, result.pp):
        count, params, grads, opt, ops, stage = measure_rank(cfg, rank, result.world, vocab, bf16, result.dp,
                                                             result.micro_batches)
        a = result.stages[stage]
        ranks.append(RankBytes(stage, rank, count, params, grads, opt, a.params, a.grads, a.optimizer, ops))
    return DryRun(result, ranks, time.perf_counter() - start)

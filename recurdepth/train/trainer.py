"""The training loop: build a run, resume it, and `fit` it, one step at a time, around callbacks.

One optimizer step = sample r (same on every rank, from seed and step) -> `step.optimizer_step` through the
configured engine (`recurdepth.train.engine`: forward/backward with the loss summed per token, gradients
reduced and scaled by the global token count so any layout gives the same update, the numerical guard's
verdict, the update) -> LR schedule step. Checkpoints, evaluation, the guard's bad-step actions and the
graceful stop are callbacks (`recurdepth.train.callbacks`).
"""

from __future__ import annotations

import dataclasses

import time
from pathlib import Path
from typing import Optional

import torch

from recurdepth.config import Config
from recurdepth.data.pipeline import build_datasets, data_phases, describe_sources, micro_batches
from recurdepth.distributed import RankInfo, discover_ranks, init_distributed
from recurdepth.errors import CheckpointError, RecurdepthError
from recurdepth.model.build import build_model
from recurdepth.model.depth import BackpropWindow, DepthSampler
from recurdepth.objectives import build_objective
from recurdepth.train.callbacks import StepMetrics, control_callbacks, default_callbacks
from recurdepth.train.checkpoint import load_checkpoint, manifest, plan_resume, save_checkpoint
from recurdepth.train.engine import build_engine, model_dtype
from recurdepth.train.faults import FaultInjector, maybe_kill
from recurdepth.train.flops import looped_flops, peak_flops
from recurdepth.train.guards import NumericalGuard
from recurdepth.train.optimizer import build_optimizer, build_scheduler  # noqa: F401 - re-exported (export, bench)
from recurdepth.train.rundir import check_unlocked, open_run_dir, release
from recurdepth.train.state import Lineage, TrainResult, TrainState
from recurdepth.train.step import forward_backward, optimizer_step, pipeline_schedule, reduce_loss, router_balance_loss


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    from recurdepth.precision import uses_bf16

    return torch.bfloat16 if uses_bf16(cfg.train.precision, device.type == "cuda") else torch.float32


class Trainer:
    """Owns the engine (model, optimizer, schedule), data and objective of one run; `fit()` trains to
    `train.steps`."""

    def __init__(self, cfg: Config, info: Optional[RankInfo] = None, callbacks: Optional[list] = None):
        from megatron.core import parallel_state as ps

        self.cfg, t = cfg, cfg.train
        self.info = info or discover_ranks()
        self.device = init_distributed(cfg, self.info)
        self.dtype = resolve_dtype(cfg, self.device)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_logger = torch.distributed.get_rank() == 0
        self.run_dir = Path(t.run_dir)
        check_unlocked(cfg)  # fail fast, before building anything, if another run writes here
        # validation always reads the same first `eval_batches` global batches of the validation split
        self.data = build_datasets(cfg, t.steps * t.global_batch_size, t.eval_batches * t.global_batch_size,
                                   self.is_logger)
        self.phases = data_phases(cfg, self.data, self.is_logger)
        model = build_model(cfg, self.data.tokenizer.vocab_size, model_dtype(cfg, self.dtype), self.device)
        self.engine = build_engine(cfg, model, self.dtype, self.device, dp_size=self.dp_size,
                                   local_rank=self.info.local_rank)
        self.schedule = pipeline_schedule(cfg, model, self.dtype, self.device)
        self.objective = build_objective(cfg, self.data.tokenizer)
        self.objective.bind(self.model)
        # a dense GPT (model.kind=dense) has no recurrence: every step and evaluation is one pass, r = k = 1
        self.sampler = DepthSampler(cfg.recurrence if cfg.model.kind == "looped" else dataclasses.replace(
            cfg.recurrence, sampler="fixed", depth=1, backprop_depth=1, max_depth=None, eval_depth=1), t.seed)
        self.flops = looped_flops(cfg, model.vocab_size)
        self.peak = peak_flops(cfg, self.device, self.dtype) * torch.distributed.get_world_size()
        self.state, self.last_saved = TrainState(), None
        self.lineage = Lineage(run_id=_from_rank0(Lineage().run_id))  # rank 0's id: one lineage on every rank
        self.guard = NumericalGuard(t.spike_window, t.spike_sigma)
        self.faults = FaultInjector(model, self.device)
        # Nothing is written until start(): a refused resume or a locked run dir leaves the run dir as it was.
        self._extra_callbacks, self.callbacks = callbacks, control_callbacks(cfg)
        self.locks, self._archive, self.started = [], None, False
        if self.is_logger:
            print(self.summary(model), flush=True)
            if self.device.type == "cpu" and self.dtype == torch.bfloat16:
                from recurdepth.precision import cpu_bf16_warning

                if warning := cpu_bf16_warning():
                    print(warning, flush=True)

    model = property(lambda self: self.engine.model)  # the wrapped model (megatron DDP, DeepSpeed engine)
    optimizer = property(lambda self: self.engine.optimizer)
    scheduler = property(lambda self: self.engine.scheduler)

    def summary(self, model) -> str:
        """One line saying what runs where: layout, model size, recurrence, data, precision."""
        from megatron.core import parallel_state as ps

        cfg, m, r = self.cfg, self.cfg.model, self.cfg.recurrence
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        if m.kind == "dense":
            shape, depth = f"| dense megatron GPTModel, {model.num_layers} layers, h={m.hidden_size}", "no recurrence"
        else:
            core = count(model.core) + count(model.adapter)
            sampler = f"fixed r={r.depth}" if r.sampler == "fixed" else f"{r.sampler} mean r={r.mean:g}"
            if cfg.objective.kind == "depth_by_size":
                o = cfg.objective
                sampler = f"r per sample = {o.depth_scale:g} x size {o.depth_offset:+d}"
            shape = (f"(core {core / 1e6:.2f}M) | P{m.prelude_layers}+R{m.core_layers}xr+C{m.coda_layers}, "
                     f"h={m.hidden_size}")
            depth = f"{sampler}, k={r.backprop_depth}"
        phases = "".join(f", from step {p.from_step}: {describe_sources(p.sources)}" for p in self.phases.phases[1:])
        return (f"recurdepth | world {torch.distributed.get_world_size()} = dp {self.dp_size} x tp "
                f"{ps.get_tensor_model_parallel_world_size()} x pp {ps.get_pipeline_model_parallel_world_size()} | "
                f"{self.device.type} {str(self.dtype).replace('torch.', '')} | params {count(model) / 1e6:.2f}M on this rank "
                f"{shape} | {depth} | {len(self.data.train):,} train samples of {m.seq_length} tokens{phases} | "
                f"global batch {cfg.train.global_batch_size} | {self.engine.label()} | run dir {self.run_dir}")

    # ------------------------------------------------------------------ resume, start, save

    def maybe_resume(self, path: Optional[str] = None) -> None:
        """Resume from `path`, or from the latest checkpoint when checkpoint.resume allows it (`plan_resume`);
        reads only: the moves it implies happen in start(), under the run-dir lock."""
        plan = plan_resume(self.cfg.checkpoint_dir, self.cfg.checkpoint.resume, Path(path) if path else None)
        if plan.archive:
            self._archive = plan
        if plan.target is None:
            if self.cfg.checkpoint.init_from:
                self.init_from(self.cfg.checkpoint.init_from)
            return
        self.state = self.load(plan.target)
        # a checkpoint from before lineages has no run_id: continue it under this run's (agreed) id
        self.lineage = Lineage(run_id=manifest(plan.target).get("run_id") or self.lineage.run_id,
                               parent=plan.target.name)
        if self.is_logger:
            print(f"resumed from {plan.target} at step {self.state.step} "
                  f"({self.state.consumed_samples} samples consumed)", flush=True)

    def init_from(self, source: str) -> None:
        """`checkpoint.init_from`: a fresh run (step 0, new optimizer state) starting from another checkpoint's
        model weights, under any layout; tensors that checkpoint lacks keep their initialisation (said once)."""
        from recurdepth.train.checkpoint import load_model_weights, resolve_checkpoint

        path = resolve_checkpoint(source)
        missing = load_model_weights(path, self.model, verify=self.cfg.checkpoint.verify)
        self.engine.weights_loaded()
        if self.is_logger:
            kept = f"; not in it, kept as initialised: {', '.join(missing)}" if missing else ""
            print(f"initialised from the model weights of {path} (a fresh run: step 0, new optimizer state){kept}",
                  flush=True)

    def start(self) -> None:
        """Take the run-dir lock, then write what a run writes before its first step (moves implied by the
        resume, config.yaml, the engine's files, the metrics files). Collective: a refusal on rank 0 is raised
        on every rank."""
        if self.started:
            return
        cfg, error = self.cfg, None
        if self.is_logger:
            try:
                self.locks = open_run_dir(cfg, self._archive, {"config.yaml": cfg.to_yaml(), **self.engine.run_files()})
            except RecurdepthError as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot write to {self.run_dir} ({exc.strerror}); choose a writable train.run_dir"
        error = _from_rank0(error)
        if error:
            raise CheckpointError(error)
        self.callbacks = default_callbacks(self.run_dir, cfg.train.steps, cfg.logging.log_interval,
                                           cfg.logging.tensorboard, self.is_logger,
                                           self._extra_callbacks) + control_callbacks(cfg)
        self.started = True

    def release(self) -> None:
        release(self.locks)
        self.locks = []

    def save(self) -> Path:
        c = self.cfg.checkpoint
        self.last_saved = save_checkpoint(
            self.cfg.checkpoint_dir, self.state, self.model, self.optimizer, self.scheduler, self.cfg.to_dict(),
            keep_last=c.keep_last, keep_every=c.keep_every, vocab_size=self.data.tokenizer.vocab_size,
            engine=self.engine, lineage=self.lineage)
        return self.last_saved

    def load(self, path: Path, check: bool = True) -> TrainState:
        """Load checkpoint `path` into the engine (model, optimizer, schedule) and the RNG; with `check`, refuse
        one whose model, objective or tokenizer differs from this run's. Returns its train state."""
        c = self.cfg.checkpoint
        against = dict(model_cfg=self.cfg.to_dict(), vocab_size=self.data.tokenizer.vocab_size,
                       allowed_changes=c.allow_changes) if check else {}
        state, _ = load_checkpoint(path, self.model, self.optimizer, self.scheduler, engine=self.engine,
                                   verify=c.verify, **against)
        return state

    # ------------------------------------------------------------------ the loop

    def emit(self, hook: str, *args):
        """Call `hook` on every callback, in order; returns the first truthy result (a stop reason)."""
        results = [getattr(cb, hook)(*args) for cb in list(self.callbacks) if hasattr(cb, hook)]
        return next((r for r in results if r), None)

    def fit(self) -> TrainResult:
        result, self.last_saved = TrainResult(), None
        self.start()
        try:
            self.emit("on_train_start", self)
            while self.state.step < self.cfg.train.steps:
                metrics = self.train_step()
                maybe_kill(self.state.step)
                result.losses.append(metrics.loss)
                result.depths.append(metrics.depth)
                if self.emit("on_step_end", self, metrics):
                    break
            self.emit("on_train_end", self)
        finally:
            self.emit("close")
            self.release()
        result.final_step, result.checkpoint = self.state.step, self.last_saved
        return result

    def train_step(self) -> StepMetrics:
        cfg, t, start = self.cfg, self.cfg.train, time.perf_counter()
        self.faults.begin(self.state.step + 1)
        window = self.sampler.window(self.state.step)
        first_sample = self.state.consumed_samples
        collect = bool(cfg.logging.health_interval) and (self.state.step + 1) % cfg.logging.health_interval == 0
        while self.state.consumed_samples in self.state.skipped_batches:  # batches a rollback ruled out
            self.state.consumed_samples += t.global_batch_size
        phase = self.phases.at(self.state.step)
        batches = micro_batches(phase.train, self.state.consumed_samples - phase.first_sample, t.global_batch_size,
                                t.micro_batch_size, self.dp_rank, self.dp_size, self.device)
        self.model.train()
        self.objective.set_step(self.state.step)
        out = optimizer_step(self.engine, self.objective, self.guard, self.faults, self.schedule, batches, window,
                             collect)
        self.faults.end()
        if out.bad is None:
            self.guard.accept(out.loss)
        else:
            self.emit("on_bad_step", self, out.bad)  # halt raises; rollback reloads and returns
        self.scheduler.step(increment=1)
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        health = {k: float(v) for k, v in self.engine.module.last_health.items()} if collect else {}
        if cfg.model.num_experts:
            health["moe_load_balancing_loss"] = router_balance_loss(window.with_grad * len(batches), self.dp_size)
        health.update(self.objective.metrics())
        if self.schedule is not None and cfg.parallel.record_timeline:
            health["pipeline_bubble"] = self.schedule.bubble_fraction()  # idle / (p x makespan), logical time
        tokens = t.global_batch_size * cfg.model.seq_length
        k = cfg.recurrence.backprop_depth
        first = first_sample - phase.first_sample  # in the phase's dataset
        depths = self.objective.sample_depths(phase.train, range(first, first + t.global_batch_size))
        if depths:  # per-sample depth: the largest r on the progress line, FLOPs per sample
            flops = cfg.model.seq_length * sum(self.flops.per_token(d, k) for d in depths)
            window = BackpropWindow.of(max(depths), k)
            health["depth/mean"] = sum(depths) / len(depths)
        else:
            flops = tokens * self.flops.per_token(window.total, k)
        return StepMetrics(
            step=self.state.step, loss=out.loss, lr=self.optimizer.param_groups[0]["lr"], grad_norm=out.grad_norm,
            depth=window.total, backprop_depth=window.with_grad, tokens=tokens, seconds=time.perf_counter() - start,
            flops=flops,
            peak_flops=self.peak, health=health, guard=out.bad or "")

    def forward_backward(self, batches: list, window: BackpropWindow, collect: bool = False) -> torch.Tensor:
        """Forward and (with grad enabled) backward of this rank's micro-batches; the summed loss on the last
        pipeline stage, zero on others (`step.forward_backward`)."""
        return forward_backward(self.engine, self.objective, self.schedule, self.faults, batches, window, collect)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean validation loss at the eval depth over `train.eval_batches` global batches."""
        from megatron.core import parallel_state

        t, depth = self.cfg.train, self.sampler.eval_depth()
        self.model.eval()
        self.objective.set_step(self.state.step)
        loss_sum, tokens = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for b in range(t.eval_batches):
            batches = micro_batches(self.data.valid, b * t.global_batch_size, t.global_batch_size,
                                    t.micro_batch_size, self.dp_rank, self.dp_size, self.device)
            loss_sum += self.forward_backward(batches, BackpropWindow(depth, 0))
            tokens += sum(self.objective.loss_tokens(mb) for mb in batches)
        reduce_loss(loss_sum)
        torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        return {"loss": (loss_sum / tokens.clamp_min(1)).item(), "depth": float(depth)}


def _from_rank0(value):
    """Rank 0's value on every rank (a refusal decided on rank 0 stops all ranks together; one run id)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

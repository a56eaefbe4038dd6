"""The training loop: a short `Trainer.fit` that runs steps and hands metrics to callbacks.

One optimizer step = sample r (same on every rank, from seed and step) -> forward/backward over this
rank's micro-batches with the loss summed per token -> megatron `finalize_model_grads` (data-parallel
reduction, scaled by the global token count so any layout gives the same update) -> optimizer step ->
LR schedule step. Engine pieces (DDP, distributed optimizer, scheduler) are megatron-core's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from recurdepth.config import Config
from recurdepth.data.pipeline import build_datasets, micro_batches
from recurdepth.distributed import RankInfo, discover_ranks, init_distributed
from recurdepth.errors import CheckpointError, RecurdepthError, TrainingHalted
from recurdepth.model.build import build_model
from recurdepth.model.depth import BackpropWindow, DepthSampler
from recurdepth.objectives import build_objective
from recurdepth.train.callbacks import StepMetrics, default_callbacks
from recurdepth.train.checkpoint import (LATEST, Lineage, TrainState, apply_resume_plan, latest_checkpoint,
                                         load_checkpoint, manifest, plan_resume, save_checkpoint)
from recurdepth.train.flops import looped_flops, peak_flops
from recurdepth.train.faults import FaultInjector, maybe_kill
from recurdepth.train.guards import NumericalGuard, StopRequest, grads_finite
from recurdepth.train.lock import RunDirLock

_SCHEDULE_NAMES = {"cosine": "cosine", "constant": "constant", "wsd": "WSD", "linear": "linear"}


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)
    depths: list = field(default_factory=list)
    final_step: int = 0
    checkpoint: Optional[Path] = None


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    from recurdepth.precision import uses_bf16

    if uses_bf16(cfg.train.precision, device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_optimizer(cfg: Config, ddp_model, dtype: torch.dtype):
    """megatron-core AdamW (distributed: state sharded over data-parallel ranks) + its LR/WD scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=o.distributed), [ddp_model])
    return optimizer, build_scheduler(cfg, optimizer)


def build_scheduler(cfg: Config, optimizer):
    """megatron-core's LR (warmup + decay) and weight-decay schedule over `optimizer.param_groups` (any engine)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    decay = o.decay_steps or cfg.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(decay, o.warmup_steps + 1), lr_decay_style=_SCHEDULE_NAMES[o.schedule],
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        wsd_decay_steps=o.wsd_decay_steps or max(1, decay // 5), lr_wsd_decay_style="linear")


class Trainer:
    """Owns the model, engine and data of one run; `fit()` trains to `train.steps`."""

    def __init__(self, cfg: Config, info: Optional[RankInfo] = None, callbacks: Optional[list] = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.cfg = cfg
        self.info = info or discover_ranks()
        self.device = init_distributed(cfg, self.info)
        self.dtype = resolve_dtype(cfg, self.device)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_logger = torch.distributed.get_rank() == 0
        self.run_dir = Path(cfg.train.run_dir)
        for directory in self.written_dirs():  # fail fast, before building anything, if another run writes here
            RunDirLock(directory, "train").check()

        t = cfg.train
        # validation always reads the same first `eval_batches` global batches of the validation split
        self.data = build_datasets(cfg, t.steps * t.global_batch_size, t.eval_batches * t.global_batch_size,
                                   self.is_logger)
        self.engine = t.engine
        self.ds_config = None
        if self.engine == "deepspeed":  # DeepSpeed keeps fp32 master weights itself and casts the module for bf16
            from recurdepth.train.deepspeed_engine import build_deepspeed

            model = build_model(cfg, self.data.tokenizer.vocab_size, torch.float32, self.device)
            self.model, self.optimizer, self.scheduler, self.ds_config = build_deepspeed(
                cfg, model, self.dtype, self.dp_size, self.info.local_rank)
        else:
            model = build_model(cfg, self.data.tokenizer.vocab_size, self.dtype, self.device)
            self.model = DistributedDataParallel(
                config=model.config, module=model,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, overlap_grad_reduce=t.overlap_grad_reduce,
                    use_distributed_optimizer=cfg.optimizer.distributed))
            self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.dtype)
        self.schedule = self.build_pipeline_schedule(model)
        self.objective = build_objective(cfg, self.data.tokenizer)
        self.sampler = DepthSampler(cfg.recurrence, t.seed)
        self.flops = looped_flops(cfg, model.vocab_size)
        self.peak = peak_flops(cfg, self.device) * torch.distributed.get_world_size()
        self.state = TrainState()
        self.lineage = Lineage(run_id=_from_rank0(Lineage().run_id))  # rank 0's id: one lineage on every rank
        self.guard = NumericalGuard(t.spike_window, t.spike_sigma)
        self.faults = FaultInjector(model, self.device)
        # Nothing is written until start(): a refused resume or a locked run dir leaves the run dir as it was.
        self._extra_callbacks, self.callbacks, self.locks, self._archive = callbacks, [], [], None
        self.started = False
        if self.is_logger:
            print(self.summary(model), flush=True)

    def build_pipeline_schedule(self, model):
        """The recurrence-aware pipeline schedule driving this rank's stage, or None without PP."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return None
        from recurdepth.parallel.naive import NaivePipelineSchedule
        from recurdepth.parallel.pipeline import LoopedPipelineSchedule

        m, t, p = self.cfg.model, self.cfg.train, self.cfg.parallel
        seq = m.seq_length // (ps.get_tensor_model_parallel_world_size() if p.sequence_parallel else 1)
        cls = NaivePipelineSchedule if p.pipeline_split == "naive" else LoopedPipelineSchedule
        return cls(model, ps.get_pipeline_model_parallel_group(), (seq, t.micro_batch_size, m.hidden_size),
                   self.dtype, self.device, record_timeline=p.record_timeline)

    def summary(self, model) -> str:
        """One line saying what runs where: layout, model size, recurrence, data, precision."""
        from megatron.core import parallel_state as ps

        cfg, m, r = self.cfg, self.cfg.model, self.cfg.recurrence
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        core = count(model.core) + count(model.adapter)
        sampler = f"fixed r={r.depth}" if r.sampler == "fixed" else f"{r.sampler} mean r={r.mean:g}"
        return (f"recurdepth | world {torch.distributed.get_world_size()} = dp {self.dp_size} x tp "
                f"{ps.get_tensor_model_parallel_world_size()} x pp {ps.get_pipeline_model_parallel_world_size()} | "
                f"{self.device.type} {str(self.dtype).replace('torch.', '')} | params {count(model) / 1e6:.2f}M on this rank "
                f"(core {core / 1e6:.2f}M) | P{m.prelude_layers}+R{m.core_layers}xr+C{m.coda_layers}, h={m.hidden_size} | "
                f"{sampler}, k={r.backprop_depth} | {len(self.data.train):,} train samples of {m.seq_length} tokens | "
                f"global batch {cfg.train.global_batch_size} | {self.engine_label()} | run dir {self.run_dir}")

    def engine_label(self) -> str:
        if self.engine == "deepspeed":
            d = self.cfg.deepspeed
            offload = "+".join(n for n, on in (("optimizer", d.offload_optimizer), ("params", d.offload_params)) if on)
            return f"deepspeed ZeRO-{d.zero_stage}" + (f" offload {offload}" if offload else "")
        return "megatron " + ("distributed optimizer" if self.cfg.optimizer.distributed else "DDP")

    # ------------------------------------------------------------------ resume

    def maybe_resume(self, path: Optional[str] = None) -> None:
        """Resume from `path`, or from the latest checkpoint when checkpoint.resume allows it (`plan_resume`);
        reads only: the moves it implies happen in start(), under the run-dir lock."""
        c = self.cfg.checkpoint
        plan = plan_resume(self.cfg.checkpoint_dir, c.resume, Path(path) if path else None)
        if plan.archive:
            self._archive = plan
        if plan.target is None:
            return
        self.state, _ = load_checkpoint(plan.target, self.model, self.optimizer, self.scheduler,
                                        model_cfg=self.cfg.to_dict(), vocab_size=self.data.tokenizer.vocab_size,
                                        engine=self.engine, verify=c.verify, allowed_changes=c.allow_changes)
        saved = manifest(plan.target)
        # a checkpoint from before lineages has no run_id: continue it under this run's (agreed) id
        self.lineage = Lineage(run_id=saved.get("run_id") or self.lineage.run_id, parent=plan.target.name)
        if self.is_logger:
            print(f"resumed from {plan.target} at step {self.state.step} "
                  f"({self.state.consumed_samples} samples consumed)", flush=True)

    def start(self) -> None:
        """Take the run-dir lock, then write what a run writes before its first step (moves implied by the
        resume, config.yaml, the metrics files). Collective: a refusal on rank 0 is raised on every rank."""
        if self.started:
            return
        cfg, error = self.cfg, None
        if self.is_logger:
            try:
                for d in self.written_dirs():
                    lock = RunDirLock(d, "train").acquire()
                    self.locks.append(lock)
                    if lock.took_over:
                        print(f"note: {lock.took_over}", flush=True)
                if self._archive is not None:
                    dest = apply_resume_plan(cfg.checkpoint_dir, self._archive)
                    if dest is not None and self._archive.target is None:  # a fresh start: the old run's logs too
                        for name in ("metrics.jsonl", "bad_steps.jsonl", "tensorboard", "config.yaml"):
                            if (self.run_dir / name).exists():
                                os.rename(self.run_dir / name, dest / name)
                    if dest is not None:
                        moved = sum(1 for p in self._archive.archive if p.name != LATEST)
                        print(f"moved {moved} checkpoint(s) aside into {dest} ({self._archive.why})", flush=True)
                (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
                if self.ds_config is not None:
                    from recurdepth.train.deepspeed_engine import write_config

                    write_config(self.ds_config, self.run_dir)
            except RecurdepthError as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot write to {self.run_dir} ({exc.strerror}); choose a writable train.run_dir"
        error = _from_rank0(error)
        if error:
            self.release()
            raise CheckpointError(error)
        self.callbacks = default_callbacks(self.run_dir, cfg.train.steps, cfg.logging.log_interval,
                                           cfg.logging.tensorboard, self.is_logger, self._extra_callbacks)
        self.started = True

    def written_dirs(self) -> list:
        """The directories this run writes to, each locked while it runs: the checkpoint folder, and the run
        directory when the checkpoints live elsewhere."""
        root, run_dir = self.cfg.checkpoint_dir.resolve(), self.run_dir.resolve()
        return [root] + ([run_dir] if run_dir != root and run_dir not in root.parents else [])

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []

    def save(self) -> Path:
        return save_checkpoint(self.cfg.checkpoint_dir, self.state, self.model, self.optimizer, self.scheduler,
                               self.cfg.to_dict(), keep_last=self.cfg.checkpoint.keep_last,
                               keep_every=self.cfg.checkpoint.keep_every,
                               vocab_size=self.data.tokenizer.vocab_size, engine=self.engine, lineage=self.lineage)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        cfg, result = self.cfg, TrainResult()
        last_saved, first_step = None, self.state.step
        self.start()
        stop = StopRequest(cfg.train.exit_after_minutes, cfg.train.stop_signals)
        try:
            return self._fit(result, stop, first_step)
        finally:
            stop.restore()
            self.release()

    def _fit(self, result: TrainResult, stop: StopRequest, first_step: int) -> TrainResult:
        cfg, last_saved = self.cfg, None
        while self.state.step < cfg.train.steps:
            reason = stop.agree(self.device)
            if reason is not None:
                last_saved = self.save()
                if self.is_logger:
                    print(f"stopping after step {self.state.step} on {reason}; checkpoint {last_saved}", flush=True)
                break
            metrics = self.train_step()
            maybe_kill(self.state.step)
            result.losses.append(metrics.loss)
            result.depths.append(metrics.depth)
            for cb in self.callbacks:
                cb.on_step(metrics)
            if cfg.train.eval_interval and self.state.step % cfg.train.eval_interval == 0:
                values = self.evaluate()
                for cb in self.callbacks:
                    cb.on_eval(self.state.step, values)
            if cfg.checkpoint.interval and self.state.step % cfg.checkpoint.interval == 0:
                last_saved = self.save()
        ran = self.state.step > first_step  # a run resumed at its last step has nothing new to save
        if (cfg.checkpoint.save_final and ran and self.state.step >= cfg.train.steps
                and (last_saved is None or self.state.step % max(cfg.checkpoint.interval, 1))):
            last_saved = self.save()
        for cb in self.callbacks:
            cb.close()
        result.final_step, result.checkpoint = self.state.step, last_saved
        return result

    def train_step(self) -> StepMetrics:
        cfg, t = self.cfg, self.cfg.train
        start = time.perf_counter()
        self.faults.begin(self.state.step + 1)
        window = self.sampler.window(self.state.step)
        collect = bool(cfg.logging.health_interval) and (self.state.step + 1) % cfg.logging.health_interval == 0
        while self.state.consumed_samples in self.state.skipped_batches:  # batches a rollback ruled out
            self.state.consumed_samples += t.global_batch_size
        batches = micro_batches(self.data.train, self.state.consumed_samples, t.global_batch_size,
                                t.micro_batch_size, self.dp_rank, self.dp_size, self.device)
        self.model.train()
        if self.engine == "deepspeed":
            loss, grad_norm, bad = self.deepspeed_update(batches, window, collect)
        else:
            loss, grad_norm, bad = self.megatron_update(batches, window, collect)
        self.faults.end()
        if bad is None:
            self.guard.accept(loss)
        else:
            self.on_bad_step(bad, loss)  # halt raises; rollback reloads and returns
        self.scheduler.step(increment=1)
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        health = {k: float(v) for k, v in self.model.module.last_health.items()} if collect else {}
        if cfg.model.num_experts:
            health["moe_load_balancing_loss"] = self.router_balance_loss(window.with_grad * len(batches))
        tokens = t.global_batch_size * cfg.model.seq_length
        return StepMetrics(
            step=self.state.step, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), depth=window.total,
            backprop_depth=window.with_grad, tokens=tokens, seconds=time.perf_counter() - start,
            flops=tokens * self.flops.per_token(window.total, cfg.recurrence.backprop_depth),
            peak_flops=self.peak, health=health, guard=bad or "")

    def megatron_update(self, batches: list, window: BackpropWindow, collect: bool) -> tuple:
        """Forward/backward, megatron's grad finalisation, and the optimizer step unless the step is bad;
        returns (loss, grad norm, bad-step reason or None)."""
        from megatron.core.distributed import finalize_model_grads

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_sum = self.forward_backward(batches, window, collect)
        if self.faults.loss_is_nan():
            loss_sum = loss_sum * float("nan")
        global_tokens = sum(self.objective.loss_tokens(mb) for mb in batches).float()
        finalize_model_grads([self.model], num_tokens=global_tokens)  # all-reduces global_tokens in place
        self.reduce_loss(loss_sum)
        loss = (loss_sum / global_tokens.clamp_min(1)).item()
        bad = self.guard.verdict(loss, grads_finite(self.model, self.device))
        if bad is not None:
            return loss, float("nan"), bad
        _, grad_norm, _ = self.optimizer.step()
        return loss, grad_norm, None

    def deepspeed_update(self, batches: list, window: BackpropWindow, collect: bool) -> tuple:
        """The same step through DeepSpeed (see recurdepth/train/deepspeed_engine.py): each micro-batch's summed
        loss scaled by dp / global tokens; the verdict before the last backward, whose loss a bad step poisons
        so that DeepSpeed's overflow path drops the update."""
        if hasattr(self.objective, "set_step"):
            self.objective.set_step(self.state.step)
        global_tokens = sum(self.objective.loss_tokens(mb) for mb in batches).float()
        torch.distributed.all_reduce(global_tokens, group=_dp_group())
        scale = self.dp_size / global_tokens.clamp_min(1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, mb in enumerate(batches):
            mb_loss = self.objective.loss_sum(self.model, mb, window, collect and i == 0) * self.faults.loss_scale()
            if i == len(batches) - 1:
                break
            self.model.backward(mb_loss * scale, scale_wrt_gas=False)
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step
            loss_sum += mb_loss.detach()
        if self.faults.loss_is_nan():
            mb_loss = mb_loss * float("nan")
        total = loss_sum + mb_loss.detach()
        self.reduce_loss(total)
        loss = (total / global_tokens.clamp_min(1)).item()
        bad = self.guard.verdict(loss, True)
        if bad is not None:
            mb_loss = mb_loss * float("nan")
        skipped = self.model.skipped_steps
        self.model.backward(mb_loss * scale, scale_wrt_gas=False)
        self.model.step()  # the boundary: reduction, clipping and the update (dropped on non-finite gradients)
        if bad is None and self.model.skipped_steps > skipped:
            bad = "non-finite gradient norm"
        if bad is not None:
            return loss, float("nan"), bad
        return loss, float(self.model.get_global_grad_norm()), None

    def on_bad_step(self, reason: str, loss: float) -> None:
        """Act on a bad step (before its update is applied), per `train.on_bad_step`."""
        action, step = self.cfg.train.on_bad_step, self.state.step + 1
        self.record_bad_step(step, reason, action)
        if action == "rollback":
            target = latest_checkpoint(self.cfg.checkpoint_dir)
            if target is not None:
                bad_batch = self.state.consumed_samples
                self.state, _ = load_checkpoint(target, self.model, self.optimizer, self.scheduler, engine=self.engine,
                                                verify=self.cfg.checkpoint.verify)
                self.state.skipped_batches.append(bad_batch)
                self.state.step -= 1  # train_step's bookkeeping then lands exactly on the checkpoint's step
                self.state.consumed_samples -= self.cfg.train.global_batch_size
                self.scheduler.step(increment=-1)
                self.guard.history.clear()
                if self.is_logger:
                    print(f"step {step}: {reason}; rolled back to {target.name}, batch at sample {bad_batch} "
                          f"will be skipped", flush=True)
                return
            action = "halt"  # nothing to roll back to
        if action == "halt":
            saved = self.save()
            raise TrainingHalted(f"step {step}: {reason}; halted before applying it (checkpoint {saved}); resume "
                                 f"with train.on_bad_step=skip or rollback to continue past it")
        self.state.skipped_batches.append(self.state.consumed_samples)
        if self.is_logger:
            print(f"step {step}: {reason}; update skipped, batch at sample {self.state.consumed_samples} recorded",
                  flush=True)

    def record_bad_step(self, step: int, reason: str, action: str) -> None:
        if self.is_logger:
            with open(self.run_dir / "bad_steps.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "reason": reason, "action": action,
                                    "consumed_samples": self.state.consumed_samples, "time": time.time()}) + "\n")

    def forward_backward(self, batches: list, window: BackpropWindow, collect: bool = False) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches; returns the summed masked token loss (on the last
        pipeline stage; zero on others). Under pipeline parallelism the looped schedule drives the stages, or the
        objective itself when it runs several passes per micro-batch (`pipeline_run`, objectives/pipelined.py)."""
        if hasattr(self.objective, "set_step"):  # objectives with a schedule of their own (Coconut's stages)
            self.objective.set_step(self.state.step)
        if self.schedule is not None:
            if hasattr(self.objective, "pipeline_run"):
                return self.objective.pipeline_run(self.model, batches, window)
            scale, loss_fn = self.faults.loss_scale(), self.objective.pipeline_loss
            return self.schedule.run(batches, window, loss_fn if scale == 1.0 else (lambda *a: loss_fn(*a) * scale))
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, mb in enumerate(batches):
            mb_loss = self.objective.loss_sum(self.model, mb, window, collect and i == 0) * self.faults.loss_scale()
            if torch.is_grad_enabled():
                mb_loss.backward()
            loss_sum += mb_loss.detach()
        return loss_sum

    def reduce_loss(self, loss_sum: torch.Tensor) -> None:
        """Sum the loss over data-parallel ranks, and from the last pipeline stage to all (in place)."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(loss_sum, group=parallel_state.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(loss_sum, group=_dp_group())

    def router_balance_loss(self, calls_per_layer: int) -> float:
        """Mean load-balancing loss of the MoE routers over this step's grad passes (megatron's tracker holds
        the per-layer sums; each core layer's router runs once per grad iteration and micro-batch)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        if entry is None:
            return float("nan")
        values = entry["values"]
        layers = int((values != 0).sum().clamp_min(1))
        mean = (values.sum() / (layers * max(calls_per_layer, 1))).reshape(1).float()
        torch.distributed.all_reduce(mean, group=_dp_group())
        clear_aux_losses_tracker()
        return float(mean) / self.dp_size

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean validation loss at the eval depth over `train.eval_batches` global batches."""
        t = self.cfg.train
        depth = self.sampler.eval_depth()
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        for b in range(t.eval_batches):
            batches = micro_batches(self.data.valid, b * t.global_batch_size, t.global_batch_size,
                                    t.micro_batch_size, self.dp_rank, self.dp_size, self.device)
            loss_sum += self.forward_backward(batches, BackpropWindow(depth, 0))
            tokens += sum(self.objective.loss_tokens(mb) for mb in batches)
        self.reduce_loss(loss_sum)
        torch.distributed.all_reduce(tokens, group=_dp_group())
        loss = (loss_sum / tokens.clamp_min(1)).item()
        return {"loss": loss, "depth": float(depth)}


def _from_rank0(value):
    """Rank 0's value on every rank (a refusal decided on rank 0 stops all ranks together; one run id)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()

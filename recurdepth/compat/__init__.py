"""Every patch of, or workaround for, megatron-core internals, under one version check and in one table.

A module here that touches megatron internals calls `recurdepth.compat.version.check_megatron_version()` in each
of its entry points before it touches megatron; an untested megatron-core is refused with one line (installed and
tested versions, the fix, RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1 to try anyway). Nothing outside this folder patches
megatron or imports its private names. `PATCHES` (below) is the table, one row per patch: what is patched, the
module and entry point that apply it, what megatron assumes, what breaks without the patch, and when it applies;
`table()` renders it, and this docstring ends with that rendering (tests/compat/test_patch_table.py checks that
every row names an existing module, entry point and megatron/torch target, and that each entry point refuses an
untested megatron).

Entry points: `megatron_cpu.apply_cpu_compat()` (CPU only; also applies the optimizer fix),
`optimizer.apply_optimizer_fix()` (wherever megatron's fallback torch Adam runs),
`checkpoint_writer.apply_checkpoint_writer_compat()` (always), `compile.compile_blocks()` (train.compile),
`megatron_jit.disable_jit_fuser_on_cpu()` (as megatron is imported: the hook `recurdepth/__init__.py` installs),
`datasets` (preprocessing), `scheduler` (checkpoint load) and `private` (megatron private names used as they
are, imported nowhere else).
"""

from __future__ import annotations

import textwrap
from typing import NamedTuple

__all__ = ["PATCHES", "Patch", "table"]


class Patch(NamedTuple):
    """One row of the table of megatron patches."""

    name: str  # what is replaced, and by what
    module: str  # recurdepth.compat.<module>, which applies it
    entry: str  # the function of `module` that applies it (checks the version first)
    targets: tuple  # dotted names of the megatron/torch objects patched (or whose behaviour is worked around)
    assumes: str  # what megatron assumes
    breaks: str  # what breaks without the patch
    applies_when: str


_CPU = "CUDA absent (or apply_cpu_compat(force=True))"
_FALLBACK_ADAM = ("megatron uses its fallback torch Adam (megatron.core.optimizer.USING_PYTORCH_OPTIMIZER: neither "
                  "TransformerEngine's nor apex's FusedAdam importable), on CPU and GPU alike")
_ALWAYS = "always, CPU and GPU (init_distributed, before the first checkpoint save)"
_COMPILE = "train.compile=true (model.build.compile_blocks; the dense bench too)"
_M = "recurdepth.compat."

PATCHES: tuple[Patch, ...] = (
    # ---------------------------------------------------------------- megatron on CPU/gloo
    Patch("torch.cuda.current_device() -> cpu device", _M + "megatron_cpu", "apply_cpu_compat",
          ("torch.cuda.current_device",),
          "torch.cuda.current_device() is the allocation device",
          "every factory call with device=torch.cuda.current_device() raises", _CPU),
    Patch("torch.cuda.synchronize, empty_cache -> no-ops", _M + "megatron_cpu", "apply_cpu_compat",
          ("torch.cuda.synchronize", "torch.cuda.empty_cache"),
          "a CUDA context to wait for / free memory in",
          "pipeline p2p, checkpoint save/load raise", _CPU),
    Patch("torch.cuda.Stream, Event, current_stream, default_stream, stream() -> inert stand-ins",
          _M + "megatron_cpu", "apply_cpu_compat",
          ("torch.cuda.Stream", "torch.cuda.Event", "torch.cuda.current_stream", "torch.cuda.default_stream",
           "torch.cuda.stream"),
          "side streams and events (CPU ops run in order, so waiting/recording has nothing to do)",
          "DDP overlap_grad_reduce and the MoE alltoall dispatcher raise", _CPU),
    Patch("torch.cuda[.random].get_rng_state, set_rng_state, manual_seed -> the CPU default generator",
          _M + "megatron_cpu", "apply_cpu_compat",
          ("torch.cuda.get_rng_state", "torch.cuda.set_rng_state", "torch.cuda.manual_seed",
           "torch.cuda.random.get_rng_state", "torch.cuda.random.set_rng_state", "torch.cuda.random.manual_seed"),
          "a device generator (on CPU every random op draws from the default generator)",
          "seeding and the RNG tracker raise; merely skipping them silently changes results", _CPU),
    Patch("Tensor.cuda(), Tensor.pin_memory() -> the tensor itself", _M + "megatron_cpu", "apply_cpu_compat",
          ("torch.Tensor.cuda", "torch.Tensor.pin_memory"),
          "GPU copies / pinned buffers (tied embeddings in PP, checkpoint exchange, grad-scaler load)",
          "AssertionError 'Torch not compiled with CUDA enabled' / 'Cannot access accelerator device'", _CPU),
    Patch("`torch` global of megatron modules with device='cuda' literals -> a torch whose factory functions "
          "map CUDA devices to CPU and drop pin_memory=True (the real torch is not touched)",
          _M + "megatron_cpu", "apply_cpu_compat",
          ("megatron.core.optimizer.optimizer.torch", "megatron.core.optimizer.clip_grads.torch",
           "megatron.core.pipeline_parallel.schedules.torch", "megatron.core.transformer.utils.torch",
           "megatron.core.dist_checkpointing.exchange_utils.torch"),
          "device='cuda' literals (optimizer scalars, clip_grads, schedules' token counter, causal masks, "
          "checkpoint exchange, MoE aux-loss tracker)",
          "'Torch not compiled with CUDA enabled' in each", _CPU),
    Patch("'torch.cuda.FloatTensor' (Half, BFloat16) string constants -> 'torch.FloatTensor' ...",
          _M + "megatron_cpu", "apply_cpu_compat",
          ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
           "megatron.core.optimizer.clip_grads"),
          "Tensor.type() of every parameter is a torch.cuda.* name",
          "both optimizers and clip_grads reject CPU parameters ('Wrapped parameters must be one of ...')", _CPU),
    Patch("tensor_parallel.random._get/_set_cuda_rng_state -> CPU generator state", _M + "megatron_cpu",
          "apply_cpu_compat",
          ("megatron.core.tensor_parallel.random._get_cuda_rng_state",
           "megatron.core.tensor_parallel.random._set_cuda_rng_state"),
          "torch.cuda.default_generators[idx] (real state on CPU: deterministic, get/set restores it exactly)",
          "the tracker's fork() and activation checkpointing raise", _CPU),
    Patch("log filter on megatron.core.tensor_parallel.random", _M + "megatron_cpu", "apply_cpu_compat",
          ("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork",),
          "separate CPU and device generators",
          "with one generator every fork() that draws logs a false 'CPU RNG state changed within GPU RNG context'",
          _CPU),
    Patch("moe_utils.te_general_gemm = None (when unbound)", _M + "megatron_cpu", "apply_cpu_compat",
          ("megatron.core.transformer.moe.moe_utils.router_gating_linear",),
          "router_gating_linear tests `te_general_gemm is not None`, a name bound only by a successful TE import",
          "NameError in every MoE router forward", _CPU),
    Patch("token_dispatcher.maybe_move_tensor_to_cpu -> always converts (numpy if asked)", _M + "megatron_cpu",
          "apply_cpu_compat", ("megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",),
          "split sizes are moved to the host only `if tensor.is_cuda`",
          "they stay tensors; the alltoall dispatcher's all_to_all_single raises TypeError", _CPU),
    # ---------------------------------------------------------------- megatron's fallback optimizer
    Patch("DistributedOptimizer.sharded_state_dict -> optimizer state initialised before loading, params kept",
          _M + "optimizer", "apply_optimizer_fix",
          ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.sharded_state_dict",),
          "state_dict() finds one 'step' in the optimizer state (torch Adam's is empty until its first step; "
          "megatron's own initialiser takes a zero-grad step, which AdamW's decay applies to the params)",
          "sharded_state_dict(is_loading=True) of a fresh optimizer fails with a bare AssertionError",
          _FALLBACK_ADAM),
    Patch("DistributedOptimizer._set_main_param_and_optimizer_states -> 'step' left to load_state_dict, copies "
          "under no_grad", _M + "optimizer", "apply_optimizer_fix",
          ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",),
          "every state key of the loaded param state belongs in the param's state",
          "the stale local 'step' is copied back (dp_reshardable; fully_reshardable: KeyError 'step'), and fp32 "
          "main params that are views of leaf params are written with grad mode on (RuntimeError): a resumed run "
          "silently drifts or crashes", _FALLBACK_ADAM),
    Patch("DistributedOptimizer.load_state_dict -> each param its own 'step' copy", _M + "optimizer",
          "apply_optimizer_fix", ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict",),
          "the optimizer keeps 'step' per param group (fused Adam); it puts ONE 'step' tensor into every param's "
          "state",
          "torch Adam advances that shared tensor once per param: after a resume the bias correction silently "
          "drifts", _FALLBACK_ADAM),
    # ---------------------------------------------------------------- checkpoint writer
    Patch("filesystem_async._get_write_results_queue -> one in-process queue.Queue", _M + "checkpoint_writer",
          "apply_checkpoint_writer_compat",
          ("megatron.core.dist_checkpointing.strategies.filesystem_async._get_write_results_queue",),
          "the write results may come from another process (async save), so the first save starts a persistent "
          "spawn-context Manager().Queue(): a helper process in the trainer's group with default signal handlers "
          "(recurdepth saves synchronously: results are put and got in the trainer process)",
          "a group-delivered SIGTERM/SIGUSR1/SIGINT kills the helper and the stop-save dies with BrokenPipeError "
          "(exit 1, step_N.tmp left, the steps since the last checkpoint lost); after SIGKILL of the trainer the "
          "helper stays alive as an orphan", _ALWAYS),
    Patch("FileSystemWriterAsync.write_preloaded_data -> the same, in a worker that sets PR_SET_PDEATHSIG=SIGKILL "
          "and ignores stop signals (signature kept: megatron inspects it)", _M + "checkpoint_writer",
          "apply_checkpoint_writer_compat",
          ("megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync."
           "write_preloaded_data",),
          "its forked writer workers (one per file) may inherit the trainer's signal handlers and need no tie to "
          "its life",
          "a stop signal the trainer's handler does not cover kills a writer (megatron then waits forever in "
          "count_queue.join()), and a writer outlives a SIGKILLed trainer", _ALWAYS),
    # ---------------------------------------------------------------- torch.compile of the blocks
    Patch("torch._dynamo.config.reorderable_logging_functions += warnings.warn", _M + "compile", "compile_blocks",
          ("torch._dynamo.config.reorderable_logging_functions",),
          "megatron warns (warnings.warn) inside forward, once per process",
          "each warning is a graph break in every compiled block: separate graphs, no fusion across them",
          _COMPILE),
    Patch("torch._dynamo.config.recompile_limit >= 4 x blocks", _M + "compile", "compile_blocks",
          ("torch._dynamo.config.recompile_limit",),
          "every block is a separate guard set on one code object (layer number, grad/no-grad variants)",
          "past torch's default limit (8) dynamo gives up on the code object: the remaining blocks run eager (one "
          "warning, no fusion)", _COMPILE),
    Patch("RowParallelLinear._forward_impl (class-level) -> the layer's own tp_group where megatron passes None",
          _M + "compile", "compile_blocks",
          ("megatron.core.tensor_parallel.layers.RowParallelLinear._forward_impl",
           "megatron.core.utils.get_tensor_model_parallel_group_if_none"),
          "RowParallelLinear.forward passes tp_group=None to its matmul, which looks the default TP group up and, "
          "on rank 0, warns (DeprecationWarning) on every call (the group is unused on that path: no dgrad "
          "all-reduce, no sequence parallelism inside the matmul)",
          "a graph break in every compiled block that has a row-parallel linear (all of them)", _COMPILE),
    # ---------------------------------------------------------------- megatron's import
    Patch("megatron.core.jit.jit_fuser -> megatron's own noop_decorator (disable_jit_fuser(), called by an import "
          "hook right after megatron.core.jit runs, before any module binds jit_fuser)", _M + "megatron_jit",
          "disable_jit_fuser_on_cpu", ("megatron.core.jit.jit_fuser", "megatron.core.jit.disable_jit_fuser"),
          "its ~40 fused helpers (bias+activation, norms, MoE router bias) are worth torch.compile: decorating "
          "them imports dynamo and inductor at import time",
          "nothing fails, but every process that imports megatron spends 1.5-2 s importing dynamo/inductor for "
          "kernels a CPU never runs compiled (each first call would start an inductor C++ compile)",
          "CUDA absent (RECURDEPTH_MEGATRON_JIT=1 keeps the fusions, =0 drops them on GPU too); the hook is "
          "installed when recurdepth is imported"),
    # ---------------------------------------------------------------- data preprocessing
    Patch("IndexedDatasetBuilder's per-sequence index lists -> typed arrays", _M + "datasets",
          "compact_index_lists",
          ("megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder.add_item",
           "megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder.finalize"),
          "sequence_lengths / document_indices are Python lists (~36 bytes an entry) that add_item, add_document, "
          "end_document and finalize's index writer only append to, measure and iterate (typed arrays do the "
          "same at 8 bytes; only a builder in exactly the fresh state is touched)",
          "nothing fails, but memory grows with the corpus (~7 GB of index for 100M documents): large corpora "
          "run out of memory", "every `recurdepth data preprocess` (a fresh builder, before its first add_item)"),
    # ---------------------------------------------------------------- checkpoint load
    Patch("OptimizerParamScheduler.num_steps = 0 before load_state_dict", _M + "scheduler", "load_scheduler_state",
          ("megatron.core.optimizer_param_scheduler.OptimizerParamScheduler.load_state_dict",),
          "it is loaded into a scheduler that has not stepped: load_state_dict *adds* the saved step count "
          "(self.step(increment=num_steps)) to the current one",
          "a scheduler that has already stepped ends at current + saved steps: the guard's rollback "
          "(train.on_bad_step=rollback) reloads into the live scheduler, so every later LR silently comes from the "
          "wrong step", "every checkpoint load into a scheduler (resume, rollback)"),
    # ---------------------------------------------------------------- private names used (not patched)
    Patch("megatron.core.optimizer._get_param_groups, used as is (no patch)", _M + "private", "param_groups",
          ("megatron.core.optimizer._get_param_groups",),
          "nothing: a private helper whose groups (weight decay, lr multipliers) its optimizer uses",
          "the DeepSpeed engine's AdamW would group parameters differently from megatron's optimizer, so "
          "switching engines would change the update", "train.engine=deepspeed"),
    Patch("indexed_dataset._IndexReader, used as is (no patch)", _M + "private", "index_reader_class",
          ("megatron.core.datasets.indexed_dataset._IndexReader",),
          "nothing: the .idx reader IndexedDataset opens",
          "the indexed-format checks would restate the .idx format instead of reading it megatron's way",
          "every check of an indexed dataset (data.sources paths, recurdepth data check)"),
    Patch("blended_megatron_dataset_builder._get_size_per_split_per_dataset, used as is (no patch)",
          _M + "private", "size_per_split_per_dataset",
          ("megatron.core.datasets.blended_megatron_dataset_builder._get_size_per_split_per_dataset",),
          "nothing: the samples per split per source the blended builder requests",
          "split planning would count other sample numbers than megatron then asks for (an empty or "
          "over-repeated split found too late: megatron loops forever on an empty one)", "every dataset build"),
)


def table(width: int = 116) -> str:
    """`PATCHES` as text: one block per patch."""
    out = []
    for p in PATCHES:
        out.append(f"* {p.name}")
        for label, text in ((f"{p.module.rsplit('.', 1)[-1]}.{p.entry}", ", ".join(p.targets)),
                            ("megatron assumes", p.assumes), ("breaks without", p.breaks),
                            ("applies when", p.applies_when)):
            out.append(textwrap.fill(text, width, initial_indent=f"    {label}: ", subsequent_indent=" " * 6))
    return "\n".join(out)


__doc__ = f"{__doc__}\nThe table\n---------\n{table()}\n"

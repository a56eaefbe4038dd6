"""torchrun worker for tests/compat/test_megatron_cpu.py.

    python -m torch.distributed.run --standalone --nproc_per_node N \
        tests/compat/_cpu_worker.py CASE[,CASE...] OUTDIR [CKPT_DIR]

Each case initialises megatron's parallel state for the current world size, runs a small
megatron computation on CPU/gloo and has rank 0 write ``OUTDIR/<case>.pt`` (plain tensors and
floats) for the test to compare against a single-process run or an in-process reference.

Cases
  tp    VocabParallelEmbedding -> ColumnParallelLinear -> gelu -> RowParallelLinear ->
        ColumnParallelLinear (vocab) -> vocab_parallel_cross_entropy, forward+backward at
        TP = world size; writes the loss and the full (gathered) parameters and gradients.
  dp    megatron DDP + distributed Adam at DP = world size, 4 steps on a fixed global batch,
        with overlap_grad_reduce False and True; saves a dist checkpoint (model + optimizer)
        after step 2 to OUTDIR/ckpt; writes losses and parameters.
  load  (any world size) loads CKPT_DIR (default OUTDIR/ckpt) into a fresh model + optimizer
        and runs steps 3 and 4; writes the loaded parameters, losses and final parameters.
  pp    two-stage pipeline (PP=2) through get_forward_backward_func, 1F1B with 4 microbatches,
        and the same model at PP=1 in each process as reference; writes losses and grads.
  moe   MoE layer, 4 experts, top-2, EP=2 with alltoall and allgather dispatchers, and EP=1 in
        each process as reference (same weights); writes losses and grads.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from recurdepth.compat.megatron_cpu import apply_cpu_compat  # noqa: E402

assert apply_cpu_compat(), "CUDA is available: the tests skip the CPU path then"

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

SEED = 1234
HIDDEN, FFN, VOCAB = 16, 32, 32


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def init_parallel(tp=1, pp=1, ep=1):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)


def make_config(tp=1, pp=1, ep=1, **kw) -> TransformerConfig:
    base = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=2,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
    )
    base.update(kw)
    return TransformerConfig(**base)


def save(outdir, case, obj):
    if rank() == 0:
        torch.save(obj, os.path.join(outdir, f"{case}.pt"))


def gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    n = dist.get_world_size(group)
    if n == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


# --------------------------------------------------------------------------------------------
# tp


class TPNet(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        init = config.init_method
        self.embed = tensor_parallel.VocabParallelEmbedding(
            VOCAB, HIDDEN, init_method=init, config=config
        )
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
            skip_bias_add=False,
        )
        self.head = tensor_parallel.ColumnParallelLinear(
            HIDDEN, VOCAB, config=config, init_method=init, bias=False, gather_output=False
        )

    def forward(self, tokens, labels):
        h = self.embed(tokens)  # [s, b, h]
        y, _ = self.fc1(h)
        y, _ = self.fc2(torch.nn.functional.gelu(y))
        logits, _ = self.head(h + y)  # [s, b, vocab/tp]
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels).mean()


# dim along which each TPNet parameter is split over TP ranks (None: replicated)
TP_SPLIT_DIM = {
    "embed.weight": 0, "fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1, "fc2.bias": None,
    "head.weight": 0,
}  # fmt: skip


def case_tp(outdir):
    tp = world()
    init_parallel(tp=tp)
    torch.manual_seed(SEED)
    model = TPNet(make_config(tp=tp))
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (6, 3), generator=g)  # [s, b]
    labels = torch.randint(0, VOCAB, (6, 3), generator=g)
    loss = model(tokens, labels)
    loss.backward()
    grads, params = {}, {}
    for name, p in model.named_parameters():
        dim = TP_SPLIT_DIM[name]
        grads[name] = p.grad.detach().clone() if dim is None else gather_tp(p.grad, dim)
        params[name] = p.detach().clone() if dim is None else gather_tp(p, dim)
    save(outdir, "tp", {"loss": loss.item(), "grads": grads, "params": params})


# --------------------------------------------------------------------------------------------
# dp / load


class MLP(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        init = config.init_method
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x):
        y, _ = self.fc1(x)
        y, _ = self.fc2(torch.nn.functional.gelu(y))
        return y


GLOBAL_BATCH = 8
N_STEPS = 4
CKPT_AFTER = 2  # steps


def global_batch():
    g = torch.Generator().manual_seed(11)
    xs = torch.randn(N_STEPS, GLOBAL_BATCH, HIDDEN, generator=g)
    ys = torch.randn(N_STEPS, GLOBAL_BATCH, HIDDEN, generator=g)
    return xs, ys


def build_trainer(overlap_grad_reduce: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = make_config()
    torch.manual_seed(SEED)
    module = MLP(config)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True,
        overlap_grad_reduce=overlap_grad_reduce,
        bucket_size=256 if overlap_grad_reduce else None,  # >1 bucket when overlapping
    )
    model = DistributedDataParallel(config, ddp_config, module)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0,
        use_distributed_optimizer=True, params_dtype=torch.float32,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(opt_config, [model])
    return model, optimizer


def train_step(model, optimizer, x, y) -> float:
    """One step on this rank's slice of the global batch; returns the global-batch mean loss."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    n = x.shape[0] // dp
    x, y = x[dp_rank * n : (dp_rank + 1) * n], y[dp_rank * n : (dp_rank + 1) * n]
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    model.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok
    total = loss.detach().clone()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total / dp).item()


def params_of(model):
    return {k: v.detach().clone() for k, v in model.module.named_parameters()}


# 'dp_reshardable' (what megatron training uses; DP size may change). The 0.16 default
# raises "ShardedTensor.flattened_range is not supported." (also on GPU).
CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def sharded_sd(model, optimizer, is_loading=False):
    model_sd = model.module.sharded_state_dict(metadata=CKPT_METADATA)
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=CKPT_METADATA
        ),
    }


def case_dp(outdir):
    init_parallel()
    xs, ys = global_batch()
    out = {}
    for overlap in (False, True):
        model, optimizer = build_trainer(overlap)
        losses = []
        for step in range(N_STEPS):
            if step == CKPT_AFTER and not overlap:
                ckpt = os.path.join(outdir, "ckpt")
                if rank() == 0:
                    os.makedirs(ckpt, exist_ok=True)
                dist.barrier()
                dist_checkpointing.save(sharded_sd(model, optimizer), ckpt)
                out["params_at_ckpt"] = params_of(model)
            losses.append(train_step(model, optimizer, xs[step], ys[step]))
        key = "overlap" if overlap else "sync"
        out[key] = {"losses": losses, "params": params_of(model)}
    save(outdir, "dp", out)


def case_load(outdir):
    ckpt = sys.argv[3] if len(sys.argv) > 3 else os.path.join(outdir, "ckpt")
    init_parallel()
    xs, ys = global_batch()
    model, optimizer = build_trainer(False)
    state = dist_checkpointing.load(sharded_sd(model, optimizer, is_loading=True), ckpt)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loaded = params_of(model)
    losses = [train_step(model, optimizer, xs[s], ys[s]) for s in range(CKPT_AFTER, N_STEPS)]
    save(outdir, "load", {"loaded_params": loaded, "losses": losses, "params": params_of(model)})


# --------------------------------------------------------------------------------------------
# pp


PP_LAYERS, PP_MICROBATCHES, SEQ, MBS = 4, 4, 3, 2


class PipeStage(MegatronModule):
    """Layers [first, first + n) of a tanh-MLP stack; weights depend only on the layer index."""

    def __init__(self, config, first, n):
        from megatron.core.enums import ModelType

        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by the schedules
        self.layers = torch.nn.ModuleList()
        for i in range(first, first + n):
            layer = torch.nn.Linear(HIDDEN, HIDDEN)
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
                layer.bias.copy_(0.1 * torch.randn(HIDDEN, generator=g))
            self.layers.append(layer)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor):  # called by the pipeline schedule
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, x):
        h = x if parallel_state.is_pipeline_first_stage() else self.input_tensor
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h


def run_pipeline(pp):
    """4 microbatches through get_forward_backward_func at pipeline size pp; returns
    (losses on the last stage, {global layer index: (weight grad, bias grad)} of this stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    init_parallel(pp=pp)
    config = make_config(pp=pp, pipeline_dtype=torch.float32, num_layers=PP_LAYERS)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    n = PP_LAYERS // pp
    model = PipeStage(config, stage * n, n)
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(SEQ, MBS, HIDDEN, generator=g), torch.randn(SEQ, MBS, HIDDEN, generator=g))
        for _ in range(PP_MICROBATCHES)
    ]

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)

        def loss_func(output):
            loss = torch.nn.functional.mse_loss(output, y)
            return loss, {"loss": loss.detach()}

        return model(x), loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=PP_MICROBATCHES, seq_length=SEQ, micro_batch_size=MBS,
        forward_only=False,
    )  # fmt: skip
    losses = [d["loss"].item() for d in out] if parallel_state.is_pipeline_last_stage() else []
    grads = {
        stage * n + i: (l.weight.grad.clone(), l.bias.grad.clone())
        for i, l in enumerate(model.layers)
    }
    return losses, grads


def case_pp(outdir):
    ref_losses, ref_grads = run_pipeline(pp=1)  # the whole stack in every process
    losses, grads = run_pipeline(pp=world())
    everything = [None] * world()
    dist.all_gather_object(everything, (losses, grads))
    save(outdir, "pp", {
        "ref_losses": ref_losses, "ref_grads": ref_grads,
        "losses": [l for ls, _ in everything for l in ls],
        "grads": {k: v for _, gs in everything for k, v in gs.items()},
    })  # fmt: skip


# --------------------------------------------------------------------------------------------
# moe

N_EXPERTS, TOPK, MOE_TOKENS = 4, 2, 6


def build_moe(ep, dispatcher):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    init_parallel(ep=ep)
    config = make_config(
        ep=ep, num_moe_experts=N_EXPERTS, moe_router_topk=TOPK, add_bias_linear=False,
        moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=N_EXPERTS, moe_grouped_gemm=False)
    layer = build_module(spec.submodules.mlp, config=config)
    # Same weights at every EP size: each expert's weights depend only on its global index.
    n_local = N_EXPERTS // ep
    first = parallel_state.get_expert_model_parallel_rank() * n_local
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        layer.router.weight.copy_(torch.randn(N_EXPERTS, HIDDEN, generator=g))
        for i, expert in enumerate(layer.experts.local_experts):
            g = torch.Generator().manual_seed(200 + first + i)
            for p in (expert.linear_fc1.weight, expert.linear_fc2.weight):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return layer, first


def run_moe(ep, dispatcher):
    """Forward+backward of this rank's tokens; returns (loss, router grad, {expert: grads})."""
    layer, first = build_moe(ep, dispatcher)
    g = torch.Generator().manual_seed(40 + rank())  # different tokens on each rank
    x = torch.randn(MOE_TOKENS, 1, HIDDEN, generator=g, requires_grad=True)
    out, _ = layer(x)
    loss = (out**2).mean()
    loss.backward()
    experts = {
        first + i: [e.linear_fc1.weight.grad.clone(), e.linear_fc2.weight.grad.clone()]
        for i, e in enumerate(layer.experts.local_experts)
    }
    return loss.item(), layer.router.weight.grad.clone(), experts, x.grad.clone()


def case_moe(outdir):
    ep = world()
    ref_loss, ref_router, ref_experts, ref_xgrad = run_moe(1, "alltoall")
    for grads in ref_experts.values():  # at EP>1 an expert sees the tokens of every rank
        for t in grads:
            dist.all_reduce(t)
    results = {"ref": (ref_loss, ref_router, ref_experts, ref_xgrad)}
    for dispatcher in ("alltoall", "allgather"):
        results[dispatcher] = run_moe(ep, dispatcher)
    everything = [None] * world()
    dist.all_gather_object(everything, results)
    save(outdir, "moe", everything)  # one entry per rank


CASES = {"tp": case_tp, "dp": case_dp, "load": case_load, "pp": case_pp, "moe": case_moe}


def main():
    cases, outdir = sys.argv[1].split(","), sys.argv[2]
    dist.init_process_group("gloo")
    try:
        for case in cases:
            t0 = time.time()
            CASES[case](outdir)
            dist.barrier()
            if rank() == 0:
                print(f"case {case} ok in {time.time() - t0:.1f}s", flush=True)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":  # required: checkpoint saving starts a spawn-context Manager
    main()

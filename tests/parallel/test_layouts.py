"""Every parallel layout gives the single-process numbers: 5 optimizer steps under torchrun/gloo, fp32,
per-step loss within 1e-5 relative of one process with the same global batch and weights."""

import pytest

from tests.conftest import SMALL, TINY, assert_same_losses, read_metrics, run_cli

STEPS = 5
COMMON = ["train", str(TINY), *SMALL, f"train.steps={STEPS}", "checkpoint.interval=0", "checkpoint.save_final=false",
          "logging.tensorboard=false", "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"]


MOE = ["model.num_experts=4", "model.moe_top_k=2"]
R1 = ["recurrence.sampler=fixed", "recurrence.depth=1", "recurrence.backprop_depth=1"]
R4K2 = ["recurrence.sampler=fixed", "recurrence.depth=4", "recurrence.backprop_depth=2"]
# what an imported model uses (docs/retrofit.md): GQA, heads wider than h / heads with q/k norms (Qwen3; megatron
# sums their gradients over TP ranks), Huginn's q/k bias (its value part held at zero, a mask on the gradient that
# must pick the same rows of every tensor-parallel shard), llama3 RoPE scaling, pre-norm
IMPORTED = ["model.num_query_groups=2", "model.head_dim=24", "model.qk_norm=true", "model.qkv_bias=qk",
            "model.rope_scaling=llama3", "model.rope_scaling_factor=4", "model.rope_original_max_positions=16",
            "model.block_norm=pre", "optimizer.lr=1e-2"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_cache):
    """One-process runs, computed on first use: the dense model and the MoE model."""
    cache = {}

    def get(model_overrides: tuple):
        if model_overrides not in cache:
            run_dir = tmp_path_factory.mktemp("one-process")
            run_cli([*COMMON, *model_overrides, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"])
            cache[model_overrides] = read_metrics(run_dir)
        return cache[model_overrides]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("nproc,model,layout", [
    (2, (), ["parallel.tensor=2"]),
    (2, (), ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (4, (), ["parallel.tensor=2"]),  # DP=2 x TP=2
    (2, tuple(MOE), ["parallel.expert=2", "model.moe_dispatcher=alltoall"]),
    (2, tuple(MOE), ["parallel.expert=2", "model.moe_dispatcher=allgather"]),
    (2, tuple(R1), ["parallel.pipeline=2"]),
    (2, tuple(R4K2), ["parallel.pipeline=2"]),  # the looped schedule: 4 trips around the ring, 2 with grad
    (2, (), ["parallel.pipeline=2"]),  # sampled r (lognormal-Poisson) on every stage
    (4, (), ["parallel.tensor=2", "parallel.pipeline=2"]),
    (2, tuple(IMPORTED), ["parallel.tensor=2"]),
    (2, tuple(IMPORTED), ["parallel.pipeline=2"]),
], ids=["tp2", "tp2-sp", "dp2xtp2", "ep2-alltoall", "ep2-allgather", "pp2-r1", "pp2-r4k2", "pp2-sampled",
        "tp2xpp2", "tp2-imported", "pp2-imported"])
def test_layout_matches_one_process(references, tmp_path, data_cache, nproc, model, layout):
    run_cli([*COMMON, *model, *layout, f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}"], nproc=nproc)
    rows = read_metrics(tmp_path)
    assert_same_losses(references(model), rows, STEPS)
    if model == tuple(MOE):  # the router's load-balancing loss is logged (and is ~1 for a balanced router: E * sum f_i p_i)
        assert all(0.5 < r["health/moe_load_balancing_loss"] < 4 for r in rows)

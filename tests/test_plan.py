"""`recurdepth plan`: layout validation, the per-rank memory model against the real model (parameters,
autograd's saved tensors, the CPU memory bench) and the suggestion search."""

from __future__ import annotations

import argparse
import re
import time

import pytest

# what plan() imports lazily (torch, megatron-core via the FLOPs model): loaded here so that the timing below
# measures the planning itself
import recurdepth.distributed  # noqa: F401
import recurdepth.model.build  # noqa: F401
import recurdepth.train.flops  # noqa: F401
from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from recurdepth.plan import (GiB, MiB, add_plan_parser, apply_overrides, looped_pipeline_in_flight, plan,
                             stage_activations)
from tests.conftest import ROOT, TINY, run_cli

HUGINN = ROOT / "configs" / "huginn-3.5b.yaml"
UNSHARDED_ONE_NODE = ["optimizer.distributed=false", "parallel.pipeline=1"]


def _cli(argv: list) -> int:
    """`recurdepth plan ARGV` through the parser `add_plan_parser` builds; returns the exit status."""
    parser = argparse.ArgumentParser(prog="recurdepth")
    add_plan_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_huginn_on_4096_h100s_fits_and_plans_fast():
    cfg = load_config(HUGINN)
    start = time.perf_counter()
    pl = plan(cfg, 512, 8, "h100")
    assert time.perf_counter() - start < 2.0
    assert pl.fits and pl.world == 4096 and (pl.dp, pl.tp, pl.pp, pl.ep) == (2048, 1, 2, 1)
    assert 3.4e9 < pl.total_params < 3.7e9  # Huginn-0125: 3.5B
    assert pl.total == sum([pl.params, pl.grads, pl.optimizer, pl.activations, pl.allocator, pl.runtime])
    assert pl.total <= pl.capacity < 80 * GiB
    assert 0.2 < pl.mfu <= 0.4 and pl.step_time > 0
    assert pl.tokens_per_s == pytest.approx(pl.tokens_per_step / pl.step_time)
    text = pl.format()
    for row in ("parameters", "gradients", "optimizer", "activations", "framework/runtime", "total",
                "step time", "tokens/s", "MFU", "DP 2048 x TP 1 x PP 2 x EP 1", "fits:"):
        assert row in text


def test_layout_that_cannot_fit_says_so_and_its_suggestion_fits(capsys):
    cfg = load_config(HUGINN, UNSHARDED_ONE_NODE)
    pl = plan(cfg, 1, 8, "h100")
    assert not pl.fits and pl.total > pl.capacity
    assert pl.suggestion, "expected a suggested override"
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+=\S+", o) for o in pl.suggestion)
    text = pl.format()
    assert "does not fit" in text and "suggestion: " + " ".join(pl.suggestion) in text
    # applying the suggestion (as command-line overrides) and planning again: it fits
    again = plan(load_config(HUGINN, UNSHARDED_ONE_NODE + pl.suggestion), 1, 8, "h100")
    assert again.fits and again.total == pl.suggestion_plan.total
    # the CLI: the report is the answer (exit 0); --strict makes a misfit an exit status
    assert _cli([str(HUGINN), *UNSHARDED_ONE_NODE, "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"]) == 0
    assert _cli([str(HUGINN), *UNSHARDED_ONE_NODE, "--nodes", "1", "--gpu", "h100", "--strict"]) == 3
    assert _cli([str(HUGINN), "--nodes", "512", "--gpus-per-node", "8", "--strict"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_suggestions_are_planned_under_the_same_assumptions():
    pl = plan(load_config(HUGINN, ["parallel.pipeline=1"]), 512, 8, "h100",
              assumed_mfu=0.3, runtime_bytes=40 * GiB)  # a runtime this large leaves no room without changes
    assert not pl.fits and pl.suggestion is not None
    alt = pl.suggestion_plan
    assert alt.fits and alt.total < pl.total and alt.runtime == 40 * GiB and alt.assumed_mfu == 0.3


@pytest.mark.parametrize("overrides", [
    [], ["model.activation=gelu"], ["model.block_norm=pre", "model.normalization=LayerNorm"],
    ["model.tie_embeddings=false", "model.adapter=gate"], ["model.adapter=add", "model.num_query_groups=2"],
    ["model.num_experts=4", "model.moe_top_k=2"],
])
def test_parameter_count_matches_the_model(megatron_single_process, overrides):
    from recurdepth.data.tokenizer import ByteTokenizer
    from recurdepth.model.build import build_model

    cfg = load_config(TINY, overrides)
    vocab = ByteTokenizer().vocab_size
    model = build_model(cfg, vocab)
    actual = sum(p.numel() for p in model.parameters())
    pl = plan(cfg, 1, 1, "cpu", runtime_bytes=0)
    assert abs(pl.per_rank_params - actual) <= 0.01 * actual, (pl.per_rank_params, actual)
    assert abs(pl.total_params - actual) <= 0.01 * actual
    assert pl.params == 4 * pl.per_rank_params  # fp32 on CPU


def test_activation_model_matches_autograds_saved_tensors(megatron_single_process):
    import torch

    from recurdepth.data.tokenizer import ByteTokenizer
    from recurdepth.model.build import build_model
    from recurdepth.model.depth import BackpropWindow

    cfg = load_config(TINY, ["recurrence.sampler=fixed", "recurrence.depth=6", "recurrence.backprop_depth=4"])
    model = build_model(cfg, ByteTokenizer().vocab_size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, 256, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens, window=BackpropWindow(6, 4), sample_ids=list(range(b)))
    measured = sum(saved.values())
    estimate = stage_activations(cfg, model.vocab_size, 4, 1, 1, 2, 4, False)[0][0]
    print(f"activation model {estimate / MiB:.1f} MiB vs saved tensors {measured / MiB:.1f} MiB")
    assert abs(estimate - measured) <= 0.10 * measured, (estimate / MiB, measured / MiB)


def test_activations_do_not_depend_on_r_for_fixed_k():
    def acts(*overrides):
        return plan(load_config(HUGINN, list(overrides)), 512, 8, "h100").activations

    fixed = [acts("recurrence.sampler=fixed", f"recurrence.depth={r}") for r in (8, 16, 32, 128)]
    assert len(set(fixed)) == 1
    assert acts("recurrence.mean=4") == acts("recurrence.mean=64") == fixed[0]  # sampled r is unbounded: k counts
    assert acts("recurrence.sampler=fixed", "recurrence.depth=2") < fixed[0]  # r < k: only r iterations keep
    assert acts("recurrence.backprop_depth=4") < fixed[0] < acts("recurrence.backprop_depth=16")
    # the step time does grow with r
    slow = plan(load_config(HUGINN, ["recurrence.mean=64"]), 512, 8, "h100")
    assert slow.step_time > plan(load_config(HUGINN), 512, 8, "h100").step_time


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.tensor=2"], 8, "does not divide model.num_heads=55"),
    (["parallel.pipeline=3"], 4096, "not divisible by parallel.tensor x parallel.pipeline"),
    (["parallel.pipeline=8"], 4096, "core_layers=4 is not divisible by parallel.pipeline=8"),
    (["train.global_batch_size=1000"], 4096, "global_batch_size=1000 is not divisible"),
])
def test_impossible_layout_raises_config_error(overrides, world, message):
    cfg = load_config(HUGINN, overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan(cfg, world // 8, 8, "h100")


def test_bad_device_and_tp_across_nodes_are_config_errors():
    with pytest.raises(ConfigError, match="not a known device"):
        plan(load_config(TINY), 1, 1, "tpu")
    with pytest.raises(ConfigError, match="within a node"):
        plan(load_config(TINY, ["parallel.tensor=4", "train.global_batch_size=16"]), 2, 2, "h100")


def test_pipeline_in_flight_matches_the_schedule():
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.pipeline import build_order, max_in_flight

    for p, m, r, k in [(2, 2, 32, 8), (2, 8, 6, 4), (4, 4, 8, 8), (4, 16, 8, 2), (3, 6, 5, 3), (2, 1, 4, 4)]:
        window = BackpropWindow.of(r, k)
        orders = build_order(p, m, window)
        chunks, embedded = looped_pipeline_in_flight(p, m, window.with_grad)
        assert max_in_flight(orders) == chunks, (p, m, r, k)
        open_, most = set(), 0
        for op in orders[0]:
            if op.kind == "E":
                open_.add(op.micro_batch)
            elif op.kind == "B" and op.iteration == window.no_grad + 1:
                open_.discard(op.micro_batch)
            most = max(most, len(open_))
        assert most == embedded, (p, m, r, k)


def test_apply_overrides_validates():
    cfg = apply_overrides(load_config(TINY), ["parallel.tensor=2", "train.micro_batch_size=4"])
    assert cfg.parallel.tensor == 2 and cfg.train.micro_batch_size == 4
    with pytest.raises(ConfigError):
        apply_overrides(cfg, ["train.micro_batch_size=0"])


@pytest.mark.slow
def test_cpu_plan_is_within_15_percent_of_the_measured_peak(data_cache):
    """`recurdepth bench memory configs/tiny.yaml --depths 4 --k 4` (one process, fp32 on CPU: the process's
    resident high-water mark during one training step) against `plan --gpu cpu` for the same config."""
    out = run_cli(["bench", "memory", str(TINY), f"data.cache_dir={data_cache}", "--depths", "4", "--k", "4"],
                  timeout=600)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split() and ln.split()[0] == "4"]
    measured = float(rows[0][1]) * MiB
    cfg = load_config(TINY, ["recurrence.sampler=fixed", "recurrence.depth=4", "recurrence.backprop_depth=4"])
    pl = plan(cfg, 1, 1, "cpu")
    assert pl.fits and pl.runtime > 100 * MiB
    error = (pl.total - measured) / measured
    print(f"plan {pl.total / MiB:.1f} MiB vs measured peak {measured / MiB:.1f} MiB ({error:+.1%})")
    assert abs(error) <= 0.15

"""`recurdepth bench step|dense --quick` keep working and report consistent figures (no timing assertions)."""

import dataclasses

from recurdepth.config import load_config
from recurdepth.train.flops import dense_flops_per_token, layer_flops, looped_flops
from tests.conftest import ROOT, run_cli

BENCH = str(ROOT / "configs" / "bench.yaml")


def table(stdout: str, first: tuple) -> dict:
    return {ln.split()[0]: ln.split() for ln in stdout.splitlines() if ln.strip().startswith(first)}


def test_step_bench_quick_prints_steps_and_summary(data_cache):
    out = run_cli(["bench", "step", BENCH, f"data.cache_dir={data_cache}", "--quick"], timeout=300)
    assert "MFU = model FLOPs" in out.stdout and "bursts, median" in out.stdout and "this run's bursts" in out.stdout
    rows = table(out.stdout, ("1 ", "2 ", "best", "median"))
    assert set(rows) == {"1", "2", "best", "median"}
    step = rows["1"]
    assert step[1:3] == ["3", "2"]  # r and k of the quick shapes
    tokens, seconds, tps, gflops, mfu = (float(x.replace(",", "")) for x in step[3:8])
    assert tokens == 4 * 64 and abs(tokens / tps - seconds) <= 0.006  # seconds are printed to 0.01
    # achieved FLOP/s are the step's model FLOPs per flops.py over its time
    cfg = load_config(BENCH, ["model.hidden_size=64", "model.num_heads=4", "model.seq_length=64"])
    per_token = looped_flops(cfg, 384).per_token(3, 2)
    assert abs(gflops - tps * per_token / 1e9) <= 0.01 * gflops + 0.1
    assert 0 < mfu < 1.5 and float(step[8]) == mfu  # no recompute: HFU == MFU


def test_dense_bench_quick_compares_with_megatron_gpt(data_cache):
    out = run_cli(["bench", "dense", BENCH, f"data.cache_dir={data_cache}", "--quick"], timeout=300)
    rows = table(out.stdout, ("looped", "dense"))
    assert set(rows) == {"looped", "dense"}
    assert rows["dense"][1] == str(1 + 3 * 4 + 1)  # P + r R + C layers
    assert rows["dense"][-1] == "1.000/1.000" and float(rows["looped"][-1].split("/")[0]) > 0


def test_dense_flops_count_the_same_blocks_as_the_looped_model():
    cfg = load_config(BENCH, ["model.adapter=add"])  # no adapter: the two differ only in backprop
    looped, layers = looped_flops(cfg, 384), 1 + 8 * 4 + 1
    full_backprop = looped.per_token(8, 8)
    assert abs(dense_flops_per_token(cfg, 384, layers) - full_backprop) < 1e-6 * full_backprop
    assert layer_flops(cfg) > 0


def test_step_bench_under_torchrun_counts_the_global_batch_against_every_ranks_peak(data_cache):
    """Data parallel (2 ranks, 1 thread each): the step's tokens are the global batch's, the peak is the ranks'
    peaks summed, and the MFU column is achieved FLOP/s over that sum; one table, from rank 0."""
    import re

    out = run_cli(["bench", "step", BENCH, f"data.cache_dir={data_cache}", "--quick", "--threads", "1"], nproc=2,
                  timeout=300)
    assert out.stdout.count("MFU = model FLOPs") == 1 and "x 2 data-parallel ranks" in out.stdout
    peak = float(re.search(r"peak = sum over 2 ranks of each rank's peak \(cached or this run's, 1 threads each\): "
                           r"([\d.]+) GFLOP/s", out.stdout).group(1))
    step = table(out.stdout, ("1 ",))["1"]
    tokens, gflops, mfu = float(step[3].replace(",", "")), float(step[6]), float(step[7])
    assert tokens == 4 * 64  # the global batch (4 sequences of 64), not one rank's half
    # equal up to the printed precision: MFU to 3 decimals, GFLOP/s and the peak to 1
    assert abs(mfu - gflops / peak) <= 0.0005 + 0.05 / peak + 0.05 * gflops / peak ** 2 + 1e-9


def test_step_bench_times_the_plain_pytorch_baseline_in_the_same_run(data_cache):
    out = run_cli(["bench", "step", BENCH, f"data.cache_dir={data_cache}", "--quick"], timeout=300)
    assert "plain-PyTorch baseline" in out.stdout
    rows = {ln.split()[1]: ln.split() for ln in out.stdout.splitlines() if ln.strip().startswith("plain ")}
    assert set(rows) == {"1", "2", "best", "med."}
    for name in ("1", "2"):
        ours, plain, speed = (float(x) for x in rows[name][2:5])
        assert ours > 0 and plain > 0 and speed > 0


def test_step_bench_says_when_the_plain_baseline_lacks_an_option(data_cache):
    """An option bench/plain.py does not implement: no plain ratio (rather than a ratio against another model),
    one note line naming the option, and the bench itself still runs."""
    out = run_cli(["bench", "step", BENCH, "model.qk_norm=true", f"data.cache_dir={data_cache}", "--quick"],
                  timeout=300)
    assert "note: no plain-PyTorch baseline in this run: the plain-PyTorch baseline does not implement " \
           "model.qk_norm=True" in out.stdout
    assert "MFU = model FLOPs" in out.stdout and "plain-PyTorch baseline (bench/plain.py" not in out.stdout


def test_step_bench_times_fp32_and_bf16_interleaved_against_their_own_peaks(data_cache):
    out = run_cli(["bench", "step", "--quick", "--precisions", "fp32,bf16", BENCH, f"data.cache_dir={data_cache}"],
                  timeout=300)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] in (["fp32"], ["bf16"])
            and len(ln.split()) == 8]
    assert [(r[0], r[1]) for r in rows] == [("fp32", "1"), ("fp32", "2"), ("bf16", "1"), ("bf16", "2"),
                                            ("fp32", "med."), ("bf16", "med.")]
    by = {(r[0], r[1]): [float(x.replace(",", "")) for x in r[2:]] for r in rows}
    for step in ("1", "2"):
        (t32, _, tps32, _, _, one), (t16, _, tps16, _, mfu16, speed) = by[("fp32", step)], by[("bf16", step)]
        assert one == 1.0 and t16 == t32 == 4 * 64
        # speed = fp32 seconds / bf16 seconds of the same step = bf16 tokens/s / fp32 tokens/s (the same tokens);
        # from tokens/s, not the seconds column, whose 2 decimals of a ~0.1 s quick step are too coarse
        assert abs(speed - tps16 / tps32) <= 0.01 * speed + 0.002
        assert 0 < mfu16 <= 1.0  # against bf16's own peak, never above the hardware's (peak.mfu_peak)
    assert "bf16: peak" in out.stdout and "bfloat16 | " in out.stdout


def test_step_bench_precisions_are_checked_before_anything_is_built():
    import pytest

    from recurdepth.bench.step import parse_precisions
    from recurdepth.errors import RecurdepthError

    assert parse_precisions("fp32, bf16") == ["fp32", "bf16"]
    for bad in ("fp32", "fp32,fp32", "fp32,fp8", ""):
        with pytest.raises(RecurdepthError, match="--precisions"):
            parse_precisions(bad)


def test_step_bench_versus_times_a_router_beside_the_plain_step(data_cache):
    """--versus: the config and the config + overrides, interleaved; the router's step counts only the tokens it
    runs (flops.py's routed count), and speed is the base's time over the variant's."""
    capacity = "[1.0,0.5]"
    out = run_cli(["bench", "step", "--quick", BENCH, f"data.cache_dir={data_cache}", "--versus",
                   f"objective.kind=recursion_router objective.router_capacity={capacity}"], timeout=300)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] in (["base"], ["versus"])
            and len(ln.split()) == 8]
    assert [(r[0], r[1]) for r in rows] == [("base", "1"), ("base", "2"), ("versus", "1"), ("versus", "2"),
                                            ("base", "med."), ("versus", "med.")]
    by = {(r[0], r[1]): [float(x.replace(",", "")) for x in r[2:]] for r in rows}
    cfg = load_config(BENCH, ["model.hidden_size=64", "model.num_heads=4", "model.seq_length=64",
                              "objective.kind=recursion_router", f"objective.router_capacity={capacity}"])
    routed = looped_flops(cfg, 384)
    ratio = routed.per_token(3, 2) / dataclasses.replace(routed, router="").per_token(3, 2)
    assert 0.5 < ratio < 0.9
    for step in ("1", "2"):
        (t0, _, tps0, g0, _, one), (t1, _, tps1, g1, _, speed) = by[("base", step)], by[("versus", step)]
        assert one == 1.0 and t0 == t1 == 4 * 64
        assert abs(speed - tps1 / tps0) <= 0.01 * speed + 0.002
        assert abs(g1 / tps1 - ratio * g0 / tps0) <= 0.02 * g1 / tps1  # GFLOP per token: the routed count
    assert f"versus: {ratio:.3f}x the model FLOPs of base per step" in out.stdout

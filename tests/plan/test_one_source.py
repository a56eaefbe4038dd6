"""`recurdepth plan` restates no rule the trainer follows: the pipeline's in-flight cap and bubble are the schedule's
(recurdepth/parallel/schedule.py), the depth mean the model's (recurdepth/model/depth.py), the precision rule
recurdepth/precision.py's, the peak FLOP/s the one device table's (recurdepth/devices.py), the vocabulary the model
builder's (recurdepth/model/build.py) and the override loop the config's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recurdepth import precision
from recurdepth.config import load_config
from recurdepth.devices import ACCELERATORS, datasheet_peak_flops
from recurdepth.errors import ConfigError
from recurdepth.model import depth
from recurdepth.model.depth import BackpropWindow
from recurdepth.parallel import schedule
from recurdepth.plan import (DEVICES, apply_overrides, looped_pipeline_in_flight, max_recurrence, mean_recurrence,
                             plan, resolve_vocab_size)
from tests.conftest import ROOT, TINY

HUGINN = ROOT / "configs" / "huginn-3.5b.yaml"
CPU = ["logging.peak_tflops=1"]  # no torch.mm measurement


@pytest.mark.parametrize("p,m,r,k", [(2, 2, 32, 8), (2, 5, 6, 4), (3, 3, 4, 4), (4, 8, 8, 2), (4, 2, 3, 5),
                                     (1, 3, 4, 2)])
def test_in_flight_is_the_schedules_cap_and_build_orders_peak(p, m, r, k):
    window = BackpropWindow.of(r, k)
    chunks, _ = looped_pipeline_in_flight(p, m, window.with_grad)
    assert chunks == schedule.max_in_flight(schedule.build_order(p, m, window))
    assert chunks == [min(schedule.default_cap(p, s, window), m * window.with_grad) for s in range(p)]


def test_in_flight_and_bubble_are_read_from_the_schedule(monkeypatch):
    monkeypatch.setattr(schedule, "default_cap", lambda p, stage, window: 1)
    assert looped_pipeline_in_flight(4, 8, 3)[0] == [1, 1, 1, 1]
    monkeypatch.setattr(schedule, "expected_bubble_window", lambda p, window, m: 0.25)
    assert plan(load_config(HUGINN), 512, 8, "h100").bubble == 0.25


@pytest.mark.parametrize("overrides", [
    [], ["parallel.pipeline=4"], ["parallel.pipeline=4", "train.global_batch_size=8192"],
    ["recurrence.sampler=uniform", "recurrence.low=3", "recurrence.high=8"], ["parallel.pipeline_split=naive"],
])
def test_plan_bubble_is_the_schedules_formula(overrides):
    cfg = load_config(HUGINN, overrides)
    pl = plan(cfg, 512, 8, "h100")
    window = (BackpropWindow(1, 1) if cfg.parallel.pipeline_split == "naive"
              else BackpropWindow.of(depth.mean_depth(cfg.recurrence), cfg.recurrence.backprop_depth))
    assert pl.pp > 1 and pl.bubble == schedule.expected_bubble_window(pl.pp, window, pl.micro_batches)


@pytest.mark.parametrize("overrides", [
    [], ["recurrence.max_depth=6"], ["recurrence.mean=4", "recurrence.max_depth=20"],
    ["recurrence.sampler=fixed", "recurrence.depth=12", "recurrence.max_depth=5"],
    ["recurrence.sampler=uniform", "recurrence.low=2", "recurrence.high=30", "recurrence.max_depth=9"],
    ["recurrence.sampler=curriculum", "recurrence.max_depth=16"],
])
def test_mean_and_max_depth_are_the_models(overrides):
    cfg = load_config(HUGINN, overrides)
    pl = plan(cfg, 512, 8, "h100")
    r = cfg.recurrence
    assert mean_recurrence(cfg) == pl.r == depth.mean_depth(r)
    assert max_recurrence(cfg) == depth.max_depth(r)
    assert pl.grad_iterations == min(depth.max_depth(r), r.backprop_depth)
    if r.max_depth is not None:
        assert pl.r <= r.max_depth and pl.grad_iterations <= r.max_depth


def test_max_depth_caps_the_planned_mean():
    capped = plan(load_config(HUGINN, ["recurrence.max_depth=6"]), 512, 8, "h100")
    fixed = plan(load_config(HUGINN, ["recurrence.sampler=fixed", "recurrence.depth=6"]), 512, 8, "h100")
    assert capped.r == 6 and capped.model_flops_per_token == fixed.model_flops_per_token


def test_mean_depth_is_read_from_the_model(monkeypatch):
    monkeypatch.setattr(depth, "mean_depth", lambda rcfg: 3.0)
    assert plan(load_config(HUGINN), 512, 8, "h100").r == 3.0


@pytest.mark.parametrize("setting,gpu,dtype", [
    ("auto", "cpu", "fp32"), ("auto", "h100", "bf16"), ("bf16", "cpu", "bf16"), ("fp32", "h100", "fp32"),
])
def test_precision_is_the_trainers_rule(setting, gpu, dtype):
    cfg = load_config(TINY, [f"train.precision={setting}", *CPU])
    pl = plan(cfg, 1, 1, gpu, runtime_bytes=0)
    on_gpu = gpu != "cpu"
    assert pl.dtype == ("bf16" if precision.uses_bf16(setting, on_gpu) else "fp32") == dtype
    assert pl.params == precision.dtype_bytes(setting, on_gpu) * pl.per_rank_params


def test_precision_is_read_from_the_rule(monkeypatch):
    monkeypatch.setattr(precision, "uses_bf16", lambda setting, on_gpu: False)
    monkeypatch.setattr(precision, "dtype_bytes", lambda setting, on_gpu: 4)
    pl = plan(load_config(TINY, CPU), 1, 1, "h100", runtime_bytes=0)
    assert pl.dtype == "fp32" and pl.params == 4 * pl.per_rank_params


def test_peaks_and_capacities_are_the_one_table():
    from recurdepth.train.flops import GPU_PEAK_FLOPS

    for acc in ACCELERATORS:
        assert GPU_PEAK_FLOPS[acc.match] == acc.peak_flops
        if acc.memory_bytes is not None:
            assert (DEVICES[acc.key].peak_flops, DEVICES[acc.key].memory_bytes) == (acc.peak_flops, acc.memory_bytes)
    assert set(DEVICES) == {"h100", "h200", "a100", "cpu"}
    assert datasheet_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and datasheet_peak_flops("NVIDIA A10") == 125e12
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and datasheet_peak_flops("Tesla T4") is None
    assert plan(load_config(HUGINN), 512, 8, "h100").peak_flops == GPU_PEAK_FLOPS["H100"]


def test_vocab_size_is_the_model_builders():
    from recurdepth.data.tokenizer import ByteTokenizer
    from recurdepth.model.build import model_vocab_size

    byte = ByteTokenizer().vocab_size  # tiny.yaml's tokenizer: 264 ids
    for overrides, want in [([], 384), (["model.vocab_size=1000"], 1024), ([f"model.vocab_size={byte}"], 384),
                            (["model.vocab_size=4096"], 4096),
                            (["model.vocab_size=1000", "model.make_vocab_size_divisible_by=64"], 1024)]:
        cfg = load_config(TINY, overrides + CPU)
        assert resolve_vocab_size(cfg) == model_vocab_size(cfg, byte) == want, overrides
        assert plan(cfg, 1, 1, "cpu", runtime_bytes=0).vocab_size == want
    with pytest.raises(ConfigError, match=r"model.vocab_size=200 is smaller than the tokenizer's vocabulary \(264"):
        plan(load_config(TINY, ["model.vocab_size=200", *CPU]), 1, 1, "cpu", runtime_bytes=0)
    # huginn-3.5b.yaml sets 65536: plan and training size the same embedding, whatever the tokenizer (<= 65536)
    assert plan(load_config(HUGINN), 512, 8, "h100").vocab_size == 65536
    assert plan(load_config(HUGINN), 512, 8, "h100", vocab_size=50000).vocab_size == 65536
    with pytest.raises(ConfigError, match="smaller than the tokenizer's"):
        plan(load_config(HUGINN), 512, 8, "h100", vocab_size=70000)
    # no model.vocab_size: --vocab-size stands for the tokenizer's
    assert plan(load_config(HUGINN, ["model.vocab_size=null"]), 512, 8, "h100", vocab_size=50000).vocab_size == 50048
    # a tokenizer plan cannot read: model.vocab_size is used unchecked; without it, a ConfigError naming the fix
    missing = ["data.tokenizer=sentencepiece", "data.tokenizer_model=/nonexistent/tok.model"]
    assert resolve_vocab_size(load_config(HUGINN, missing)) == 65536
    with pytest.raises(ConfigError, match="set model.vocab_size or pass --vocab-size"):
        resolve_vocab_size(load_config(HUGINN, missing + ["model.vocab_size=null"]))


def test_overrides_are_applied_as_the_config_applies_them():
    overrides = ["parallel.tensor=2", "train.micro_batch_size=4", "recurrence.max_depth=7", "model.adapter=gate"]
    assert apply_overrides(load_config(TINY), overrides).to_dict() == load_config(TINY, overrides).to_dict()


def test_importing_plan_imports_no_torch():
    probe = "import sys, recurdepth.plan; print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr

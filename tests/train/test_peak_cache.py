"""The cached matmul peak (recurdepth/peak.py): measured once per machine, dtype and thread count, reused, only
ever raised by a better measurement, measured again when stale, and never read from a torn or foreign file."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch

from recurdepth import peak as P


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURDEPTH_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(device="cpu", dtype=None, **_):
        calls.append(device)
        flops = 100e9 + len(calls)
        return P.Peak(P.peak_key(device, dtype or torch.float32, torch.get_num_threads()), flops,
                      [flops, flops * 0.9, flops * 0.5], dt.date.today().isoformat(), torch.__version__)

    monkeypatch.setattr(P, "measure", fake_measure)
    return tmp_path, calls


def test_measured_once_then_cached_per_dtype(cache):
    path, calls = cache
    first = P.cached_peak("cpu", torch.float32)
    assert P.cached_peak("cpu", torch.float32).flops == first.flops and len(calls) == 1
    assert first.spread == pytest.approx(0.5) and first.median == pytest.approx(first.flops * 0.9)
    P.cached_peak("cpu", torch.bfloat16)  # another dtype: its own entry
    assert len(calls) == 2
    data = json.loads((path / "peak.json").read_text())
    assert len(data) == 2 and all("bfloat16" in k or "float32" in k for k in data)


def test_only_a_better_measurement_replaces_the_entry(cache):
    first = P.cached_peak("cpu", torch.float32)
    low = P.Peak(first.key, first.flops / 2, [first.flops / 2], first.date, first.torch)
    assert P.record(low).flops == first.flops  # a busy moment never lowers the peak
    high = P.Peak(first.key, first.flops * 2, [first.flops * 2], first.date, first.torch)
    assert P.record(high).flops == first.flops * 2
    assert P.cached_peak("cpu", torch.float32).flops == first.flops * 2
    assert P.record(low, refresh=True).flops == first.flops / 2  # --refresh measures afresh


def test_stale_foreign_or_torn_entries_are_measured_again(cache):
    path, calls = cache
    first = P.cached_peak("cpu", torch.float32)
    data = json.loads((path / "peak.json").read_text())
    data[first.key]["date"] = (dt.date.today() - dt.timedelta(days=P.MAX_AGE_DAYS + 1)).isoformat()
    (path / "peak.json").write_text(json.dumps(data))
    P.cached_peak("cpu", torch.float32)
    assert len(calls) == 2  # too old
    data = json.loads((path / "peak.json").read_text())
    data[first.key]["torch"] = "0.0"
    (path / "peak.json").write_text(json.dumps(data))
    P.cached_peak("cpu", torch.float32)
    assert len(calls) == 3  # another torch
    (path / "peak.json").write_text('{"half a file')
    assert P.cached_peak("cpu", torch.float32).flops > 0 and len(calls) == 4
    json.loads((path / "peak.json").read_text())  # rewritten whole


def test_a_real_measurement_has_bursts_and_a_spread():
    got = P.measure("cpu", torch.float32, bursts=3, seconds=0.01, sizes=(64, 128))
    assert len(got.samples) == 3 and got.flops == max(got.samples) > 0 and 0 <= got.spread < 1
    assert "float32" in got.key and f"{torch.get_num_threads()} threads" in got.key


def test_a_dtype_the_device_only_emulates_is_measured_in_smaller_squares(monkeypatch):
    """bf16 on an AVX2 CPU runs ~1.5 GFLOP/s per core: one 2048^3 mm would take ~10 s, so the sizes shrink until
    one mm fits in 10 bursts; at fp32's ~100 GFLOP/s they stay."""
    monkeypatch.setitem(P._probed, (str(torch.bfloat16), "cpu"), 3e9)
    monkeypatch.setitem(P._probed, (str(torch.float32), "cpu"), 110e9)
    assert P.affordable_sizes((1024, 2048), 0.2, torch.bfloat16, "cpu") == (1024,)
    assert P.affordable_sizes((1024, 2048), 0.02, torch.bfloat16, "cpu") == (512,)
    assert P.affordable_sizes((1024, 2048), 0.2, torch.float32, "cpu") == (1024, 2048)

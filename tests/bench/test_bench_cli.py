"""The benchmarks keep working (no timing assertions: figures belong in notes, not tests)."""

from tests.conftest import TINY, run_cli


def test_memory_bench_quick_prints_its_table(data_cache):
    out = run_cli(["bench", "memory", str(TINY), f"data.cache_dir={data_cache}", "--quick", "--depths", "2,6",
                   "--k", "2"], timeout=300)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["2", "6"]
    assert all(float(r[1]) > 0 for r in rows)
    # with k=2 both runs keep the same two iterations for backward
    assert abs(float(rows[1][5]) - 1.0) < 0.05


def test_data_bench_quick_prints_its_tables():
    out = run_cli(["bench", "data", "--quick"], timeout=300)
    assert "raw sp.encode, 1 process" in out.stdout and "preprocess, 2 worker(s)" in out.stdout
    mem = [ln.split() for ln in out.stdout.split("vs corpus size")[1].splitlines()[2:] if ln.strip()]
    assert [row[0] for row in mem] == ["0.5", "2"]
    assert int(mem[1][1].replace(",", "")) > 3 * int(mem[0][1].replace(",", ""))  # 4x the text, ~4x the tokens


def test_pipeline_bench_quick_prints_both_splits():
    out = run_cli(["bench", "pipeline", "--quick"], timeout=300)
    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines() if ln.startswith(("looped", "naive"))}
    assert set(rows) == {"looped", "naive"}
    assert rows["naive"][4] == "1.00" and 0 < float(rows["looped"][5]) < 0.5  # bubble from the timeline


def test_objectives_bench_quick_prints_three_variants(data_cache, tmp_path):
    out = run_cli(["bench", "objectives", "--quick", "--out", str(tmp_path / "rows.json")], timeout=300)
    names = [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith(("lm ", "quiet_star"))]
    assert names == ["lm", "quiet_star", "quiet_star"]
    import json

    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 3 and all(r["peak_bytes"] > 0 for r in (rows.values() if isinstance(rows, dict) else rows))


def test_decode_bench_quick_prints_four_variants_whose_tokens_agree(tmp_path):
    out = run_cli(["bench", "decode", "--quick", "--out", str(tmp_path / "rows.json")], timeout=300)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    variants = ["kv-cache", "exit-kl", "no-cache", "plain-naive"]
    assert [(r[0], r[1], r[2]) for r in rows] == [(d, b, v) for d in ("2", "4") for b in ("1", "2") for v in variants]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    # the cache and the plain model are checked against each other: same weights, s_0 = zeros, greedy
    assert all(r[8] == "yes" for r in rows if r[2] in ("kv-cache", "no-cache"))
    assert all(r[8] == "reference" and r[6] == "1.00" for r in rows if r[2] == "plain-naive")
    import json

    saved = json.loads((tmp_path / "rows.json").read_text())
    assert len(saved) == 16 and all(r["tokens_agree"] for r in saved if r["variant"] != "exit-kl")
    assert all(1 <= r["mean_depth"] <= r["depth"] for r in saved)


def test_objectives_bench_quick_coconut_pins_the_stage(data_cache, tmp_path):
    out = run_cli(["bench", "objectives", str(TINY.parent / "coconut.yaml"), f"data.cache_dir={data_cache}",
                   "--objective", "coconut", "--quick", "--steps", "1", "--out", str(tmp_path / "rows.json")],
                  timeout=300)
    import json

    rows = json.loads((tmp_path / "rows.json").read_text())
    names = ["lm", "coconut stage=2 c=2 + kv cache", "coconut stage=2 c=2 recompute"]
    assert [r["variant"] for r in rows] == names
    assert all(any(ln.startswith(name + " ") for ln in out.stdout.splitlines()) for name in names)
    # every measured step at stage 2: 4 latents, 5 passes per micro-batch, with and without the cache
    assert [(r.get("stage"), r.get("passes")) for r in rows] == [(None, None), ("2", 5), ("2", 5)]
    assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 for r in rows)


def test_peak_bench_quick_prints_its_bursts(tmp_path):
    out = run_cli(["bench", "peak", "--quick"], timeout=120)
    assert "best of 3 bursts" in out.stdout and "spread" in out.stdout
    assert len(out.stdout.split("bursts GFLOP/s:")[1].split()) == 3

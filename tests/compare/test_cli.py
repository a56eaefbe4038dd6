"""`recurdepth compare` at the command line: a good table writes compare.png/.csv/.json and prints one verdict
line; every kind of bad input is one `error:` line, exit 2, and no output directory. The refusals run
`recurdepth.cli.main` in this process (one CLI start costs ~20 s on a busy 2-core machine); the success case
runs the real command."""

import csv
import json
import subprocess

import numpy as np
import pytest

from recurdepth.cli import main
from tests.compare import synthetic
from tests.conftest import assert_one_error, run_cli


def in_process(args: list, capsys) -> subprocess.CompletedProcess:
    """`recurdepth ARGS` through cli.main in this process, as a CompletedProcess for assert_one_error. cli.main
    shuts torch.distributed down as it exits: here that would tear down the test session's process group (the
    session fixture megatron_single_process), and every later in-process test would fail its setup."""
    import recurdepth.distributed

    real = recurdepth.distributed.shutdown_distributed
    recurdepth.distributed.shutdown_distributed = lambda: None
    try:
        with pytest.raises(SystemExit) as exc:
            main(args)
    finally:
        recurdepth.distributed.shutdown_distributed = real
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exc.value.code, out.out, out.err)


@pytest.fixture
def good(tmp_path):
    return synthetic.write(synthetic.table(2.0, 0.01, np.random.default_rng(0)), tmp_path / "results.jsonl")


def test_compare_writes_outputs_and_one_verdict(tmp_path, good):
    out_dir = tmp_path / "out"
    out = run_cli(["compare", good, "--baseline", "dense", "--candidate", "looped", "--out", str(out_dir),
                   "--bootstrap", "200"], timeout=300)
    verdicts = [ln for ln in out.stdout.splitlines() if ln.startswith("verdict:")]
    assert len(verdicts) == 1, out.stdout
    assert "looped vs dense: compute multiplier" in verdicts[0] and "candidate better" in verdicts[0]
    assert (out_dir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out_dir / "compare.csv").open()))
    assert [int(r["rung"]) for r in rows] == [0, 1, 2, 3, 4]
    assert all(0.5 * 2 < float(r["cm_model_flops"]) < 1.5 * 2 for r in rows)
    data = json.loads((out_dir / "compare.json").read_text())
    assert data["verdict"] == verdicts[0]
    assert data["multiplier"]["model_flops"]["lo"] <= data["multiplier"]["model_flops"]["value"]


def test_default_out_dir_is_beside_the_results(tmp_path, good, capsys):
    out = in_process(["compare", str(tmp_path), "--baseline", "dense", "--candidate", "looped", "--bootstrap",
                      "30"], capsys)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "compare-dense-vs-looped" / "compare.json").exists()
    assert sum(ln.startswith("verdict:") for ln in out.stdout.splitlines()) == 1


def test_missing_file_is_one_error_line(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out = in_process(["compare", str(tmp_path / "nope.jsonl"), "--baseline", "dense", "--candidate", "looped",
                      "--out", str(out_dir)], capsys)
    assert_one_error(out, "nope.jsonl", "not found")
    assert not out_dir.exists()


def _without(rows, line, key):
    del rows[line - 1][key]
    return rows


def _set(rows, line, key, value):
    rows[line - 1][key] = value
    return rows


def _fewer_rungs(rows):
    return [r for r in rows if r["family"] != "dense" or r["rung"] < 2]


BAD = {
    "directory without results": (None, ["without results.jsonl"]),
    "unknown family": (lambda rows: rows, ["'loopd' is not a family", "families present: dense, looped"]),
    "mixed tokenizers": (lambda rows: _set(rows, 4, "tokenizer", "tok-v2"), ["'tok-v1' (line 1)", "'tok-v2' (line 4)"]),
    "mixed datasets": (lambda rows: _set(rows, 12, "dataset", "web-v2"), ["'data-v1' (line 1)", "'web-v2' (line 12)"]),
    "two baseline rungs": (_fewer_rungs, ["'dense' has 2 distinct model_flops", "at least 3"]),
    "missing key": (lambda rows: _without(rows, 3, "seed"), ["line 3", "missing key 'seed'"]),
    "bad value": (lambda rows: _set(rows, 5, "final_val_loss", "nan"), ["line 5", "final_val_loss='nan'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    edit, needles = BAD[case]
    target = tmp_path / "sweep"
    target.mkdir()
    if edit is not None:
        rows = edit(synthetic.table(1.0, 0.01, np.random.default_rng(0)))
        synthetic.write(rows, target / "results.jsonl")
    candidate = "loopd" if case == "unknown family" else "looped"
    out_dir = tmp_path / "out"
    out = in_process(["compare", str(target), "--baseline", "dense", "--candidate", candidate, "--out",
                      str(out_dir), "--bootstrap", "20"], capsys)
    assert_one_error(out, *needles)
    assert not out_dir.exists() and not (target / f"compare-dense-vs-{candidate}").exists()


def test_line_that_is_not_json(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text('{"family": "dense"}\n{oops\n')
    out = in_process(["compare", str(path), "--baseline", "dense", "--candidate", "looped"], capsys)
    assert_one_error(out, "line 1", "missing key 'seed'")
    path.write_text(json.dumps(synthetic.table(1.0, 0.0, np.random.default_rng(0))[0]) + "\n{oops\n")
    out = in_process(["compare", str(path), "--baseline", "dense", "--candidate", "looped"], capsys)
    assert_one_error(out, "line 2 is not JSON")
    assert not (tmp_path / "compare-dense-vs-looped").exists()

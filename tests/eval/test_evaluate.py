"""The depth sweep on a tiny model (tables, plot, TensorBoard), and the CLI's refusals (one `error:` line, exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from recurdepth.infer.decoder import DecodeOptions
from recurdepth.infer.evaluate import TaskSet, harder, parse_depths, run_eval, task_accuracy, write_outputs
from tests.conftest import run_cli

SMALL_MODEL = ["model.hidden_size=32", "model.num_heads=4", "model.seq_length=64", "model.prelude_layers=1",
               "model.core_layers=1", "model.coda_layers=1"]


@pytest.fixture(scope="module")
def tiny(megatron_single_process):
    from recurdepth.data.procedural import generate_split
    from recurdepth.data.tokenizer import ByteTokenizer
    from recurdepth.infer.loading import LoadedModel
    from recurdepth.model.build import build_model

    cfg = load_config(None, SMALL_MODEL)
    tok = ByteTokenizer()
    model = build_model(cfg, tok.vocab_size).eval()
    sets = [TaskSet("parity", {"min_len": 4, "max_len": 5}, "parity", generate_split("parity", 6, "test")),
            TaskSet("addition", {}, "addition", generate_split("addition", 6, "test"))]
    return LoadedModel(model, cfg, tok, Path("ckpt"), tok.vocab_size), sets


def test_depth_sweep_writes_tables_plot_and_tensorboard(tiny, tmp_path):
    loaded, sets = tiny
    rows = run_eval(loaded, [1, 2], sets, DecodeOptions(), valid_samples=0)
    assert [(r.depth, r.task) for r in rows] == [(1, "parity"), (1, "addition"), (2, "parity"), (2, "addition")]
    assert all(0.0 <= r.value <= 1.0 and r.n == 6 and r.mean_depth == r.depth for r in rows)
    written = write_outputs(rows, tmp_path, "tiny", {"depths": [1, 2]})
    assert json.loads(written["json"].read_text())["rows"][0]["metric"] == "accuracy"
    assert written["csv"].read_text().splitlines()[0] == "depth,metric,task,value,n,mean_depth"
    assert written["png"].read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in written["tensorboard"].iterdir())


def test_an_exit_rule_writes_the_exit_histogram_and_the_compute_curve(tiny, tmp_path):
    """With --exit-kl the histogram counts every generated token once, at the depth it used, and the compute
    curve's mean iterations are the histogram's mean."""
    import csv

    loaded, sets = tiny
    exit_rows = []
    rows = run_eval(loaded, [4], sets, DecodeOptions(exit_kl=1e-3), valid_samples=0, exit_rows=exit_rows)
    written = write_outputs(rows, tmp_path, "tiny", {"depths": [4]}, exit_rows)
    assert {e["task"] for e in exit_rows} == {"parity", "addition"}
    assert all(1 <= e["exit_depth"] <= 4 for e in exit_rows)
    for r in rows:
        mine = [e for e in exit_rows if e["task"] == r.task]
        mean = sum(e["exit_depth"] * e["tokens"] for e in mine) / sum(e["tokens"] for e in mine)
        assert abs(mean - r.mean_depth) < 1e-9
    compute = list(csv.DictReader(written["compute_csv"].open()))
    assert [(c["task"], float(c["mean_iterations"])) for c in compute] == [(r.task, r.mean_depth) for r in rows]
    assert written["exit_csv"].read_text().splitlines()[0] == "depth,task,exit_depth,tokens"
    assert written["compute_png"].read_bytes()[:4] == b"\x89PNG"


def test_accuracy_is_scored_by_the_verifier(tiny, monkeypatch):
    """A model that always answers correctly scores 1, one that answers wrongly 0."""
    import recurdepth.infer.evaluate as ev
    from recurdepth.infer.generate import GenerateResult

    loaded, sets = tiny
    tok = loaded.tokenizer
    answers = {}

    def fake_generate(model, prompt, max_new, options, eod, vocab_size=None):
        rows = []
        for ids in prompt.tolist():
            text = tok.detokenize(ids[1:])
            rows.append(tok.tokenize(answers[text.strip()]) + [eod])
        width = max(map(len, rows))
        tokens = torch.tensor([r + [eod] * (width - len(r)) for r in rows])
        return GenerateResult(tokens, torch.ones_like(tokens), 1.0)

    monkeypatch.setattr(ev, "generate", fake_generate)
    answers.update({s.prompt.strip(): s.answer for s in sets[1].samples})
    assert task_accuracy(loaded, sets[1].samples, DecodeOptions())[0] == 1.0
    answers.update({s.prompt.strip(): str(int(s.answer) + 1) for s in sets[1].samples})
    assert task_accuracy(loaded, sets[1].samples, DecodeOptions())[0] == 0.0


def test_depths_and_harder_difficulty():
    assert parse_depths("8,1,2,2") == [1, 2, 8]
    for bad in ("0,1", "-2", "a,b", ""):
        with pytest.raises(ConfigError, match="depth"):
            parse_depths(bad)
    assert harder({"min_digits": 1, "max_digits": 3}) == {"min_digits": 4, "max_digits": 4}
    assert harder({"min_len": 4, "max_len": 12, "vocab": 3}) == {"min_len": 13, "max_len": 15, "vocab": 3}


def test_default_sets_of_a_multi_question_task_ask_one_question_per_prompt():
    from recurdepth.infer.evaluate import task_sets

    cfg = load_config("configs/depth-sweep.yaml", ["data.sources=[{procedural: root, n: 500, difficulty: "
                                                   "{min_depth: 1, max_depth: 3, nodes: 12, trees: 2, questions: 6}}]"])
    train, hard = task_sets(cfg, None, 40, 0)
    assert train.difficulty["questions"] == hard.difficulty["questions"] == 1
    assert (train.difficulty["min_depth"], train.difficulty["max_depth"]) == (1, 3)
    assert (hard.difficulty["min_depth"], hard.difficulty["max_depth"]) == (4, 4)  # deeper than any training question
    for ts in (train, hard):
        assert len(ts.samples) == 40 and all(len(s.answer) == 1 for s in ts.samples)


@pytest.fixture(scope="module")
def checkpoints(megatron_single_process, tmp_path_factory):
    """A plain (non-Huginn) checkpoint and one whose sentencepiece tokenizer is gone."""
    from recurdepth.export.cli import write_checkpoint
    from recurdepth.model.build import build_model

    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(None, SMALL_MODEL)
    write_checkpoint(cfg, build_model(cfg, 264), root / "plain", 264)
    cfg = load_config(None, SMALL_MODEL + ["data.tokenizer=sentencepiece", f"data.tokenizer_model={root}/gone.model"])
    write_checkpoint(cfg, build_model(cfg, 264), root / "no-tokenizer", 264)
    cfg = load_config(None, SMALL_MODEL + ["objective.kind=exit_gate"])
    write_checkpoint(cfg, build_model(cfg, 264), root / "gated", 264)
    cfg = load_config(None, SMALL_MODEL + ["objective.kind=recursion_router", "recurrence.sampler=fixed",
                                           "recurrence.depth=4"])
    write_checkpoint(cfg, build_model(cfg, 264), root / "routed", 264)
    cfg = load_config(None, SMALL_MODEL + ["objective.kind=depth_by_size", "recurrence.sampler=fixed",
                                           "data.sources=[{procedural: hops, n: 50}]"])
    write_checkpoint(cfg, build_model(cfg, 264), root / "sized", 264)
    (root / "foreign").mkdir()
    (root / "foreign" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


@pytest.mark.parametrize("call,error", [
    (lambda root: __import__("recurdepth.infer.loading", fromlist=["x"]).load_model(root / "foreign"),
     "not a recurdepth checkpoint"),
    (lambda root: __import__("recurdepth.export.cli", fromlist=["x"]).import_checkpoint(root / "foreign", root / "o"),
     "llama"),
    (lambda root: __import__("recurdepth.infer.loading", fromlist=["x"]).load_model(root / "no-tokenizer"),
     "tokenizer"),
    (lambda root: __import__("recurdepth.export.cli", fromlist=["x"]).export_checkpoint(root / "plain", root / "hf"),
     "model.norm_before_coda"),
])
def test_bad_input_raises_a_one_line_error(checkpoints, call, error):
    from recurdepth.errors import RecurdepthError

    with pytest.raises(RecurdepthError, match=error) as info:
        call(checkpoints)
    assert "\n" not in str(info.value)
    assert not (checkpoints / "hf").exists() and not (checkpoints / "o").exists()  # nothing written


@pytest.mark.parametrize("args,message", [
    (["eval", "{root}/plain", "--depths", "0,4"], "depth"),
    (["export", "{root}/plain", "{root}/hf"], "model.norm_before_coda"),
    (["generate", "{root}/plain", "--prompt", "a", "--exit-gate", "0.5"], "trained with objective.kind=exit_gate"),
    (["generate", "{root}/gated", "--prompt", "a", "--exit-gate", "1.5"], "threshold q in (0, 1]"),
    (["generate", "{root}/plain", "--prompt", "a", "--depth", "4", "--exit-router"],
     "trained with objective.kind=recursion_router"),
    (["eval", "{root}/routed", "--depths", "2,6", "--exit-router"], "trained for at most 4 iterations"),
    (["generate", "{root}/routed", "--prompt", "a", "--exit-router"], "give --depth N"),
    (["generate", "{root}/routed", "--prompt", "a", "--depth", "4", "--exit-router", "--exit-kl", "0.1"],
     "give one exit rule"),
    (["eval", "{root}/plain", "--depth-by-size", "--task", "hops"], "trained with objective.kind=depth_by_size"),
    (["eval", "{root}/sized", "--depth-by-size", "--exit-kl", "0.1", "--task", "hops"], "does not combine"),
])
def test_cli_prints_one_error_line_and_exits_2(checkpoints, args, message):
    out = run_cli([a.format(root=checkpoints) for a in args], check=False, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]


def test_generate_with_the_gate_exit_reports_its_mean_depth(checkpoints):
    out = run_cli(["generate", str(checkpoints / "gated"), "--prompt", "ab", "--exit-gate", "0.5", "--max-depth", "6",
                   "--max-new-tokens", "4"], timeout=120)
    tail = out.stdout.strip().splitlines()[-1]
    assert "exit-gate 0.5 (max 6)" in tail
    mean = float(tail.split("mean depth ")[1].rstrip("]"))
    assert 1 <= mean < 6  # lambda = 1/2 at init: the exit CDF reaches 0.5 after the first iteration


def test_generate_with_the_router_routes_and_says_so_without_it(checkpoints):
    routed = run_cli(["generate", str(checkpoints / "routed"), "--prompt", "ab", "--depth", "4", "--exit-router",
                      "--max-new-tokens", "4"], timeout=120)
    tail = routed.stdout.strip().splitlines()[-1]
    assert "exit-router (max 4)" in tail and "recursion_router" not in routed.stderr
    assert 0 <= float(tail.split("mean depth ")[1].rstrip("]")) <= 4
    plain = run_cli(["generate", str(checkpoints / "routed"), "--prompt", "ab", "--depth", "4", "--max-new-tokens",
                     "4"], timeout=120)
    assert "mean depth 4.00" in plain.stdout and "without --exit-router every token runs every iteration" in plain.stderr


def test_depth_by_size_scores_each_problem_at_its_sizes_r(tiny):
    """Every problem at r = depth_offset + depth_scale x size: a set of one size scores as that r does; a set of
    several sizes as the sizes' fixed-depth scores weighted by their counts, with their mean r."""
    from recurdepth.data.procedural import generate_split

    loaded, _ = tiny
    rule = lambda n: n + 1  # noqa: E731 - depth_offset 1, depth_scale 1
    one = [TaskSet("hops", {}, "hops k=2", generate_split("hops", 8, "test", {"min_hops": 2, "max_hops": 2}))]
    rows = run_eval(loaded, [3], one, DecodeOptions(), valid_samples=0, by_size=rule)
    fixed, by_size = [r for r in rows if r.metric == "accuracy"]
    assert (fixed.depth, by_size.depth, by_size.mean_depth) == (3, 0, 3.0) and by_size.value == fixed.value
    mixed = generate_split("hops", 12, "test", {"min_hops": 1, "max_hops": 3})
    rows = run_eval(loaded, [], [TaskSet("hops", {}, "hops", mixed)], DecodeOptions(), valid_samples=0, by_size=rule)
    from recurdepth.data.procedural import get_task

    sizes = [get_task("hops").size(x.prompt) for x in mixed]
    expect = sum(task_accuracy(loaded, [x for x, n in zip(mixed, sizes) if n == k],
                               DecodeOptions(depth=k + 1))[0] * sizes.count(k) for k in set(sizes)) / len(mixed)
    assert rows[0].value == pytest.approx(expect, abs=1e-12)
    assert rows[0].mean_depth == pytest.approx(sum(n + 1 for n in sizes) / len(sizes))

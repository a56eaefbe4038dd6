"""Small and odd corpora: a split that leaves validation (or training) without documents, one long document, a
run that would repeat its corpus a million times, and a dataset without a manifest whose ids the tokenizer lacks.
Each is refused with one `error:` line (exit 2, nothing written) or, when the run does not validate, trains
without a validation split after one warning -- never a hang (every run below has a timeout that fails it)."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager

import numpy as np
import pytest

from recurdepth.data.preprocess import preprocess
from recurdepth.errors import DataError
from tests.conftest import SMALL, TINY, assert_one_error, run_cli
from tests.snapshot import assert_unchanged, tree_snapshot

RUN = SMALL + ["train.steps=2", "checkpoint.interval=0", "checkpoint.save_final=false"]


def stderr_lines(out) -> list[str]:
    """stderr without python's warnings (megatron's import-time UserWarnings)."""
    return [ln for ln in out.stderr.splitlines()
            if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]


def corpus(root, name, docs: list[str]) -> str:
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = root / name
    preprocess(src, prefix, "byte", workers=1, progress=False)
    src.unlink()
    return str(prefix)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-corpora")
    return root, {
        "twenty": corpus(root, "twenty", [f"document {i}: " + "some words here " * 20 for i in range(20)]),
        "one": corpus(root, "one", ["one long document, never split. " * 3000]),
    }


def train(tmp_path, prefix, *extra, timeout=150):
    run_dir = tmp_path / "run"
    return run_cli(["train", str(TINY), *RUN, f"data.sources=[{{path: {prefix}}}]", f"data.cache_dir={tmp_path}/cache",
                    f"train.run_dir={run_dir}", *extra], check=False, timeout=timeout), run_dir


@pytest.mark.parametrize("name,docs", [("twenty", 20), ("one", 1)])
def test_empty_validation_split_is_refused_when_the_run_validates(corpora, tmp_path, name, docs):
    """b03f592: megatron's _get_num_epochs looped forever on the empty validation split, printing nothing."""
    root, prefixes = corpora
    before, before_corpus = tree_snapshot(tmp_path), tree_snapshot(root)
    out, run_dir = train(tmp_path, prefixes[name], "train.eval_interval=1", timeout=90)
    line = assert_one_error(out, f"leaves 0 of {docs} documents of {prefixes[name]} for validation",
                            "data.split=98,2,0", "train.eval_interval=0")
    if docs == 20:
        assert "data.split=95,5,0" in line and "at least 25 documents" in line
    assert_unchanged(before, tmp_path)  # no run dir, no cache
    assert_unchanged(before_corpus, root)


def test_empty_validation_split_is_dropped_with_a_warning_when_unused(corpora, tmp_path):
    """eval_interval=0 does not read the validation split: the run trains, after one warning line."""
    _, prefixes = corpora
    out, run_dir = train(tmp_path, prefixes["one"], "train.eval_interval=0")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = stderr_lines(out)
    assert lines == [lines[0]] and lines[0].startswith("warning: data.split=98,2,0 leaves 0 of 1 documents"), lines
    assert "done: 2 steps" in out.stdout


@contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging CI) when the block runs longer than `seconds`: megatron's epoch count is a
    plain Python loop, so the alarm interrupts it."""
    def expired(signum, frame):
        raise TimeoutError(f"still building datasets after {seconds} s: megatron is counting epochs forever")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def plan_error(tmp_path, prefix, *overrides, samples=(16, 16)) -> str:
    """build_datasets' refusal in-process (it comes before megatron builds anything)."""
    from recurdepth.config import load_config
    from recurdepth.data.pipeline import build_datasets

    cfg = load_config(TINY, [*SMALL, f"data.sources=[{{path: {prefix}}}]", f"data.cache_dir={tmp_path}/cache",
                             *overrides])
    before = tree_snapshot(tmp_path)
    with pytest.raises(DataError) as err, deadline(60):
        build_datasets(cfg, *samples)
    assert_unchanged(before, tmp_path)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["data.split=abc"], "data.split=abc is not a split"),
    (["data.split=90,-10,0"], "is not a split"),
    (["data.split=0,100,0"], "gives training no documents"),
    (["data.split=1,99,0"], "leaves 0 of 20 documents of"),  # training's share rounds to no document
    (["data.split=100,0,0", "train.eval_interval=5"], "gives validation no documents but train.eval_interval=5"),
])
def test_splits_that_leave_a_needed_part_empty_are_refused(corpora, tmp_path, overrides, needle):
    _, prefixes = corpora
    assert needle in plan_error(tmp_path, prefixes["twenty"], *overrides)


def test_a_run_that_would_repeat_its_corpus_a_million_times_is_refused(corpora, tmp_path):
    """The bound on dataset building: megatron counts epochs one by one (and then indexes them all)."""
    _, prefixes = corpora
    msg = plan_error(tmp_path, prefixes["twenty"], "train.eval_interval=0", samples=(200_000_000, 0))
    assert "would be repeated" in msg and "fewer train.steps" in msg


def test_manifestless_dataset_with_ids_beyond_the_vocabulary_is_refused_by_train_and_check(tmp_path):
    """b03f592: `data check` refused it (no manifest), `train` crashed in the embedding with a traceback."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    data = tmp_path / "data"
    data.mkdir()
    builder = IndexedDatasetBuilder(str(data / "foreign.bin"), dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_document(rng.integers(0, 1000, 100).astype(np.uint16), [100])
    builder.finalize(str(data / "foreign.idx"))
    before = tree_snapshot(tmp_path)
    out, run_dir = train(tmp_path, data / "foreign", "train.eval_interval=0", timeout=120)
    line = assert_one_error(out, "holds token id 999", "the tokenizer has 264 ids", "no manifest")
    assert_unchanged(before, tmp_path)
    check = run_cli(["data", "check", str(data / "foreign"), "--tokenizer", "byte"], check=False, timeout=60)
    assert assert_one_error(check) == line  # the same line from both commands
    assert_unchanged(before, tmp_path)

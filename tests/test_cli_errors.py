"""Bad input at the command line: one `error: ...` line, exit status 2, no traceback, nothing written."""

import pytest

from tests.conftest import TINY, run_cli


@pytest.mark.parametrize("args,needle", [
    ([str(TINY), "model.hiden_size=64"], "did you mean model.hidden_size?"),
    ([str(TINY), "train.steps=ten"], "expected an integer"),
    (["configs/does-not-exist.yaml"], "not found"),
    ([str(TINY), "recurrence.backprop_depth=0"], "k must be >= 1"),
    ([str(TINY), "model.core_layers=0"], "at least 1 core layer"),
    ([str(TINY), "parallel.tensor=3"], "not divisible by parallel.tensor x parallel.pipeline"),
    ([str(TINY), "data.sources=[{procedural: 'rg:no_such_task'}]"], "no_such_task"),
    ([str(TINY), "data.sources=[{path: /nonexistent/corpus}]"], "run `recurdepth data preprocess`"),
    ([str(TINY), "data.sources=[{builtin: stdlib-docs, weight: -2}]"], "use a number >= 0"),
    ([str(TINY), "data.split=abc"], "data.split=abc is not a split"),
    ([str(TINY), "data.split=100,0,0"], "gives validation no documents but train.eval_interval=100 validates"),
    # 20 samples: 98,2,0 leaves validation none, and b03f592 hung in megatron's epoch count (the timeout fails it)
    ([str(TINY), "data.sources=[{procedural: sort, n: 20}]"], "leaves 0 of 20 documents of procedural sort"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    out = run_cli(["train", *args, f"train.run_dir={run_dir}"], check=False, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists()

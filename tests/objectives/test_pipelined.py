"""`pipelined_forward` / `StageLink`: multi-pass logic written once gives, over PP=2 and 4 (torchrun/gloo), the loss
and every parameter gradient that the same code gives on one process (float64, 1e-10): a plain LM pass with
truncated backprop, hidden states fed back from the last stage into stage 0's input embeddings across passes
(gradients flow through the feedback), token ids chosen on the last stage and shared, and forward only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.objectives import _pipelined_worker as worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIED = ("output_layer.weight", "embedding.word_embeddings.weight")  # the last stage's copy of the embedding


@pytest.fixture(scope="module")
def reference(megatron_single_process):
    from recurdepth.model.build import build_model

    model = build_model(worker.config(1), worker.VOCAB, params_dtype=torch.float64)
    out = {name: worker.run_case(model, name) for name in worker.CASES}
    out["eval:lm-r3k2"] = worker.run_case(model, "lm-r3k2", grad=False)
    return out


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """The worker's results over P stages (one torchrun per P, on first use): a list of per-rank dicts."""
    cache = {}

    def get(p: int):
        if p not in cache:
            out = tmp_path_factory.mktemp(f"pipelined-pp{p}")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={p}", os.path.join(REPO, "tests", "objectives",
                                                                         "_pipelined_worker.py"), str(out)],
                                  capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            cache[p] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(p)]
        return cache[p]

    return get


def merged_grads(ranks: list, case: str) -> dict:
    grads = {}
    for rank in ranks:
        for name, g in rank[case]["grads"].items():
            name = TIED[1] if name == TIED[0] else name
            grads[name] = grads[name] + g if name in grads else g
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 4])  # 4: stages in the middle receive and send within an iteration
@pytest.mark.parametrize("case", [*worker.CASES, "eval:lm-r3k2"])
def test_pipeline_equals_one_process(reference, pipelined, case, p):
    ranks, ref = pipelined(p), reference[case]
    assert all(rank[case]["loss"] is None for rank in ranks[:-1])  # only the last stage has the loss
    torch.testing.assert_close(ranks[-1][case]["loss"], ref["loss"], rtol=1e-10, atol=0)
    assert all(rank[case]["passes"] == ref["passes"] for rank in ranks)
    grads = merged_grads(ranks, case)
    assert grads.keys() == ref["grads"].keys()
    if not case.startswith("eval"):
        assert len(grads) > 10
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=f"{case}: gradient of {name}")
    for key, value in ref["extra"].items():
        mine = ranks[-1][case]["extra"][key]
        assert mine == pytest.approx(value, rel=1e-9) if isinstance(value, float) else torch.equal(mine, value)


def test_feedback_carries_gradient_into_the_fed_back_hidden_state(reference):
    """The check above could pass with the feedback cut (both sides the same); this one could not."""
    assert reference["feedback-r2k2"]["extra"]["first_hidden_grad"] > 0
    assert reference["feedback-r3k1"]["extra"]["first_hidden_grad"] > 0
    assert reference["feedback-r2k2"]["passes"] == 3

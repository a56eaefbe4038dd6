"""Tests for recurdepth.compat.megatron_cpu (megatron-core on CPU/gloo).

Fast tests run in this process. The slow ones launch tests/compat/_cpu_worker.py with torchrun
and compare what the workers write with single-process results:

  launch                          compared with
  2 procs: tp (TP=2), dp (DP=2)   1 proc: tp (TP=1), dp (DP=1)             test_tp2_*, test_dp2_*
  (dp saves a dist checkpoint)    1 proc: load (DP=1) of the DP=2 checkpoint  test_dist_checkpoint_*
  2 procs: pp (PP=2), moe (EP=2)  PP=1 / EP=1 references computed in the same workers
"""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from recurdepth.compat import megatron_cpu as mc
from recurdepth.compat.megatron_cpu import (
    TESTED_MEGATRON_VERSIONS,
    CompatError,
    apply_cpu_compat,
    is_applied,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "compat", "_cpu_worker.py")
TIMEOUT_S = 240

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA present: apply_cpu_compat() patches nothing"
)


# --------------------------------------------------------------------------------------------
# fast, in-process


def _patched_objects():
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    dist_opt = distrib_optimizer.DistributedOptimizer
    return {
        "cuda.current_device": torch.cuda.current_device,
        "cuda.get_rng_state": torch.cuda.get_rng_state,
        "Tensor.cuda": torch.Tensor.cuda,
        "optimizer.torch": optimizer.torch,
        "DistributedOptimizer.sharded_state_dict": dist_opt.sharded_state_dict,
        "DistributedOptimizer.load_state_dict": dist_opt.load_state_dict,
        "maybe_move_tensor_to_cpu": token_dispatcher.maybe_move_tensor_to_cpu,
        "rng log filters": tuple(logging.getLogger("megatron.core.tensor_parallel.random").filters),
    }


@cpu_only
def test_apply_is_idempotent(monkeypatch):
    assert apply_cpu_compat() is True
    assert is_applied()
    first = _patched_objects()
    assert apply_cpu_compat() is True
    assert _patched_objects() == first
    # Even a full re-application (state reset) neither double-wraps nor adds filters.
    monkeypatch.setattr(mc, "_APPLIED", False)
    assert apply_cpu_compat() is True
    assert _patched_objects() == first


@cpu_only
def test_cuda_literals_are_mapped_only_inside_megatron():
    import megatron.core.optimizer.optimizer as optimizer

    apply_cpu_compat()
    t = optimizer.torch.tensor([1.0], dtype=torch.float, device="cuda")  # as megatron writes it
    assert t.device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):  # the real torch is left alone
        torch.zeros(1, device="cuda")
    # Tensor.type() checks in the optimizers now name CPU tensors.
    consts = optimizer.Float16OptimizerWithFloat16Params.__init__.__code__.co_consts
    assert "torch.FloatTensor" in consts and "torch.cuda.FloatTensor" not in consts


def test_apply_returns_false_with_cuda(monkeypatch):
    monkeypatch.setattr(mc, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_compat() is False
    assert not is_applied()


def test_untested_version_is_refused(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(mc, "_APPLIED", False)
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    monkeypatch.delenv("RECURDEPTH_ALLOW_UNTESTED_MEGATRON", raising=False)
    with pytest.raises(CompatError) as err:
        apply_cpu_compat(force=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "0.99.0" in msg and all(v in msg for v in TESTED_MEGATRON_VERSIONS)
    assert "RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1" in msg
    assert not is_applied()

    monkeypatch.setenv("RECURDEPTH_ALLOW_UNTESTED_MEGATRON", "1")
    with pytest.warns(RuntimeWarning, match="0.99.0"):
        mc._check_megatron_version()


@cpu_only
def test_cuda_rng_api_is_the_cpu_generator():
    apply_cpu_compat()
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    a = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), a)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), a)


def _seed_tracker(seed=1234):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)
    return tensor_parallel.get_cuda_rng_tracker()


@cpu_only
def test_rng_tracker_fork_is_deterministic_and_restorable():
    apply_cpu_compat()
    tracker = _seed_tracker()
    saved_tracker = {k: v.clone() for k, v in tracker.get_states().items()}
    saved_default = torch.get_rng_state()

    with tracker.fork():
        forked = torch.rand(6)
    after = torch.rand(6)
    torch.set_rng_state(saved_default)
    assert torch.equal(torch.rand(6), after), "fork() must leave the default stream untouched"
    assert not torch.equal(forked, after), "the forked stream must differ from the default one"

    with tracker.fork():  # the tracked stream advanced
        assert not torch.equal(torch.rand(6), forked)
    tracker.set_states({k: v.clone() for k, v in saved_tracker.items()})
    with tracker.fork():  # restored state: exact replay
        assert torch.equal(torch.rand(6), forked)
    reseeded = _seed_tracker().get_states()  # same seed, same streams
    assert all(torch.equal(reseeded[k], v) for k, v in saved_tracker.items())


@cpu_only
def test_activation_checkpointing_replays_dropout():
    """tensor_parallel.checkpoint recomputes in backward after restoring the RNG states it saved;
    with no-op RNG get/set the dropout masks differ and so do the gradients."""
    from megatron.core import tensor_parallel

    apply_cpu_compat()

    def block(x):
        y = torch.nn.functional.dropout(x * 2.0, p=0.5)  # default (data-parallel) stream
        with tensor_parallel.get_cuda_rng_tracker().fork():  # model-parallel stream
            return torch.nn.functional.dropout(torch.tanh(y), p=0.5)

    x0 = torch.randn(64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(64, generator=torch.Generator().manual_seed(1))
    grads = []
    for use_checkpoint in (False, True):
        _seed_tracker()
        x = x0.clone().requires_grad_()
        out = tensor_parallel.checkpoint(block, False, x) if use_checkpoint else block(x)
        (out * w).sum().backward()
        grads.append(x.grad)
    assert grads[0].count_nonzero() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# slow, torchrun


def _torchrun(nproc, cases, outdir, *extra):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), WORKER, ",".join(cases), str(outdir), *map(str, extra),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # own session, so that a timeout can end torchrun together with its workers
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {cases} timed out after {TIMEOUT_S}s:\n{out[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {cases} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return {case: torch.load(os.path.join(outdir, f"{case}.pt")) for case in cases}


@pytest.fixture(scope="module")
def tp_dp_runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("two_procs")
    one = tmp_path_factory.mktemp("one_proc")
    results = {"two": _torchrun(2, ["tp", "dp"], two)}
    results["one"] = _torchrun(1, ["tp", "dp", "load"], one, two / "ckpt")
    return results


def _assert_losses(got, want, rel=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=rel), (got, want)


def _assert_tensors(got: dict, want: dict, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{name}: {m}", **tol)


@cpu_only
@pytest.mark.slow
def test_dp2_distributed_optimizer_matches_one_process(tp_dp_runs):
    two, one = tp_dp_runs["two"]["dp"], tp_dp_runs["one"]["dp"]
    for mode in ("sync", "overlap"):  # overlap_grad_reduce False / True
        _assert_losses(two[mode]["losses"][:3], one[mode]["losses"][:3])
        _assert_tensors(two[mode]["params"], one[mode]["params"], rtol=1e-5, atol=1e-6)
    # the optimizer really moved the parameters (else equal params would prove nothing)
    start, end = one["params_at_ckpt"], one["sync"]["params"]
    assert max((end[k] - start[k]).abs().max() for k in start) > 1e-3


@cpu_only
@pytest.mark.slow
def test_dist_checkpoint_dp2_save_loads_in_one_process(tp_dp_runs):
    saved, resumed = tp_dp_runs["two"]["dp"], tp_dp_runs["one"]["load"]
    uninterrupted = saved["sync"]
    _assert_tensors(resumed["loaded_params"], saved["params_at_ckpt"], rtol=0, atol=0)
    # step 3 depends on the params, step 4 and the final params also on Adam's state and step
    _assert_losses(resumed["losses"], uninterrupted["losses"][2:])
    _assert_tensors(resumed["params"], uninterrupted["params"], rtol=1e-5, atol=1e-6)
    one_process = tp_dp_runs["one"]["dp"]["sync"]
    _assert_tensors(resumed["params"], one_process["params"], rtol=1e-5, atol=1e-6)


@cpu_only
@pytest.mark.slow
def test_tp2_layers_match_tp1(tp_dp_runs):
    tp2, tp1 = tp_dp_runs["two"]["tp"], tp_dp_runs["one"]["tp"]
    assert tp2["loss"] == pytest.approx(tp1["loss"], rel=1e-6)
    _assert_tensors(tp2["params"], tp1["params"], rtol=0, atol=0)  # CPU init is TP-invariant
    _assert_tensors(tp2["grads"], tp1["grads"], rtol=1e-5, atol=1e-7)
    assert all(g.abs().max() > 0 for g in tp1["grads"].values())


@cpu_only
@pytest.mark.slow
def test_pp2_and_moe_ep2_match_single_process(tmp_path):
    res = _torchrun(2, ["pp", "moe"], tmp_path)

    pp = res["pp"]  # 1F1B over 2 stages vs the whole stack in one process
    assert len(pp["losses"]) == 4
    _assert_losses(pp["losses"], pp["ref_losses"])
    assert pp["grads"].keys() == pp["ref_grads"].keys() == {0, 1, 2, 3}
    for layer in pp["ref_grads"]:
        for got, want in zip(pp["grads"][layer], pp["ref_grads"][layer]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    experts_seen = set()
    for per_rank in res["moe"]:  # EP=2 (both dispatchers) vs EP=1 with the same weights
        ref_loss, ref_router, ref_experts, ref_xgrad = per_rank["ref"]
        for dispatcher in ("alltoall", "allgather"):
            loss, router, experts, xgrad = per_rank[dispatcher]
            assert loss == pytest.approx(ref_loss, rel=1e-6), dispatcher
            torch.testing.assert_close(router, ref_router, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(xgrad, ref_xgrad, rtol=1e-5, atol=1e-7)
            assert len(experts) == 2  # 4 experts over EP=2
            for e, grads in experts.items():
                for got, want in zip(grads, ref_experts[e]):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            experts_seen |= set(experts)
        assert per_rank["alltoall"][0] == per_rank["allgather"][0]
    assert experts_seen == {0, 1, 2, 3}

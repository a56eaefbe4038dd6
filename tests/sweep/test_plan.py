"""The sweep's plan, in process: runs sized to their budget within one step by the trainer's own FLOP count and
depth sampler, parameters as the built model has them, the eval interval, the job-array script, the locked
results table, and one-line refusals of a bad sweep file."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
import yaml

from recurdepth.errors import ConfigError
from recurdepth.sweep.spec import eval_interval, load_sweep
from tests.conftest import TINY

SHAPE = ["model.hidden_size=32", "model.num_heads=2", "model.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2"]


def write_sweep(tmp_path: Path, **changes) -> Path:
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "overrides": SHAPE, "budgets": [1e9, 3e9],
            "seeds": [[0, 1], [0]],
            "families": {"fixed": {"overrides": ["recurrence.sampler=fixed", "recurrence.depth=3"]},
                         "sampled": {"overrides": {"recurrence.mean": 3},
                                     "rungs": [["model.hidden_size=32"], {"model.hidden_size": 48}]}}}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def step_flops(cfg, vocab: int, steps: int) -> list:
    """Every step's model FLOPs as the trainer logs them (trainer.train_step), for the first `steps` steps."""
    from recurdepth.model.depth import DepthSampler
    from recurdepth.train.flops import looped_flops

    flops, sampler = looped_flops(cfg, vocab), DepthSampler(cfg.recurrence, cfg.train.seed)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return [tokens * flops.per_token(sampler.window(t).total, cfg.recurrence.backprop_depth) for t in range(steps)]


def test_every_run_spends_its_budget_within_one_step(tmp_path):
    from recurdepth.config import load_config
    from recurdepth.plan.shape import resolve_vocab_size

    sweep = load_sweep(write_sweep(tmp_path))
    assert [r.variant for r in sweep.runs] == ["fixed-r0-s0", "fixed-r0-s1", "fixed-r1-s0", "sampled-r0-s0",
                                               "sampled-r0-s1", "sampled-r1-s0"]
    assert not (tmp_path / "out").exists()  # planning writes nothing
    for run in sweep.runs:
        cfg = load_config(TINY, list(run.overrides))
        assert cfg.train.steps == run.sizing.steps and cfg.train.seed == run.seed
        per_step = step_flops(cfg, resolve_vocab_size(cfg), run.sizing.steps)
        spent = sum(per_step[:run.sizing.steps])
        assert spent - per_step[run.sizing.steps - 1] < run.budget_flops <= spent, run.variant
        assert run.sizing.model_flops == pytest.approx(spent, rel=1e-12)
        assert run.sizing.tokens == run.sizing.steps * 4 * 32
        assert cfg.train.steps % cfg.train.eval_interval == 0  # the last step is evaluated
    sampled = [r for r in sweep.runs if r.family == "sampled" and r.rung == 0]
    assert sampled[0].sizing.steps != sampled[1].sizing.steps or sampled[0].sizing.model_flops != \
        sampled[1].sizing.model_flops  # each seed's own draws of r, not the mean r
    wide = next(r for r in sweep.runs if r.variant == "sampled-r1-s0")
    assert "model.hidden_size=48" in wide.overrides and wide.sizing.unique_params > sampled[0].sizing.unique_params


def test_checkpointed_iterations_count_in_hardware_flops_only(tmp_path):
    path = write_sweep(tmp_path, families={"a": {}, "b": {"overrides": ["recurrence.checkpoint_iterations=true"]}},
                       seeds=[0])
    runs = {(r.family, r.rung): r.sizing for r in load_sweep(path).runs}
    assert runs["a", 0].steps == runs["b", 0].steps and runs["a", 0].hardware_flops == runs["a", 0].model_flops
    assert runs["b", 0].hardware_flops > runs["b", 0].model_flops == runs["a", 0].model_flops


def test_parameters_match_the_built_model(tmp_path, megatron_single_process):
    from recurdepth.config import load_config
    from recurdepth.data.tokenizer import ByteTokenizer
    from recurdepth.model.build import build_model

    for family in ({"overrides": ["model.adapter=concat"]}, {"overrides": ["model.adapter=add",
                                                                            "model.tie_embeddings=false"]}):
        run = load_sweep(write_sweep(tmp_path, families={"f": family}, budgets=[1e9], seeds=[0])).runs[0]
        model = build_model(load_config(TINY, list(run.overrides)), ByteTokenizer().vocab_size)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        assert run.sizing.unique_params == count(model)
        assert run.sizing.params_rec == count(model.core) + count(model.adapter)
        assert run.sizing.effective_params == run.sizing.params_once + 4.0 * run.sizing.params_rec  # tiny: mean 4


@pytest.mark.parametrize("steps,points,interval", [(12, 4, 3), (10, 4, 2), (7, 4, 1), (3, 4, 1), (20, 1, 20)])
def test_eval_interval_ends_on_the_last_step(steps, points, interval):
    assert eval_interval(steps, points) == interval


@pytest.mark.parametrize("change,needle", [
    ({"families": {"wide": {"overrides": ["model.hiden_size=64"]}}},
     "family 'wide' rung 0: unknown config key model.hiden_size; did you mean model.hidden_size?"),
    ({"families": {"wide": {"overides": []}}}, "unknown sweep key families.wide.overides; did you mean"),
    ({"budgets": [1e3], "seeds": [0]}, "family 'fixed' rung 0: budget 1e+03 FLOPs is below one optimizer step"),
    ({"budgets": [3e9, 1e9]}, "budgets: [3000000000.0, 1000000000.0] must increase"),
    ({"seeds": [[0], [0], [1]]}, "one such list per rung (2 lists)"),
    ({"budget": [1e9]}, "unknown sweep key budget; did you mean budgets?"),
    ({"families": {"f": {"overrides": ["train.steps=5"]}}}, "train.steps is set by the sweep (from budgets:)"),
    ({"families": {"f": {"rungs": [["model.hidden_size=64"]]}}}, "give one entry of overrides per budget (2)"),
    ({"eval": {"test_depths": [0]}}, "eval.test_depths: [0] must be a list of depths r >= 1"),
])
def test_bad_sweep_is_one_line(tmp_path, change, needle):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, **change))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_job_array_script_has_one_task_per_run(tmp_path, monkeypatch):
    from recurdepth.sweep.slurm import render_array

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, parallel=2, slurm={"time": "02:00:00", "partition": "gpu", "requeue": True})
    text = render_array(load_sweep(path))
    for needle in ["#SBATCH --array=0-5%2", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=1", "#SBATCH --time=02:00:00",
                   "#SBATCH --partition=gpu", "#SBATCH --signal=B:USR1@300", "#SBATCH --output=%x-%A_%a.out",
                   f"SWEEP={path}", f"cd {tmp_path}", '-m recurdepth sweep "$SWEEP" --task "$TASK"',
                   "REQUEUE=${RECURDEPTH_REQUEUE:-1}"]:
        assert needle in text, needle
    assert "{{" not in text and "@" not in re.sub(r"%[xAa]|USR1@", "", text.split("set -euo")[0])
    with pytest.raises(ConfigError, match="not a slurm time"):
        render_array(load_sweep(write_sweep(tmp_path, slurm={"time": "1 day"})))


def _append_many(args):
    from recurdepth.sweep.rows import append_row

    path, worker = args
    from tests.compare.synthetic import row

    for i in range(40):
        append_row(Path(path), row(f"w{worker}", i, 0, 1e15, 3.0, accuracy={"r=2": 0.5}, pad="x" * 5000))


def test_rows_from_concurrent_writers_never_interleave(tmp_path):
    from recurdepth.compare.results import read_results

    path = tmp_path / "results.jsonl"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_append_many, [(str(path), w) for w in range(4)])
    rows = read_results(path).rows  # every line a whole, checked row
    assert len(rows) == 160 and {(r["family"], r["seed"]) for r in rows} == {(f"w{w}", i) for w in range(4)
                                                                             for i in range(40)}


def test_a_row_compare_would_refuse_is_not_written(tmp_path):
    from recurdepth.errors import DataError
    from recurdepth.sweep.rows import append_row
    from tests.compare.synthetic import row

    with pytest.raises(DataError, match="final_val_loss=nan"):
        append_row(tmp_path / "results.jsonl", row("a", 0, 0, 1e15, float("nan")))
    assert not (tmp_path / "results.jsonl").exists()


def test_plan_json_records_every_run(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    plan = json.loads(sweep.plan_json())
    assert [r["variant"] for r in plan["runs"]] == [r.variant for r in sweep.runs]


def test_job_array_forwards_usr1_to_its_task_and_requeues_it(tmp_path, monkeypatch):
    """Under simulated slurm, USR1 to the batch shell (slurm's --signal=B:USR1) reaches the sweep task (a fake
    python here: the real task forwards it to its trainer), and with slurm.requeue the array task requeues."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from recurdepth.sweep.slurm import render_array
    from tests.test_launch import fake_bin

    monkeypatch.chdir(tmp_path)
    log = tmp_path / "log"
    log.mkdir()
    fake_bin(tmp_path, "scontrol", f'echo "$@" > {log}/scontrol')
    bin_dir = fake_bin(tmp_path, "python", f"printf '%s\\n' \"$@\" > {log}/args\n"
                                           f"trap 'echo usr1 > {log}/usr1; exit 0' USR1\ntouch {log}/ready\n"
                                           "for i in $(seq 300); do sleep 0.1; done")
    text = render_array(load_sweep(write_sweep(tmp_path, slurm={"requeue": True})))
    assert f"PYTHON={sys.executable}" in text
    script = tmp_path / "sweep.sbatch"
    script.write_text(re.sub(r"(?m)^PYTHON=\S+", f"PYTHON={bin_dir}/python", text))
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_JOB_ID="4242", SLURM_JOB_ID="4245",
               PATH=f"{bin_dir}:/usr/bin:/bin")
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (log / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (log / "usr1").exists(), out
    assert (log / "args").read_text().split() == ["-m", "recurdepth", "sweep", str(tmp_path / "sweep.yaml"),
                                                   "--task", "3"]
    assert (log / "scontrol").read_text().split() == ["requeue", "4242_3"] and proc.returncode == 0, out


def test_stop_signals_reach_the_running_children(tmp_path):
    """The sweep forwards SIGUSR1 (slurm's warning), SIGTERM and SIGINT to every live run, and starts no new one."""
    import signal
    import subprocess
    import sys
    import time

    from recurdepth.sweep.runner import Children, run_one

    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
                              f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)"])
    children = Children()
    children.add(child)
    try:
        while not ready.exists():
            assert child.poll() is None
            time.sleep(0.05)
        children.forward(signal.SIGUSR1, None)
        assert child.wait(timeout=30) == 7 and children.stopping == "SIGUSR1"
    finally:
        child.kill()
    assert run_one(None, None, children, 1) == "not started (SIGUSR1 received)"

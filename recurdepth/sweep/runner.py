"""Running a sweep's runs: each a `recurdepth train` child process, then its accuracy, then its results row.

A run whose variant has a row in results.jsonl is skipped. Any other run is (re)started with the trainer's
own resume (checkpoint.resume=auto: from its latest checkpoint when one exists), so a killed run continues
where its last checkpoint left it and a run killed after training but before its row only re-evaluates. Runs
go `parallel` at a time (threads, each waiting on its child; OMP threads split between them). Each child runs
single-process (`python -m recurdepth train`) or, with nproc > 1, under `python -m recurdepth.torchrun`; its
output goes to `<run dir>/sweep.log` and each attempt (seconds, exit status, peak RSS from `wait4`: the child
and its ranks) is a line of `<run dir>/sweep_attempts.jsonl`. A child dies with the sweep
(`RECURDEPTH_LAUNCHER_PID`, recurdepth/exits.py), so a SIGKILLed sweep leaves no run holding its run dir. A stop signal (SIGUSR1 from slurm's --signal,
SIGTERM, SIGINT) is forwarded to the children, which checkpoint and exit; no new run starts after one.

The row (`rows.py`, the format of `recurdepth compare`): tokens and model FLOPs summed from the run's
metrics.jsonl steps (a step repeated after a resume counted once), hardware FLOPs from the same steps' r,
wall_seconds the same steps' time (start-up, validation and checkpoints left out, alike for every run;
`attempt_seconds` is the whole of the training attempts the sweep saw end), final/best validation loss from its evaluations (the last is at
the final step, `spec.eval_interval`), accuracy {"r=D": mean verified accuracy over the trained procedural
tasks at their training difficulty} from `recurdepth eval` at each test depth ({} without procedural sources
or test depths; a model.kind=dense run scores the same at every depth, its one pass per token).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recurdepth.errors import DataError
from recurdepth.exits import LAUNCHER_PID_ENV
from recurdepth.sweep.rows import append_row, check_unchanged, finished_runs
from recurdepth.sweep.spec import RunPlan, Sweep

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Children:
    """The live child processes, to forward stop signals to; `stopping` once one arrived."""

    def __init__(self):
        self.live: set = set()
        self.lock = threading.Lock()
        self.stopping = None

    def add(self, proc) -> None:
        with self.lock:
            self.live.add(proc)

    def remove(self, proc) -> None:
        with self.lock:
            self.live.discard(proc)

    def forward(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name
        with self.lock:
            for proc in self.live:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def install(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self.forward) for sig in STOP_SIGNALS}


def run_sweep(sweep: Sweep, tasks=None) -> int:
    """Run the sweep's unfinished runs (`tasks`: only these indices); 0 when every one has its row."""
    done = finished_runs(sweep.results_path)
    check_unchanged(sweep.runs, done, sweep.results_path)
    runs = [r for r in sweep.runs if tasks is None or r.index in tasks]
    todo = [r for r in runs if r.variant not in done]
    for run in runs:
        if run.variant in done:
            print(f"sweep: {run.variant} is finished (row in {sweep.results_path}); skipped", flush=True)
    sweep.out.mkdir(parents=True, exist_ok=True)
    from recurdepth.atomic import write_atomically

    write_atomically(sweep.out / "sweep.json", sweep.plan_json())
    children = Children()
    previous = children.install()
    threads = max(1, (os.cpu_count() or 1) // (min(sweep.parallel, max(len(todo), 1)) * sweep.nproc))
    try:
        with ThreadPoolExecutor(max_workers=sweep.parallel) as pool:
            outcomes = list(pool.map(lambda run: run_one(sweep, run, children, threads), todo))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [(run, why) for run, why in zip(todo, outcomes) if why]
    for run, why in failed:
        print(f"sweep: {run.variant}: {why} (log {run.run_dir / 'sweep.log'})", flush=True)
    finished = len(runs) - len(failed)
    print(f"sweep: {finished} of {len(runs)} run(s) finished, rows in {sweep.results_path}"
          + (f"; re-run the same command to resume the other {len(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def run_one(sweep: Sweep, run: RunPlan, children: Children, threads: int) -> str:
    """Train `run` to its steps (resuming it), evaluate it, append its row; '' or why it did not finish."""
    if children.stopping:
        return f"not started ({children.stopping} received)"
    run.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {run.variant}: training {run.sizing.steps} steps ({run.budget_flops:.3g} FLOPs budget) in "
          f"{run.run_dir}", flush=True)
    code = _attempt(train_command(sweep, run), run, children, threads, "train")
    if code != 0:
        return f"training exited with status {code}{_error_line(run.run_dir / 'sweep.log')}"
    steps, evals = read_metrics(run.run_dir)
    last = max(steps, default=0)
    if last < run.sizing.steps:
        return f"stopped at step {last} of {run.sizing.steps}" + (f" ({children.stopping})" if children.stopping else "")
    missing = [i for i in range(1, run.sizing.steps + 1) if i not in steps]
    if missing or run.sizing.steps not in evals:
        what = f"step {missing[0]}" if missing else f"the validation of step {run.sizing.steps}"
        return f"{run.run_dir / 'metrics.jsonl'} lacks {what}; remove {run.run_dir} and re-run the sweep"
    accuracy = {}
    if run.has_procedural and sweep.eval.test_depths:
        code = _attempt(eval_command(sweep, run), run, children, threads, "eval")
        if code != 0:
            return f"recurdepth eval exited with status {code}{_error_line(run.run_dir / 'sweep.log')}"
        accuracy = read_accuracy(run.run_dir / "eval" / "eval.json")
    append_row(sweep.results_path, results_row(sweep, run, steps, evals, accuracy, _attempts(run.run_dir)))
    print(f"sweep: {run.variant}: finished, final validation loss {evals[run.sizing.steps]:.4f}", flush=True)
    return ""


# ------------------------------------------------------------------ child processes

def train_command(sweep: Sweep, run: RunPlan) -> list:
    launcher = [sys.executable, "-m", "recurdepth"] if sweep.nproc == 1 else [
        sys.executable, "-m", "recurdepth.torchrun", "--standalone", f"--nproc_per_node={sweep.nproc}",
        "-m", "recurdepth"]
    return [*launcher, "train", str(sweep.base), *run.overrides]


def eval_command(sweep: Sweep, run: RunPlan) -> list:
    return [sys.executable, "-m", "recurdepth", "eval", str(run.run_dir), "--depths",
            ",".join(map(str, sweep.eval.test_depths)), "--n", str(sweep.eval.n), "--valid-samples", "0",
            "--out", str(run.run_dir / "eval")]


def child_env(threads: int, torchrun: bool) -> dict:
    """This environment, with one process's rank variables (or none under torchrun) and OMP threads set."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the child dies with the sweep (its spawning thread)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if not torchrun:  # ranks are found from RANK before SLURM_PROCID: a run is one process, not the job's
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _attempt(cmd: list, run: RunPlan, children: Children, threads: int, what: str) -> int:
    """Run `cmd` with its output appended to the run's sweep.log; record the attempt; its exit status."""
    torchrun = "recurdepth.torchrun" in cmd
    start = time.time()
    with open(run.run_dir / "sweep.log", "a") as log:
        log.write(f"== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads, torchrun))
        children.add(proc)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child (and its waited-for ranks)
        finally:
            children.remove(proc)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    record = {"what": what, "start": start, "seconds": time.time() - start, "exit": code,
              "max_rss_bytes": usage.ru_maxrss * 1024}  # Linux reports kilobytes
    with open(run.run_dir / "sweep_attempts.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return code


def _error_line(log: Path) -> str:
    """`: <the child's error line>` when its log ends with one, else ''."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines()[-50:] if ln.startswith("error: ")]
    return f": {lines[-1][len('error: '):]}" if lines else ""


def _attempts(run_dir: Path) -> list:
    path = run_dir / "sweep_attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------ what a run left

def read_metrics(run_dir: Path) -> tuple[dict, dict]:
    """({step: its metrics row}, {step: validation loss}) from metrics.jsonl; a step written again after a
    resume (trained again from an earlier checkpoint) keeps its last row."""
    steps, evals = {}, {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill of an earlier attempt
        if "loss" in row and "flops" in row:
            steps[row["step"]] = row
        elif "eval/loss" in row:
            evals[row["step"]] = row["eval/loss"]
    return steps, evals


def read_accuracy(path: Path) -> dict:
    """{"r=D": mean accuracy over the training-difficulty task sets at depth D} from `recurdepth eval`'s json."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read the accuracy of {path} ({exc}); re-run the sweep to evaluate again") from None
    by_depth: dict = {}
    for row in rows:
        if row["metric"] == "accuracy" and "train difficulty" in row["task"]:
            by_depth.setdefault(row["depth"], []).append(row["value"])
    return {f"r={d}": sum(v) / len(v) for d, v in sorted(by_depth.items())}


def results_row(sweep: Sweep, run: RunPlan, steps: dict, evals: dict, accuracy: dict, attempts: list) -> dict:
    """The run's row of results.jsonl (see the module docstring and `recurdepth.compare.results`)."""
    from recurdepth.config import load_config
    from recurdepth.plan.shape import resolve_vocab_size
    from recurdepth.train.flops import looped_flops

    s = run.sizing
    trained = [steps[i] for i in range(1, s.steps + 1)]
    cfg = load_config(sweep.base, list(run.overrides))
    flops, r = looped_flops(cfg, resolve_vocab_size(cfg)), cfg.recurrence
    train = [a for a in attempts if a["what"] == "train"]
    return {
        "variant": run.variant, "family": run.family, "seed": run.seed, "rung": run.rung,
        "budget_flops": run.budget_flops, "config_hash": run.config_hash, "tokenizer": run.tokenizer,
        "dataset": run.dataset, "unique_params": s.unique_params, "effective_params": s.effective_params,
        "params_once": s.params_once, "params_rec": s.params_rec, "depth": s.depth,
        "backprop_depth": s.backprop_depth, "steps": s.steps, "tokens": sum(m["tokens"] for m in trained),
        "model_flops": sum(m["flops"] for m in trained),
        "hardware_flops": sum(m["tokens"] * flops.per_token(m["depth"], r.backprop_depth, r.checkpoint_iterations)
                              for m in trained),
        "wall_seconds": sum(m["seconds"] for m in trained),
        "attempt_seconds": sum(a["seconds"] for a in train),
        "peak_memory_bytes": max((a["max_rss_bytes"] for a in train), default=0),
        "final_val_loss": evals[s.steps], "best_val_loss": min(evals.values()), "accuracy": accuracy,
    }


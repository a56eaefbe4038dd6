"""Graceful stops as launchers really deliver them: to the whole process group (torchrun's `os.killpg` of each
worker, `timeout`, Ctrl-C, slurm), often twice, after checkpoints have been saved; and no process left behind
after any exit, SIGKILL included. See docs/operations.md ("Stopping, restarting and surviving faults")."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from recurdepth.torchrun import summarize
from recurdepth.train import guards
from tests.conftest import ROOT, TINY, cli_command, free_port, read_metrics
from tests.train.test_operations import COMMON, last_per_step, straight

TOTAL = 16  # steps of the runs that get stopped (they are signalled right after their first checkpoint)
STOPPED = re.compile(r"stopping after step (\d+) on (\w+); checkpoint (\S+)")


# ------------------------------------------------------------------ helpers


def train_args(run_dir: Path, data_cache: str, steps: int = TOTAL, interval: int = 2) -> list:
    return [*COMMON[2:], f"train.steps={steps}", f"checkpoint.interval={interval}", f"train.run_dir={run_dir}",
            f"data.cache_dir={data_cache}"]


class Launched:
    """A command started in a session of its own (as a shell, sbatch or a scheduler starts a job), its output in
    files, and the sessions of every process it started, for the orphan check."""

    def __init__(self, cmd: list, env: dict, tmp_path: Path, name: str):
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        self.sessions = {self.proc.pid}

    def note_sessions(self) -> list:
        """Every process of the job now (torchrun starts each rank in a session of its own)."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for p in procs:
            try:
                self.sessions.add(os.getsid(p.pid))
            except OSError:
                pass
        return procs

    def wait_for(self, predicate, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running {timeout} s after the signal:\n{self.output()}") from None

    def output(self) -> str:
        return self.out.read_text()[-3000:] + "\n--- stderr ---\n" + self.err.read_text()[-5000:]

    def leftovers(self, marker: str, timeout: float = 15) -> list:
        """Processes still alive in the job's sessions or naming `marker` (the run dir), after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for p in psutil.process_iter(["cmdline", "status"]):
                if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                try:
                    sid = os.getsid(p.pid)
                except OSError:
                    continue
                if sid in self.sessions or marker in " ".join(p.info["cmdline"] or []):
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL whatever is left of the job (by pid: only processes of its sessions)."""
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and os.getsid(p.pid) in self.sessions:
                    p.kill()
            except (OSError, psutil.Error):
                pass


def has_checkpoint(run_dir: Path):
    return lambda: (run_dir / "checkpoints" / "latest").exists()


def is_trainer(cmdline: list) -> bool:
    text = " ".join(cmdline)
    return (("-m recurdepth train" in text or "bin/recurdepth train" in text) and Path(cmdline[0]).name != "timeout"
            and "recurdepth.torchrun" not in text and "torch.distributed.run" not in text)


def helpers_of(procs: list) -> list:
    """Child processes of the trainers that are not forked copies of them (megatron's writers while they
    write): the spawned helpers (a multiprocessing Manager, its resource tracker) a group signal kills."""
    trainers = [p for p in procs if is_trainer(p.cmdline())]
    assert trainers, [p.cmdline() for p in procs]
    found = []
    for t in trainers:
        for child in t.children(recursive=True):
            try:
                if child.cmdline() != t.cmdline():
                    found.append(" ".join(child.cmdline())[:160])
            except psutil.NoSuchProcess:
                pass
    return found


def assert_stop_checkpoint(run_dir: Path, stdout: str, signal_name: str) -> int:
    """The stop line names the complete checkpoint that `latest` points at; no partial save is left."""
    match = STOPPED.search(stdout)
    assert match, stdout[-3000:]
    step, reason, path = int(match.group(1)), match.group(2), Path(match.group(3))
    ckpts = run_dir / "checkpoints"
    assert reason == signal_name and 2 <= step < TOTAL, match.group(0)
    assert (ckpts / "latest").read_text().strip() == path.name == f"step_{step:08d}" and path.is_dir()
    assert not [p.name for p in ckpts.rglob("*") if ".tmp" in p.name], sorted(p.name for p in ckpts.iterdir())
    return step


# ------------------------------------------------------------------ unit: StopRequest, config, the summary line


def test_stop_request_takes_the_configured_signals_and_survives_repeats():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop = guards.StopRequest(signals=["SIGUSR2", "usr1"])
        assert stop.signals == (signal.SIGUSR2, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a repeat (torchrun forwarding what the group got) changes nothing
        assert (stop.reason, stop.received) == ("SIGUSR2", "SIGUSR2")
        stop.restore()
        os.kill(os.getpid(), signal.SIGUSR1)  # after the stop: ignored, the process is on its way out
        assert signal.getsignal(signal.SIGUSR1) is guards._ignore_late_signal
        for sig, handler in before.items():
            signal.signal(sig, handler)
        quiet = guards.StopRequest(signals=["SIGUSR2"])
        quiet.restore()  # no signal came: the previous handler is back
        assert signal.getsignal(signal.SIGUSR2) is before[signal.SIGUSR2]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert guards.DEFAULT_STOP_SIGNALS == ("SIGTERM", "SIGUSR1", "SIGINT")
    with pytest.raises(ValueError, match="SIGKILL"):
        guards.stop_signal("SIGKILL")


def test_stop_signals_config_is_validated():
    assert load_config(TINY).train.stop_signals == ["SIGTERM", "SIGUSR1", "SIGINT"]
    assert load_config(TINY, ["train.stop_signals=[SIGTERM, usr1]"]).train.stop_signals == ["SIGTERM", "usr1"]
    assert load_config(TINY, ["train.stop_signals=SIGTERM"]).train.stop_signals == ["SIGTERM"]
    assert load_config(TINY, ["train.stop_signals=[]"]).train.stop_signals == []
    for bad in ("[SIGTERM, SIGBOGUS]", "[SIGKILL]", "[15]"):
        with pytest.raises(ConfigError, match=r"train.stop_signals=.* is invalid; list signals a process can"):
            load_config(TINY, [f"train.stop_signals={bad}"])


def record(rank, code=0, stopped="SIGTERM", step=7):
    return {"rank": rank, "local_rank": rank, "restart": 0, "code": code, "stopped": stopped, "step": step}


class Failure:
    def __init__(self, local_rank, exitcode):
        self.local_rank, self.exitcode = local_rank, exitcode


def test_the_launchers_one_line():
    ok = {0: record(0), 1: record(1)}
    assert summarize(ok, 2, signal.SIGTERM) == (
        0, "stopped on SIGTERM after step 7; every rank checkpointed and exited 0; resume with the same command")
    status, line = summarize({0: record(0)}, 2, signal.SIGUSR1)
    assert status == 1 and "after SIGUSR1: local rank 1 left no exit record" in line, line
    status, line = summarize({0: record(0), 1: record(1, code=1, stopped=None)}, 2, signal.SIGTERM)
    assert status == 1 and "rank 1 exited 1" in line and "rank 0" not in line, line
    status, line = summarize({0: record(0, code=2, stopped=None)}, 2, None, {1: Failure(1, -9), 0: Failure(0, 2)})
    assert status == 1 and "rank 0 exited 2; rank 1 killed by SIGKILL" in line, line
    assert summarize({0: record(0, stopped=None), 1: record(1, stopped=None)}, 2, signal.SIGINT)[0] == 0


# ------------------------------------------------------------------ megatron's checkpoint writer


def test_checkpoint_writer_patch_is_idempotent_and_keeps_the_signature():
    import inspect

    from recurdepth.compat.checkpoint_writer import apply_checkpoint_writer_compat

    assert apply_checkpoint_writer_compat() and apply_checkpoint_writer_compat()
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    write = fa.FileSystemWriterAsync.write_preloaded_data
    assert list(inspect.signature(write).parameters) == [  # megatron counts them (use_msc)
        "transform_list", "local_proc_idx", "write_bucket", "results_queue", "count_queue", "use_fsync", "kwargs"]
    assert write._recurdepth_writer_compat and not hasattr(write.__wrapped__, "_recurdepth_writer_compat")  # once
    assert fa._get_write_results_queue() is fa._get_write_results_queue()
    assert type(fa._get_write_results_queue()).__module__ == "queue"  # in-process: no Manager process


@pytest.mark.slow
def test_checkpoint_writer_has_no_helper_ignores_stop_signals_and_dies_with_its_parent(tmp_path):
    """The results queue is in-process (no Manager process a group signal kills); a writer survives a stop
    signal (its trainer decides), and dies with its parent instead of staying behind as an orphan."""
    def start(name):
        fifo, ready = tmp_path / f"{name}.fifo", tmp_path / f"{name}.ready"
        os.mkfifo(fifo)
        job = Launched([sys.executable, str(Path(__file__).with_name("_writer_worker.py")), str(fifo), str(ready)],
                       dict(os.environ, OMP_NUM_THREADS="1"), tmp_path, name)
        job.wait_for(ready.exists, "a writer", timeout=120)
        return job, fifo, json.loads(ready.read_text())

    job, fifo, info = start("survives")
    try:
        assert info["helpers"] == [] and info["queue"] == "Queue", info
        writer = psutil.Process(info["writers"][0])
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            writer.send_signal(sig)
        time.sleep(0.5)
        assert writer.is_running() and writer.status() != psutil.STATUS_ZOMBIE
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # unblocks the writer (never blocks the test)
        time.sleep(0.5)
        os.close(reader)
        assert job.finish(60) == 0 and "save finished" in job.out.read_text(), job.output()
    finally:
        job.kill()

    job, fifo, info = start("orphan")
    try:
        os.kill(info["pid"], signal.SIGKILL)
        job.finish(30)
        assert job.leftovers(str(fifo), timeout=10) == []
    finally:
        job.kill()


# ------------------------------------------------------------------ 2 ranks: launch/torchrun.sh, bare torchrun


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """The uninterrupted 2-rank run's per-step metrics."""
    return straight(tmp_path_factory.mktemp("reference"), data_cache, TOTAL, nproc=2)


@pytest.mark.slow
def test_sigterm_to_torchrun_sh_process_group_stops_cleanly_and_resumes_identically(tmp_path, data_cache, reference):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    job = Launched(["bash", str(ROOT / "launch" / "torchrun.sh"), "2", str(TINY), *train_args(run_dir, data_cache)],
                   env, tmp_path, "stopped")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        procs = job.note_sessions()
        assert helpers_of(procs) == []  # the saves left no helper process behind
        os.killpg(job.proc.pid, signal.SIGTERM)  # as a terminal, `timeout` or a scheduler delivers it
        assert job.finish() == 0, job.output()
        out = job.out.read_text()
        step = assert_stop_checkpoint(run_dir, out, "SIGTERM")
        assert out.splitlines()[-1] == (f"stopped on SIGTERM after step {step}; every rank checkpointed and exited 0; "
                                        f"resume with the same command"), job.output()
        assert "Traceback" not in job.err.read_text() and "closing signal" not in job.err.read_text(), job.output()
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()
    again = Launched(["bash", str(ROOT / "launch" / "torchrun.sh"), "2", str(TINY),
                      *train_args(run_dir, data_cache)], env, tmp_path, "resumed")
    assert again.finish() == 0, again.output()
    assert "resumed from" in again.out.read_text() and f"step_{step:08d}" in again.out.read_text(), again.output()
    resumed = last_per_step(read_metrics(run_dir))
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    assert [resumed[s]["loss"] for s in resumed] == [reference[s]["loss"] for s in reference]  # bit for bit


@pytest.mark.slow
def test_repeated_sigterm_to_the_launcher_pid_only_stops_cleanly(tmp_path, data_cache):
    """SIGTERM to the launcher alone (`kill PID`), and twice more while the ranks checkpoint (bare torchrun
    stops waiting for its ranks at the third): one clean stop."""
    run_dir = tmp_path / "run"
    job = Launched(["bash", str(ROOT / "launch" / "torchrun.sh"), "2", str(TINY), *train_args(run_dir, data_cache)],
                   dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), tmp_path, "stopped")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        job.note_sessions()
        for _ in range(3):  # impatient: the repeats must not abort the wait for the stop checkpoint
            job.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        assert job.finish() == 0, job.output()
        step = assert_stop_checkpoint(run_dir, job.out.read_text(), "SIGTERM")
        assert f"stopped on SIGTERM after step {step}; every rank checkpointed" in job.out.read_text()
        assert "Traceback" not in job.err.read_text(), job.output()
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()


@pytest.mark.slow
def test_a_save_failing_on_one_rank_stops_the_run_with_its_reason_not_a_hang(tmp_path, data_cache):
    """Rank 1's write of step 4 fails (an I/O error) while rank 0 waits in megatron's barrier: rank 1 says why
    in one line and exits, the launcher ends rank 0 and says which rank failed; step_2 stays complete."""
    from recurdepth.train.checkpoint import verify_checkpoint

    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RECURDEPTH_FAIL_SAVE_AT_STEP="4:1")
    job = Launched(["bash", str(ROOT / "launch" / "torchrun.sh"), "2", str(TINY),
                    *train_args(run_dir, data_cache, steps=6)], env, tmp_path, "failed")
    try:
        status = job.finish(timeout=180)
        err = job.err.read_text()
        assert status != 0, job.output()
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert any("saving step_00000004" in ln and "failed on rank 1" in ln and "Input/output error" in ln
                   for ln in errors), job.output()
        assert "rank 1 exited 2" in job.out.read_text() + err, job.output()
        ckpts = run_dir / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step_00000002" and verify_checkpoint(ckpts / "step_00000002")
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()


@pytest.mark.slow
def test_bare_torchrun_group_sigterm_every_rank_checkpoints_and_exits_0(tmp_path, data_cache):
    """Bare torchrun: every rank records exit 0 after the agreed stop; torchrun itself still exits 1 with its
    SignalException traceback (documented in docs/operations.md; recurdepth.torchrun turns it into one line)."""
    run_dir, exits = tmp_path / "run", tmp_path / "exits"
    exits.mkdir()
    cmd, env = cli_command(["train", str(TINY), *train_args(run_dir, data_cache)], nproc=2,
                           env_extra={"RECURDEPTH_EXIT_DIR": str(exits), "OMP_NUM_THREADS": "1"})
    job = Launched(cmd, env, tmp_path, "bare")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        assert helpers_of(job.note_sessions()) == []
        os.killpg(job.proc.pid, signal.SIGTERM)
        status = job.finish()
        step = assert_stop_checkpoint(run_dir, job.out.read_text(), "SIGTERM")
        records = {p.name: json.loads(p.read_text()) for p in exits.glob("rank_*.json")}
        assert sorted(records) == ["rank_0.json", "rank_1.json"], job.output()
        for name, rec in records.items():
            assert (rec["code"], rec["stopped"], rec["signal"], rec["step"]) == (0, "SIGTERM", "SIGTERM", step), rec
        assert status == 1 and "SignalException" in job.err.read_text()  # torchrun's own status after a signal
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()


# ------------------------------------------------------------------ the sbatch script, real torchrun and training


@pytest.mark.slow
def test_usr1_through_the_sbatch_script_checkpoints_requeues_and_exits_0(tmp_path, data_cache):
    """The rendered sbatch script under fake srun/scontrol (tests/test_launch.py's harness) but with the real
    recurdepth.torchrun and 2 training ranks: USR1 to the batch shell, as `--signal=B:USR1@...` sends it."""
    from recurdepth.launch import render_sbatch
    from tests.test_launch import fake_bin

    run_dir, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    fake_bin(tmp_path, "srun", 'while [[ $1 == -* ]]; do shift; done\nexec "$@"')
    bin_dir = fake_bin(tmp_path, "scontrol", f'if [ "$1" = show ]; then tr , "\\n" <<< "$3"; '
                                             f'else echo "$@" > {log}/scontrol; fi')
    text = render_sbatch(TINY, 1, 2, "1:00:00", 120, train_args(run_dir, data_cache), 0, "sim", requeue=True)
    text = re.sub(r"(?m)^export PATH=\S+:", f"export PATH={bin_dir}:", text)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = dict(os.environ, SLURM_JOB_ID="4243", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_JOB_NAME="sim", RDZV_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    job = Launched(["bash", str(script)], env, tmp_path, "job")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        assert helpers_of(job.note_sessions()) == []
        job.proc.send_signal(signal.SIGUSR1)  # B: the batch shell only; it forwards USR1 to srun
        assert job.finish() == 0, job.output()
        out = job.out.read_text()
        step = assert_stop_checkpoint(run_dir, out, "SIGUSR1")
        assert f"stopped on SIGUSR1 after step {step}; every rank checkpointed and exited 0" in out, job.output()
        assert "srun exited with status 0" in out and "requeueing job 4243" in out, job.output()
        assert (log / "scontrol").read_text().split() == ["requeue", "4243"]
        assert "Traceback" not in job.err.read_text(), job.output()
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()


# ------------------------------------------------------------------ one process: timeout, Ctrl-C, SIGKILL


def single(run_dir: Path, data_cache: str) -> tuple:
    """`recurdepth train ...` (the console script), one process."""
    cmd, env = cli_command(["train", str(TINY), *train_args(run_dir, data_cache)], env_extra={"OMP_NUM_THREADS": "1"})
    script = Path(sys.executable).with_name("recurdepth")
    return ([str(script)] if script.exists() else cmd[:3]) + cmd[3:], env


@pytest.mark.slow
def test_timeout_sigterm_to_the_group_stops_one_process_cleanly(tmp_path, data_cache):
    """`timeout -s TERM SECS recurdepth train ...`: on expiry, and on a SIGTERM it receives itself (sent here, once
    a checkpoint exists, so the test does not depend on timing), timeout signals the command and then its whole
    process group. With --preserve-status it exits with the command's status (without: 124 on expiry)."""
    run_dir = tmp_path / "run"
    cmd, env = single(run_dir, data_cache)
    job = Launched(["timeout", "--preserve-status", "-s", "TERM", "600", *cmd], env, tmp_path, "timeout")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        assert helpers_of(job.note_sessions()) == []
        job.proc.send_signal(signal.SIGTERM)
        assert job.finish() == 0, job.output()
        assert_stop_checkpoint(run_dir, job.out.read_text(), "SIGTERM")
        assert "Traceback" not in job.err.read_text(), job.output()
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()


@pytest.mark.slow
def test_ctrl_c_twice_to_the_group_writes_a_stop_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd, env = single(run_dir, data_cache)
    job = Launched(cmd, env, tmp_path, "ctrl-c")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        job.note_sessions()
        os.killpg(job.proc.pid, signal.SIGINT)  # what a terminal sends to its foreground group on Ctrl-C
        time.sleep(0.3)
        os.killpg(job.proc.pid, signal.SIGINT)
        assert job.finish() == 0, job.output()
        assert_stop_checkpoint(run_dir, job.out.read_text(), "SIGINT")
        assert "Traceback" not in job.err.read_text() and "KeyboardInterrupt" not in job.err.read_text()
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()


@pytest.mark.slow
def test_sigkill_after_a_save_leaves_no_process_behind(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd, env = single(run_dir, data_cache)
    job = Launched(cmd, env, tmp_path, "killed")
    try:
        job.wait_for(has_checkpoint(run_dir), "checkpoint")
        job.note_sessions()
        job.proc.kill()
        assert job.finish() == -signal.SIGKILL
        assert job.leftovers(str(run_dir)) == []
    finally:
        job.kill()

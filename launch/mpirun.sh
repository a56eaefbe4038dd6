#!/usr/bin/env bash
# MPI: launch/mpirun.sh NP CONFIG [section.key=value ...]
#   -> mpirun -np NP python -m recurdepth train CONFIG [overrides ...]
# Ranks come from the launcher's variables (OMPI_COMM_WORLD_* for Open MPI, PMI_* for MPICH/Hydra and
# Intel MPI) and rank 0's address and a free port are broadcast with mpi4py (pip install mpi4py; set
# MASTER_ADDR/MASTER_PORT yourself to skip that). mpirun is $MPIRUN, else the one beside .venv's python
# (the PyPI `mpich` package puts it there), else the one on PATH. Open MPI gets --bind-to none (each rank
# uses OMP_NUM_THREADS cores), --oversubscribe, and --allow-run-as-root when run as root (containers, CI);
# MPICH's Hydra needs none of these. More mpirun options: MPIRUN_ARGS="--hostfile hosts" launch/mpirun.sh ...
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NP CONFIG [section.key=value ...]   (NP: MPI processes)" >&2
  exit 2
fi
NP=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
if [ -z "${MPIRUN:-}" ]; then
  if [ -x "$(dirname "$PYTHON")/mpirun" ]; then MPIRUN=$(dirname "$PYTHON")/mpirun
  elif command -v mpirun >/dev/null 2>&1; then MPIRUN=$(command -v mpirun)
  else
    echo "error: no mpirun found; install one (bash launch/setup.sh with RECURDEPTH_MPI=1, or apt-get install openmpi-bin) or set MPIRUN" >&2
    exit 2
  fi
fi
FLAGS=()
VERSION=$("$MPIRUN" --version 2>&1 || true)
case "$VERSION" in
  *"Open MPI"*|*OpenRTE*|*"Open RTE"*|*PRRTE*|*prterun*)
    FLAGS+=(--bind-to none --oversubscribe)
    if [ "$(id -u)" = 0 ]; then FLAGS+=(--allow-run-as-root); fi
    ;;
  *HYDRA*|*MPICH*|*"Intel(R) MPI"*)
    ;;  # Hydra: no binding, oversubscription and root are fine by default
  *)
    echo "warning: unrecognised mpirun ($MPIRUN): passing no extra flags" >&2
    ;;
esac
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NP > 0 ? CORES / NP : 1 ))}
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec "$MPIRUN" -np "$NP" ${FLAGS[@]+"${FLAGS[@]}"} ${MPIRUN_ARGS:-} "$PYTHON" -m recurdepth train "$@"

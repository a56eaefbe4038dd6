#!/usr/bin/env bash
# One node: launch/torchrun.sh NPROC CONFIG [section.key=value ...]
#   -> python -m recurdepth.torchrun --standalone --nproc_per_node NPROC -m recurdepth train CONFIG [overrides ...]
# recurdepth.torchrun is torchrun (every torchrun option works) that, after SIGTERM/SIGINT/SIGUSR1 and a clean
# stop of every rank, prints one line and exits 0 instead of torchrun's exit 1 and traceback (docs/operations.md).
# Uses .venv's python when there is one (else $PYTHON, else python3). On CPU the cores are split over the
# ranks (OMP_NUM_THREADS = cores / NPROC unless already set); on GPU each rank takes the GPU of its LOCAL_RANK.
# Extra torchrun options: TORCHRUN_ARGS="--max-restarts 2" launch/torchrun.sh 8 CONFIG
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC CONFIG [section.key=value ...]   (NPROC: processes on this node)" >&2
  exit 2
fi
NPROC=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$PYTHON" -m recurdepth.torchrun --standalone --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} \
  -m recurdepth train "$@"

#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with torch (CPU wheel unless CUDA is
# wanted), megatron-core 0.16.x and recurdepth with its test extras. Safe to re-run: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, megatron.core, recurdepth, tokenizers, transformers" >/dev/null 2>&1; then
  # torch first and pinned: an unpinned requirement would pull the multi-GB CUDA build from the registry
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
# Optional (RECURDEPTH_MPI=1, as CI sets it): MPI for `mpirun` launches, from PyPI so a fresh machine needs no
# system packages: mpi4py's binary wheel plus MPICH's runtime wheel, which puts mpirun/mpiexec in .venv/bin.
if [ "${RECURDEPTH_MPI:-0}" = 1 ] && ! { [ -x .venv/bin/mpirun ] && .venv/bin/python -c "from mpi4py import MPI" >/dev/null 2>&1; }; then
  .venv/bin/python -m pip install -q "mpi4py>=4.0" "mpich>=4.3"
fi

#!/usr/bin/env bash
# The GPU acceptance checks, one table: bash launch/gpu-check.sh [--quick] [--only CHECK,...] [--budget SECONDS]
#   -> python -m recurdepth bench gpu-check ...   (recurdepth/bench/gpu_check.py says what each check does)
# On one H100/H200 it finishes in about 8 minutes; --quick runs tiny shapes (CPU, CI). Without CUDA or
# transformer_engine the TE checks print "skip". Exit status 1 if any check FAILs (skips are not failures).
# Uses .venv's python when there is one (else $PYTHON, else python3); installs and sets up nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
cd "$ROOT"
exec "$PYTHON" -m recurdepth bench gpu-check "$@"

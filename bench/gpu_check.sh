#!/usr/bin/env bash
# The GPU check of issue 19 item 5, in one run of a few minutes: our fused JSD loss against
# Liger-Kernel's at H=4096, V=128256, 8192 tokens, bf16, and a bf16 train step at SmolLM2
# shapes (bench/gpu_check.py; its doc says what each JSON line holds).
#
# usage: bench/gpu_check.sh [gpu_check.py flags...]      (from anywhere; runs in the repo root)
#
# Python: $PYTHON, else the repo's .venv (made by `make`), else python3 with src/ on the path.
# Packages the machine lacks (no internet there) travel as wheels in $WHEELS (default .whl/):
# they are installed into a temporary folder first. liger-kernel 0.8.5 is a pure-Python wheel
# (`pip download liger-kernel==0.8.5 --no-deps -d .whl`); without it, a JSON line says liger is
# absent and the rest still runs. The JSON lines are also appended to
# bench/results_gpu_check_<date>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl >&2
  export PYTHONPATH="$site:$PYTHONPATH"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
exec "$PY" bench/gpu_check.py --out "bench/results_gpu_check_$(date +%F).jsonl" "$@"

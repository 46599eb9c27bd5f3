#!/usr/bin/env bash
# The GPU validation in one call on a machine lent a GPU (issue 21 item 11; rsm_fast/gpucheck.py).
#
#   bash bench/gpu_check.sh [OUT_DIR] [extra python -m rsm_fast.gpucheck arguments]
#
# 1. Wheels carried in .whl/ (a machine without PyPI: diffusers and the optional GPU packages, see
#    README "On a GPU machine") are installed into /tmp/site without their dependencies.
# 2. The project is installed in place without dependencies or build isolation (offline: the
#    machine's torch and triton are used as they are).
# 3. python -m rsm_fast.gpucheck writes OUT_DIR/summary.{md,json}, launch.json, logs.txt and the
#    loss and rollout tables (8 files; default bench/results/gpucheck_<device>_<date>).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-}"
shift || true
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || { echo "gpu_check: installing the project (pip install -e .) failed"; exit 1; }
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
if [ -n "$out" ]; then
  exec python3 -m rsm_fast.gpucheck --out "$out" "$@"
fi
exec python3 -m rsm_fast.gpucheck "$@"

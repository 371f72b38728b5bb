#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs offline on a GPU host: datasets and pydicom with
# their dependencies, for that host's Python (default 3.12) on x86_64 Linux. Not committed (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
mkdir -p bench/wheels
python -m pip download --dest bench/wheels --only-binary=:all: --python-version "$PY" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "datasets>=4" "pydicom>=3"

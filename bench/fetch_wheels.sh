#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs offline on a GPU host (Python 3.12, x86_64): the
# packages that host lacks (datasets and its pure-Python needs dill and multiprocess, pydicom) and the
# transformers this project is developed with. --no-deps: the host's numpy, pyarrow and torch stay.
# About 17 MB; bench/wheels/ is ignored by git. Then carry "bench/wheels" with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
mkdir -p bench/wheels
python -m pip download --no-deps --dest bench/wheels --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydicom==3.0.2 transformers==5.24.0

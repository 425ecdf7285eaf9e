#!/usr/bin/env bash
# Wheels for a GPU machine without network access, fetched here (where pip works) into .whl/:
# the Python packages pdmesh needs that a stock CUDA PyTorch image (torch, transformers, grpcio's
# older releases, ...) may lack or hold in older versions, at the versions this checkout is tested
# with, built for CPython 3.12 on x86-64 Linux. tools/gpu_check.sh installs them from .whl/ first.
#
#   tools/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12; then carry .whl with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${1:-3.12}
PACKAGES=(protobuf grpcio grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos
          tenacity gguf cryptography cffi pycparser opentelemetry-api opentelemetry-sdk opentelemetry-proto
          opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common
          opentelemetry-semantic-conventions prometheus-client uvloop)
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PY_VERSION" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$name==$version"
done
du -sh .whl

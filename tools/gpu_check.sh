#!/usr/bin/env bash
# The GPU check, in one call on a machine with one NVIDIA GPU (about 5 minutes):
#   1. installs pdmesh into the machine's Python, keeping its CUDA build of torch (the pin in
#      pyproject.toml is the CPU CI's); other dependencies come from .whl/ when present
#      (tools/gpu_wheels.sh fetches them on a machine with network), else from the index;
#   2. runs the tests marked gpu (tests/gpu): greedy equals transformers on CUDA in float32 with
#      both decode attention backends, bfloat16 by default, the KV pool sized from
#      --gpu-memory-utilization, a TP group of one over NCCL, prefill and decode workers on the
#      one GPU with a KV hand-off through the host;
#   3. runs tools/bench_engine.py --device cuda: SmolLM2-135M and a 1.24 B-parameter Llama
#      (random weights) at 1, 16 and 64 streams, sdpa and flex decode attention (vLLM beside
#      them when it is installed).
# Logs and results go to $OUT (default: a new folder under /tmp). Exit status: the tests'.
#
#   tools/gpu_check.sh                 # PYTHON=... picks the interpreter (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
PY=${PYTHON:-python3}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-300}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-330}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
say() { echo "== $* ($(date +%T))" | tee -a "$OUT/gpu_check.log"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu_check.log" || true
"$PY" - <<'PYEOF' | tee -a "$OUT/gpu_check.log"
import sys, torch
if not (torch.version.cuda and torch.cuda.is_available()):
    sys.exit(f"gpu_check: torch {torch.__version__} here has no usable CUDA (built for CUDA: {torch.version.cuda})")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PYEOF

say "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade .whl/*.whl
fi
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . \
    || { echo "editable install failed; running from the source tree"; }
export PYTHONPATH="$PWD/services:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PYEOF'
import importlib.util, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
modules = {"grpcio-health-checking": "grpc_health", "grpcio-reflection": "grpc_reflection",
           "grpcio-status": "grpc_status", "grpcio": "grpc", "protobuf": "google.protobuf",
           "prometheus-client": "prometheus_client", "opentelemetry-sdk": "opentelemetry.sdk",
           "opentelemetry-exporter-otlp-proto-grpc": "opentelemetry.exporter.otlp.proto.grpc"}
for dep in deps:
    name = dep.split(">")[0].split("=")[0].split("<")[0].strip()
    if name == "torch":
        continue  # the machine's CUDA build stays
    module = modules.get(name, name.replace("-", "_"))
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        print(dep)
PYEOF
)
if [ -n "$missing" ]; then
    echo "installing from the index: $missing" | tee -a "$OUT/gpu_check.log"
    # shellcheck disable=SC2086  # one requirement per word
    "$PY" -m pip install --quiet --disable-pip-version-check --retries 0 --timeout 15 $missing \
        || { echo "gpu_check: cannot install $missing (no network?): run tools/gpu_wheels.sh where pip works" \
                  "and bring .whl/ along" | tee -a "$OUT/gpu_check.log"; exit 2; }
fi
"$PY" -c "import pdmesh.cli, pdmesh.worker.main; print('pdmesh imports')" | tee -a "$OUT/gpu_check.log"

say "tests marked gpu"
set +e
timeout "$TEST_TIMEOUT_S" "$PY" -m pytest -m gpu tests/gpu -ra -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

say "bench"
set +e
(cd tools && timeout "$BENCH_TIMEOUT_S" "$PY" bench_engine.py --device cuda --models smollm2,llama-1b \
    --streams 1,16,64 --backends sdpa,flex --new-tokens 64 --repeats 1 --json-out "$OUT/bench.json") \
    2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e

say "done: tests exit $tests_rc, bench exit $bench_rc; logs in $OUT"
exit "$tests_rc"

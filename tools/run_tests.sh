#!/usr/bin/env bash
# The one test command (README, .ci/run): installs pdmesh with its test extras, checks that the
# generated protobuf code matches protos/, then runs the whole suite (e2e tests start real meshes).
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
python3 -m pytest "$@"

#!/usr/bin/env bash
# The one test command (README, .ci/run): installs pdmesh with its test extras, checks that the
# generated protobuf code matches protos/, then runs the whole suite (e2e tests start real meshes).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 tools/gen_protos.py --check
python3 -m pytest "$@"

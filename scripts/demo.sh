#!/usr/bin/env bash
# The first command: installs QTasks into .venv and streams the seed's generator task on
# the embedded in-memory default. No server needed.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q -e .
exec .venv/bin/qtasks demo "$@"

#!/usr/bin/env bash
# The test command: installs what it needs into .venv, brings up the local brokers,
# then lint, type check and every test (fast suite and real-broker integration suite).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
bash scripts/brokers.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest tests integration "$@"

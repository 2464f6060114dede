#!/usr/bin/env bash
# The test command: installs what it needs into .venv, brings up the local brokers,
# then lint, type check, import contracts and every test (fast suite and real-broker integration suite).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
log=$(mktemp)
quiet() { "$@" >"$log" 2>&1 || { cat "$log"; return 1; }; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
quiet .venv/bin/python -m pip install --upgrade pip
quiet .venv/bin/python -m pip install -e '.[dev]'

# The compose files are validated by a test; in CI make sure a compose client exists.
if [ -n "${CI:-}" ] && ! command -v docker-compose >/dev/null \
    && ! docker compose version >/dev/null 2>&1 && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  quiet apt-get install -y -q docker-compose \
    || { quiet apt-get update -q && quiet apt-get install -y -q docker-compose; } || true
fi

# The dashboard's browser test drives Debian's headless Chromium with Playwright (no
# browser download); on a fresh machine install it the same way (in CI a missing browser
# then fails that test, never skips it).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  quiet apt-get install -y -q chromium chromium-driver \
    || { quiet apt-get update -q && quiet apt-get install -y -q chromium chromium-driver; } \
    || true
fi

bash scripts/brokers.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports   # the layers of pyproject.toml's [tool.importlinter]
exec .venv/bin/pytest tests integration "$@"

#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy, strict on the core), then pytest, which
# includes tests/e2e (real QEMU guests; they need root and QEMU, which setup.sh installs).
set -uo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
status=0
echo "== ruff"; $V/ruff check src tests bench || status=1
echo "== ruff format"; $V/ruff format --check src tests bench || status=1
echo "== mypy"; $V/mypy || status=1
echo "== pytest"; $V/python -m pytest "$@"; rc=$?
[ $rc -ne 0 ] && status=$rc
exit $status

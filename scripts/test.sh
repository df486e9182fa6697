#!/bin/bash
# The whole test suite: unit tests against the real daemon process through the project's own
# vhost-user frontend, and end-to-end tests that boot a real Linux guest under QEMU.  It runs on
# the request path compiled with mypyc (scripts/setup.sh compiles it); then the unit tests run
# again on the same source as pure Python (PYVIRTIOFS_PURE=1), what runs where no C compiler is.
# Extra arguments go to pytest (e.g. scripts/test.sh -k passthrough); with them, one run only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -ra "$@"
fi
.venv/bin/python -m pytest -ra
echo "=== the unit tests again, on pure Python (PYVIRTIOFS_PURE=1) ==="
# (test_packaging builds its own wheels: the same with or without PYVIRTIOFS_PURE)
PYVIRTIOFS_PURE=1 exec .venv/bin/python -m pytest -ra tests/unit --ignore=tests/unit/test_packaging.py

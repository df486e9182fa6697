#!/bin/bash
# The whole test suite: unit tests against the real daemon process through the project's own
# vhost-user frontend, and end-to-end tests that boot a real Linux guest under QEMU.
# Extra arguments go to pytest (e.g. scripts/test.sh -k passthrough).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"

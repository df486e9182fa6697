#!/bin/bash
# The demo: set everything up, start pyvirtiofsd on a fresh directory, boot a Linux guest
# (QEMU, TCG) that mounts it, and show files crossing in both directions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pyvirtiofs.demo "$@"

#!/bin/bash
# Guest-level benchmark: one TCG guest mounts pyvirtiofsd, the Rust virtiofsd and QEMU's 9p
# side by side (identical trees) and runs fio, create/stat/unlink, tar -x, find, du and
# git status on each.  Sets up what it needs (venv, QEMU, busybox, fio, the Rust peer), then runs
#   .venv/bin/python bench/guest_bench.py "$@"
# e.g.  scripts/bench-guest.sh --quick       (about 3 minutes)
#       scripts/bench-guest.sh               (full: 3 repetitions, about 10 minutes)
#       scripts/bench-guest.sh --wait-idle 300 --out /tmp/guest.json
# Results: bench/results/guest.json (unless --out says otherwise).  Needs root (apt-get for
# fio when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/guest_bench.py "$@"

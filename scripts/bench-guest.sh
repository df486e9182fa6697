#!/bin/bash
# Guest-level benchmark: one TCG guest mounts pyvirtiofsd, the Rust virtiofsd and QEMU's 9p
# side by side (identical trees) and runs fio, create/stat/unlink, tar -x, find, du and
# git status on each.  Sets up what it needs (venv, QEMU, busybox, fio, the Rust peer), then runs
#   .venv/bin/python bench/guest_bench.py "$@"
# e.g.  scripts/bench-guest.sh --quick       (about 3 minutes)
#       scripts/bench-guest.sh               (full: 3 repetitions, about 10 minutes)
#       scripts/bench-guest.sh --wait-idle 300 --out /tmp/guest.json
# Results: bench/results/guest.json and the README's table (unless --out says otherwise;
# --render-only: only the table, from the committed results).  Needs root (apt-get for
# fio when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# --render-only: rewrite the README's bench:guest block from the committed
# bench/results/guest.json (bench/tables.py), run nothing, install nothing.
if [ "${1:-}" = --render-only ]; then
  py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  exec "$py" bench/tables.py guest
fi
bash scripts/setup.sh
.venv/bin/python bench/guest_bench.py "$@"
# The README's table shows bench/results/guest.json only: a run written elsewhere (--out)
# leaves it alone.
case " $* " in
  *" --out"*) echo "bench: results written to --out; README.md left as it is" >&2 ;;
  *) .venv/bin/python bench/tables.py guest ;;
esac

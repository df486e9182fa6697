#!/bin/bash
# Daemon-level benchmark: pyvirtiofsd against the Rust virtiofsd and QEMU's C virtiofsd, driven
# by the project's own vhost-user frontend (no guest).  Sets up what it needs, then runs
#   .venv/bin/python bench/daemon_bench.py "$@"
# e.g.  scripts/bench.sh --quick            (about a minute)
#       scripts/bench.sh                    (full: 1 GiB file, 3 s a workload; a few minutes)
#       scripts/bench.sh --daemons py,rust --out /tmp/x.json
# Results: bench/results/daemon.json and daemon.png (unless --out says otherwise), and the
# README's table (bench/tables.py).  --render-only: only the table, from the committed results.
set -euo pipefail
cd "$(dirname "$0")/.."
# --render-only: rewrite the README's bench:daemon block from the committed
# bench/results/daemon.json (bench/tables.py) and, with matplotlib, redraw daemon.png; run
# nothing, install nothing.
if [ "${1:-}" = --render-only ]; then
  py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  "$py" bench/tables.py daemon
  exec "$py" bench/daemon_bench.py --plot-only bench/results/daemon.json
fi
bash scripts/setup.sh
if [ bench/requirements.txt -nt .venv/.bench-installed ] || [ ! -e .venv/.bench-installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r bench/requirements.txt
  touch .venv/.bench-installed
fi
# The Rust peer (installed under $TMPDIR without touching the system) and QEMU's C one.
want=",${BENCH_DAEMONS:-py,rust,c},"
for a in "$@"; do case "$a" in --daemons=*) want=",${a#--daemons=},";; esac; done
prev=""
for a in "$@"; do [ "$prev" = --daemons ] && want=",$a,"; prev=$a; done
if [[ $want == *,rust,* ]]; then
  .venv/bin/python -c 'from tests.peers import find_rust_virtiofsd; print("rust virtiofsd:", find_rust_virtiofsd())'
fi
if [[ $want == *,c,* ]] && [ ! -x /usr/lib/qemu/virtiofsd ]; then
  echo "bench: /usr/lib/qemu/virtiofsd is missing (apt-get install qemu-system-common)" >&2
  exit 1
fi
.venv/bin/python bench/daemon_bench.py "$@"
# The README's table shows bench/results/daemon.json only: a run written elsewhere (--out)
# leaves it alone.
case " $* " in
  *" --out"*) echo "bench: results written to --out; README.md left as it is" >&2 ;;
  *) .venv/bin/python bench/tables.py daemon ;;
esac

#!/bin/bash
# Daemon-level benchmark: pyvirtiofsd against the Rust virtiofsd and QEMU's C virtiofsd, driven
# by the project's own vhost-user frontend (no guest).  Sets up what it needs, then runs
#   .venv/bin/python bench/daemon_bench.py "$@"
# e.g.  scripts/bench.sh --quick            (about a minute)
#       scripts/bench.sh                    (full: 1 GiB file, 3 s a workload; a few minutes)
#       scripts/bench.sh --daemons py,rust --out /tmp/x.json
# Results: bench/results/daemon.json and daemon.png (unless --out says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
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
exec .venv/bin/python bench/daemon_bench.py "$@"

#!/bin/bash
# DAX window benchmark: a hot file read through the window against READ requests, and the cost
# of SETUPMAPPING itself (bench/dax_bench.py).  Rewrites the README's DAX table and
# bench/results/dax.json.   e.g.  scripts/bench-dax.sh            (256 MiB file, 5 rounds of 1 s)
#                                 scripts/bench-dax.sh --quick    (64 MiB, rounds of 0.3 s)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/dax_bench.py --readme README.md "$@"

#!/usr/bin/env python3
"""What bypassing the guest page cache for O_APPEND opens costs a single VM (cache=auto).

    .venv/bin/python bench/append_bench.py [--reps 3] [--lines 4000] [--out bench/results/append.json]

pyvirtiofsd answers an open with O_APPEND with FOPEN_DIRECT_IO, so that two VMs appending to
one file never tear each other's lines (tests/e2e/test_two_guests.py).  Before, such an open
went through the guest page cache.  One guest boot (TCG) with one pyvirtiofsd share
(--cache=auto) times, in the guest, each workload both ways in one run:

* append: N writes of a 46-byte line through an ``O_WRONLY | O_APPEND`` fd (direct, as now)
  against the same writes through an ``O_WRONLY`` fd positioned at the end (the page cache
  path every O_APPEND open took before);
* read back: a 4 MiB file in 4 KiB reads, after drop_caches, through an ``O_RDWR | O_APPEND``
  fd (direct: every read is a READ request) against an ``O_RDWR`` fd (page cache, readahead).

Median of ``--reps`` repetitions, the two ways alternating.  Prints a Markdown table and
writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pyvirtiofs.testing import guestvm  # noqa: E402

GUEST = r"""
cat > /tmp/ab.py <<'EOF2'
import json, os, sys, time
root, lines, reps = "/mnt/share", int(sys.argv[1]), int(sys.argv[2])
line = b"x" * 45 + b"\n"
def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
def append(path, flags):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    if not flags & os.O_APPEND:
        os.lseek(fd, 0, os.SEEK_END)
    t0 = time.monotonic()
    for _ in range(lines):
        os.write(fd, line)
    t = time.monotonic() - t0
    os.close(fd)
    return t
def readback(path, flags):
    drop()
    fd = os.open(path, os.O_RDWR | flags)
    t0 = time.monotonic()
    n = 0
    while True:
        b = os.read(fd, 4096)
        if not b:
            break
        n += len(b)
    t = time.monotonic() - t0
    os.close(fd)
    assert n == 4 << 20, n
    return t
with open(root + "/big", "wb") as f:
    f.write(os.urandom(4 << 20))
out = {"append_direct": [], "append_cached": [], "read_direct": [], "read_cached": []}
for r in range(reps):
    order = [("direct", os.O_APPEND), ("cached", 0)]
    if r % 2:
        order.reverse()
    for name, flags in order:
        out["append_" + name].append(append(f"{root}/log-{name}-{r}", flags))
    for name, flags in order:
        out["read_" + name].append(readback(root + "/big", flags))
print("RESULT " + json.dumps(out))
EOF2
exec @PYTHON@ /tmp/ab.py @LINES@ @REPS@
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lines", type=int, default=4000)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "append.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyvfs-ab-", dir="/tmp") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        sock = str(Path(tmp) / "s.sock")
        env = dict(__import__("os").environ, PYTHONPATH=str(REPO / "src"))
        with guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                                    f"--shared-dir={share}", "--cache=auto", "--sandbox=none"],
                                   sock, env=env) as d:
            script = (GUEST.replace("@PYTHON@", guestvm.guest_python())
                      .replace("@LINES@", str(args.lines)).replace("@REPS@", str(args.reps)))
            res = guestvm.run_guest(script, [guestvm.Share("share", socket=sock)],
                                    hostroot=True, daemons=[d], timeout=1800)
    if res.status != 0 or "RESULT " not in res.output:
        print(res.output, file=sys.stderr)
        return 1
    raw = json.loads(res.output.split("RESULT ", 1)[1].splitlines()[0])
    med = {k: statistics.median(v) for k, v in raw.items()}
    rows = [
        (f"{args.lines:,} appends of 46 bytes", "append_direct", "append_cached"),
        ("read 4 MiB in 4 KiB reads (cold)", "read_direct", "read_cached"),
    ]
    print("| workload (cache=auto, TCG guest) | O_APPEND fd, direct (now) s | page cache "
          "(before) s | ratio |")
    print("|---|---|---|---|")
    for title, a, b in rows:
        print(f"| {title} | {med[a]:.3f} | {med[b]:.3f} | {med[a] / med[b]:.2f} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "raw": raw, "median": med},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

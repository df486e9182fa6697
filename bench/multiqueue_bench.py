#!/usr/bin/env python3
"""What a second request queue does to a parallel workload: Linux 6.12, two vCPUs.

    .venv/bin/python bench/multiqueue_bench.py [--reps 3] [--files 1000] [--mib 64]
                                               [--out bench/results/multiqueue.json]

Each repetition boots a Linux 6.12 guest (TCG, ``-smp 2``) against a fresh pyvirtiofsd
(``--cache=auto``) twice: once with ``num-request-queues=1`` and once with ``=2`` (the order
alternates between repetitions).  In the guest (host root over 9p, so the host's python3 runs
there) the same workload runs twice:

* ``1 process``: one process pinned to CPU 0 does the work alone;
* ``2 processes``: one process pinned to each CPU, each doing that same work in its own
  directory at the same time (twice the work in all).

The work of one process: create and write FILES files of 4 KiB, drop_caches, stat them, read
them, unlink them; write a MIB MiB file in 1 MiB writes, drop_caches, read it back.  Each step
is timed inside the guest with ``time.monotonic()``.  With Linux >= 6.10 and two queues, CPU 0's
requests go to queue 1 and CPU 1's to queue 2, each served by its own daemon thread; with one
queue both CPUs share it.  The JSON has every figure, the table shows medians (seconds, lower is
better).  The daemon log's per-queue request counts are recorded as a check that the
configuration did what it says.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pyvirtiofs.testing import guestvm  # noqa: E402

GUEST = textwrap.dedent('''\
    import json, os, sys, time

    root, files, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    BLOCK = os.urandom(1 << 20)

    def drop():
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\\n")

    def work(cpu, d, barrier_r, ready_w):
        os.sched_setaffinity(0, {cpu})
        os.mkdir(d)
        os.write(ready_w, b"x")
        os.read(barrier_r, 1)
        t = {}
        t0 = time.monotonic()
        for i in range(files):
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                f.write(BLOCK[:4096])
        t["create+write"] = time.monotonic() - t0
        # drop_caches is global: the parent drops between phases (see below), here we only
        # measure the phases, each process in step with the other through the barrier.
        os.write(ready_w, b"x"); os.read(barrier_r, 1)
        t0 = time.monotonic()
        for i in range(files):
            os.stat(os.path.join(d, f"f{i}"))
        t["stat"] = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(files):
            with open(os.path.join(d, f"f{i}"), "rb") as f:
                f.read()
        t["read"] = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(files):
            os.unlink(os.path.join(d, f"f{i}"))
        t["unlink"] = time.monotonic() - t0
        t0 = time.monotonic()
        with open(os.path.join(d, "big"), "wb") as f:
            for _ in range(mib):
                f.write(BLOCK)
        t["seq write"] = time.monotonic() - t0
        os.write(ready_w, b"x"); os.read(barrier_r, 1)
        t0 = time.monotonic()
        with open(os.path.join(d, "big"), "rb") as f:
            while f.read(1 << 20):
                pass
        t["seq read"] = time.monotonic() - t0
        os.unlink(os.path.join(d, "big"))
        return t

    def run(name, cpus):
        """Run work() on each CPU of cpus at once; drop caches between the phases."""
        barrier_r, barrier_w = os.pipe()
        ready_r, ready_w = os.pipe()
        outs = []
        for cpu in cpus:
            r, w = os.pipe()
            if os.fork() == 0:
                t = work(cpu, os.path.join(root, f"{name}-cpu{cpu}"), barrier_r, ready_w)
                os.write(w, json.dumps(t).encode())
                os._exit(0)
            os.close(w)
            outs.append(r)
        for phase in range(3):  # start, before stat, before seq read
            for _ in cpus:
                os.read(ready_r, 1)
            if phase:
                drop()
            os.write(barrier_w, b"x" * len(cpus))
        res = []
        for r in outs:
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
            res.append(json.loads(data))
        for _ in cpus:
            os.wait()
        # per step: the slowest process (the step is done when both are)
        return {k: max(t[k] for t in res) for k in res[0]}

    out = {"1 process": run("one", [0]), "2 processes": run("two", [0, 1])}
    print("MQBENCH " + json.dumps(out), flush=True)
''')


def _queue_counts(log: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for q, n in re.findall(r"queue (\d+) stopped after (\d+) requests", log):
        counts[int(q)] = counts.get(int(q), 0) + int(n)
    return counts


def one_run(queues: int, files: int, mib: int, tmp: Path) -> dict:
    shared = Path(tempfile.mkdtemp(dir=tmp, prefix=f"q{queues}-"))
    sock = str(shared) + ".sock"
    argv = [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}", f"--shared-dir={shared}",
            "--cache=auto", "--sandbox=none"]
    script = (guestvm.embed_file("/tmp/mqb.py", GUEST)
              + f"exec {shlex.quote(guestvm.guest_python())} /tmp/mqb.py \"$PWD\" {files} {mib}\n")
    with guestvm.DaemonProcess(argv, sock) as d:
        res = guestvm.run_guest(script, [guestvm.Share("mqb", socket=sock)], hostroot=True,
                                kernel="6.12", smp=2, num_request_queues=queues, mem="2G",
                                timeout=1800, daemons=[d])
        d.wait(timeout=60)
        log = d.log
    m = re.search(r"^MQBENCH (.*)$", res.output, re.M)
    if res.status != 0 or not m:
        raise SystemExit(f"guest failed (status {res.status}):\n{res.output[-3000:]}")
    return {"figures": json.loads(m.group(1)), "queue_counts": _queue_counts(log),
            "wall": res.wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench/results/multiqueue.json"))
    a = p.parse_args()
    runs: dict[int, list] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="pyvfs-mqb-", dir="/tmp") as tmp:
        for rep in range(a.reps):
            for q in ((1, 2) if rep % 2 == 0 else (2, 1)):
                t0 = time.monotonic()
                r = one_run(q, a.files, a.mib, Path(tmp))
                runs[q].append(r)
                print(f"rep {rep + 1}, {q} request queue(s): {time.monotonic() - t0:.0f} s, "
                      f"requests per queue {r['queue_counts']}", file=sys.stderr)
    steps = list(runs[1][0]["figures"]["1 process"])
    med = {q: {mode: {s: statistics.median(r["figures"][mode][s] for r in runs[q]) for s in steps}
               for mode in ("1 process", "2 processes")} for q in (1, 2)}
    lines = [f"Linux 6.12, TCG, 2 vCPUs, pyvirtiofsd cache=auto; {a.files} files of 4 KiB and "
             f"{a.mib} MiB per process; median of {a.reps}; seconds (lower is better)", "",
             "| step | 1 queue, 1 process | 1 queue, 2 processes | 2 queues, 1 process | "
             "2 queues, 2 processes |", "|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s} | {med[1]['1 process'][s]:.2f} | {med[1]['2 processes'][s]:.2f} | "
                     f"{med[2]['1 process'][s]:.2f} | {med[2]['2 processes'][s]:.2f} |")
    table = "\n".join(lines)
    print(table)
    Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs, "median": med,
                                       "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

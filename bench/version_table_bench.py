#!/usr/bin/env python3
"""What the metadata version table costs the daemon, and what it saves a guest.

    .venv/bin/python bench/version_table_bench.py [--seconds 2] [--out bench/results/version_table.json]

Two pyvirtiofsd processes on two copies of one tree, one without and one with
``--version-table``; the project's frontend (with vhost-user SHMEM, so the table is mapped
into region 1) sends identical request streams to both, queue depth 1:

* ``getattr``: GETATTR of one file (with the table: the extension, so the daemon also reads
  the slot's version and sends 16 more bytes);
* ``setattr``: chmod of one file (with the table: plus a CAS bump);
* ``write4k``: 4 KiB WRITE (plus a bump);
* ``create_unlink``: CREATE, RELEASE, UNLINK (plus four bumps: directory and file, twice).

And the guest's side, with the table only: ``stat`` of an unchanged file through the
reference client (:class:`pyvirtiofs.testing.version_client.VersionedClient`), which reads
the slot and sends nothing, against a GETATTR round trip.

Each figure is operations per second over ``--seconds``, the median of 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pyvirtiofs.testing.frontend import FuseClient, VirtioFsFrontend  # noqa: E402
from pyvirtiofs.testing.version_client import TableView, VersionedClient  # noqa: E402


def start(tree: Path, sock: str, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                          f"--shared-dir={tree}", "--sandbox=none", "--log-level=error", *extra],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon did not start: {p.args}")
        time.sleep(0.02)
    return p


def rate(fn, seconds: float) -> float:
    n = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.monotonic()
        if now >= end:
            return n / (now - t0)


def workloads(c: FuseClient, guest: VersionedClient | None = None):
    """The request streams; with ``guest`` (the extension negotiated) LOOKUP and GETATTR go
    through it, as their replies are 16 bytes longer."""
    node = guest.resolve("f") if guest else c.lookup(1, "f").nodeid
    getattr_ = (lambda: guest._send_getattr(node)) if guest else (lambda: c.getattr(node))
    fh = c.open(node, os.O_RDWR).fh
    data = os.urandom(4096)
    modes = [0o600, 0o644]
    k = [0]

    def setattr_():
        k[0] ^= 1
        c.setattr(node, mode=modes[k[0]])

    def create_unlink():
        e, o = c.create(1, "tmp", 0o644)
        c.release(e.nodeid, o.fh)
        c.unlink(1, "tmp")

    return {"getattr": getattr_,
            "setattr": setattr_,
            "write4k": lambda: c.write(node, fh, 0, data),
            "create_unlink": create_unlink}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "version_table.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pyvfs-vtb-", dir="/tmp"))
    table = f"/dev/shm/pyvfs-vtb-{os.getpid()}"
    procs = []
    try:
        for name in ("plain", "table"):
            (tmp / name).mkdir()
            (tmp / name / "f").write_bytes(b"x" * 4096)
        procs.append(start(tmp / "plain", str(tmp / "plain.sock"), []))
        procs.append(start(tmp / "table", str(tmp / "table.sock"), [f"--version-table={table}"]))
        plain = FuseClient.connect(str(tmp / "plain.sock"), shmem=True)
        vc = FuseClient(VirtioFsFrontend(str(tmp / "table.sock"), shmem=True))
        VersionedClient.init(vc)
        view = TableView.from_region(vc.fe.shmem_regions[1])
        guest = VersionedClient(vc, view)
        guest.stat("f")
        runs = {"plain": workloads(plain), "table": workloads(vc, guest)}
        raw: dict[str, dict[str, list[float]]] = {w: {"plain": [], "table": []}
                                                  for w in runs["plain"]}
        raw["stat_unchanged"] = {"getattr": [], "versioned": []}
        fnode = guest.resolve("f")
        for _ in range(args.rounds):
            for w in runs["plain"]:
                for side in ("plain", "table"):
                    raw[w][side].append(rate(runs[side][w], args.seconds))
            # the guest's side: a stat with the slot unchanged sends no request
            raw["stat_unchanged"]["getattr"].append(
                rate(lambda: plain.getattr(fnode), args.seconds))
            guest.getattr(fnode)  # cached again after the workloads' changes
            before = guest.requests
            raw["stat_unchanged"]["versioned"].append(
                rate(lambda: guest.getattr(fnode), args.seconds))
            assert guest.requests == before
        med = {w: {k: statistics.median(v) for k, v in sides.items()} for w, sides in raw.items()}
        print("| workload (QD1, ops/s) | without table | with --version-table | ratio |")
        print("|---|---|---|---|")
        for w in runs["plain"]:
            a, b = med[w]["plain"], med[w]["table"]
            print(f"| {w} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
        a, b = med["stat_unchanged"]["getattr"], med["stat_unchanged"]["versioned"]
        print(f"| stat of an unchanged file: GETATTR vs the table's slot (no request) | "
              f"{a:,.0f} | {b:,.0f} | {b / a:.2f} |")
        Path(args.out).write_text(json.dumps({"args": vars(args), "raw": raw, "median": med},
                                             indent=2) + "\n")
        view.close()
        plain.close()
        vc.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(table):
            os.unlink(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

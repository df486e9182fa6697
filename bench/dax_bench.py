#!/usr/bin/env python3
"""DAX window benchmark: reading a hot file through the DAX window against READ requests, in
the same run, and what SETUPMAPPING / REMOVEMAPPING themselves cost.

    .venv/bin/python bench/dax_bench.py [--quick] [--out bench/results/dax.json]
                                        [--readme README.md]
    bash scripts/bench-dax.sh [same options]

pyvirtiofsd runs with ``--dax-window``; the project's frontend plays a QEMU with the vhost-user
SHMEM series (it reserves the window and maps the fds the daemon sends) and a Linux guest
(:class:`DaxDriver`, after fs/fuse/dax.c: 2 MiB ranges mapped with SETUPMAPPING on first use).
The file (256 MiB, 64 MiB with --quick) is in the host's page cache and, for the window
workloads, already mapped (the steady state of a hot file): a read through the window is then
a copy from the shared mapping with no request at all.  Copies from the window are done two
ways: ``process_vm_readv`` (what the frontend's safe accessor uses: a fault becomes an error)
and a plain ``memmove``, which is what a guest's load instruction does.

Workloads: 4 KiB at random offsets and 1 MiB sequential, each through READ (a FUSE request,
1024-entry queue, reply copied out of guest RAM) and through the window; then SETUPMAPPING of
a 2 MiB range into a free part of the window, the same range mapped again (exact overlap:
unmap + map), and REMOVEMAPPING, each a round trip to the daemon plus its SHMEM_MAP/UNMAP round
trip on the backend channel.  Figures: operations/s, MB/s, µs per operation, and the daemon's
CPU time per operation (utime+stime from /proc/PID/stat).

``--readme`` rewrites the section between the ``dax-bench`` markers of that file with the
table of this run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO / "src"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

sys.path.insert(0, str(REPO / "bench"))
import daemon_bench  # noqa: E402
from pyvirtiofs.testing import frontend as F  # noqa: E402
from tests.unit.daemon import Daemon  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
U64 = struct.Struct("<Q")
BEGIN = "<!-- dax-bench:begin (written by bench/dax_bench.py --readme) -->"
END = "<!-- dax-bench:end -->"


def daemon_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Run:
    """Workloads compared in interleaved rounds (A B C, A B C, ...); each figure is the round
    with the median rate, so a burst of load from other jobs hits every path alike."""

    def __init__(self, d: Daemon, seconds: float, repeat: int):
        self.d = d
        self.seconds = seconds
        self.repeat = repeat
        self.results: list[dict] = []

    def compare(self, items) -> None:
        """items: (workload, path, op, bytes per op)."""
        rounds: dict[tuple[str, str], list[dict]] = {}
        for _ in range(self.repeat):
            for name, path, op, nbytes in items:
                rounds.setdefault((name, path), []).append(self._once(name, path, op, nbytes))
        for (name, path), rs in rounds.items():
            rs.sort(key=lambda r: r["ops_per_s"])
            r = dict(rs[len(rs) // 2])
            r["rounds_ops_per_s"] = [x["ops_per_s"] for x in rs]
            self.results.append(r)
            print(f"  {name:28} {path:34} {r['ops_per_s']:>12,.0f} ops/s "
                  f"{r['us_per_op']:>9.2f} us"
                  + (f" {r['MB_per_s']:>9,.0f} MB/s" if r["MB_per_s"] else ""), flush=True)

    def _once(self, name: str, path: str, op, nbytes: int, min_ops: int = 20) -> dict:
        """Call op() until `seconds` passed (and at least min_ops times)."""
        for _ in range(3):
            op()                                   # warm
        cpu0, t0, n = daemon_cpu(self.d.pid), time.perf_counter(), 0
        deadline = t0 + self.seconds
        skip_wall = skip_cpu = 0.0
        while n < min_ops or time.perf_counter() < deadline:
            skipped = op()      # an op may report housekeeping time not to count
            if skipped:
                skip_wall += skipped[0]
                skip_cpu += skipped[1]
                deadline += skipped[0]
            n += 1
        dt = time.perf_counter() - t0 - skip_wall
        cpu = daemon_cpu(self.d.pid) - cpu0 - skip_cpu
        r = {"workload": name, "path": path, "ops": n, "seconds": round(dt, 4),
             "ops_per_s": round(n / dt, 1), "us_per_op": round(dt / n * 1e6, 2),
             "MB_per_s": round(n * nbytes / dt / 1e6, 1) if nbytes else None,
             "daemon_cpu_us_per_op": round(cpu / n * 1e6, 2)}
        return r


def bench(args) -> dict:
    load_before = os.getloadavg()[0]
    size = 64 * MiB if args.quick else 256 * MiB
    seconds = 0.3 if args.quick else 1.0
    tmp = Path(tempfile.mkdtemp(prefix="daxb-", dir="/tmp"))
    shared = tmp / "shared"
    shared.mkdir()
    rng = random.Random(1)
    data = b"".join(rng.randbytes(MiB) for _ in range(size // MiB))
    (shared / "hot").write_bytes(data)
    with open(shared / "hot", "rb") as f:       # hot in the host page cache
        while f.read(8 * MiB):
            pass
    window = 2 * size
    d = Daemon(shared, extra_args=[f"--dax-window={window}", "--log-level=warn"]).start()
    try:
        fe = d.frontend(shmem=True, queue_size=1024, ram_size=64 * MiB)
        c = F.FuseClient(fe)
        drv = F.DaxDriver(c)
        drv.init()
        e = c.lookup(F.FUSE_ROOT_ID, "hot")
        fh = c.open(e.nodeid).fh
        f = drv.open(e.nodeid)
        win = drv.window
        run = Run(d, seconds, args.repeat)
        rnd = random.Random(2)
        pages = size // 4096
        buf4k, buf1m = bytearray(4 * KiB), bytearray(MiB)
        addr4k = ctypes.addressof(ctypes.c_char.from_buffer(buf4k))
        addr1m = ctypes.addressof(ctypes.c_char.from_buffer(buf1m))

        # -- map every range of the file once (the hot steady state), timing it ----------
        t0 = time.perf_counter()
        f.read(0, size)
        cold = time.perf_counter() - t0
        assert f.read(size - 100, 100) == data[-100:]
        ranges = {r.index: r.moffset for r in drv.ranges_of(e.nodeid)}
        assert len(ranges) == size // F.FUSE_DAX_SZ

        def window_addr(off: int) -> int:
            return win.base + ranges[off >> F.FUSE_DAX_SHIFT] + (off & (F.FUSE_DAX_SZ - 1))

        print(f"pyvirtiofsd --dax-window={window >> 20}M, hot file of {size >> 20} MiB "
              f"({len(ranges)} ranges of 2 MiB)", flush=True)

        # READ requests go through bench/daemon_bench.py's lean generator (pre-built chains,
        # only the offset patched): the floor of a request, as in the daemon-level table.
        gen = daemon_bench.Driver(fe.ram, fe.queues[1], fe.queues[0], spin_us=0.0,
                                  seg_size=4096, uid=c.uid, gid=c.gid, pid=c.pid, client=c)
        mm = gen.mm

        def request(opcode, body, out_sizes):
            slot = gen.slot(opcode, e.nodeid, [body], out_sizes)

            def call(patch=None):
                if patch is not None:
                    patch(slot)
                gen.call(slot)
            return slot, call

        # -- 4 KiB random ------------------------------------------------------------------
        r4, read4k = request(F.Op.READ, F.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0), [4096])

        def set_offset(slot, off):
            U64.pack_into(mm, slot.arg_offs[0] + 8, off)

        def read_req_4k():
            off = rnd.randrange(pages) * 4096
            read4k(lambda s: set_offset(s, off))

        def win_4k():
            drv.read(e.nodeid, rnd.randrange(pages) * 4096, buf4k)

        def win_4k_load():
            ctypes.memmove(addr4k, window_addr(rnd.randrange(pages) * 4096), 4096)

        run.compare([("4 KiB random read", "READ request", read_req_4k, 4096),
                     ("4 KiB random read", "DAX window (process_vm_readv)", win_4k, 4096),
                     ("4 KiB random read", "DAX window (memcpy, as a guest)", win_4k_load,
                      4096)])
        off = 12345 * 4096 % size
        set_offset(r4, off)
        gen.call(r4)
        assert mm[r4.out_off + 16:r4.out_off + 16 + 4096] == data[off:off + 4096]
        r4.release()

        # -- 1 MiB sequential --------------------------------------------------------------
        pos = [0]

        def next_off():
            off = pos[0]
            pos[0] = (off + MiB) % size
            return off

        r1, read1m = request(F.Op.READ, F.READ_IN.pack(fh, 0, MiB, 0, 0, 0, 0), [MiB])

        def read_req_1m():
            off = next_off()
            read1m(lambda s: set_offset(s, off))

        def win_1m():
            drv.read(e.nodeid, next_off(), buf1m)

        def win_1m_load():
            ctypes.memmove(addr1m, window_addr(next_off()), MiB)

        run.compare([("1 MiB sequential read", "READ request", read_req_1m, MiB),
                     ("1 MiB sequential read", "DAX window (process_vm_readv)", win_1m, MiB),
                     ("1 MiB sequential read", "DAX window (memcpy, as a guest)", win_1m_load,
                      MiB)])
        set_offset(r1, 5 * MiB)
        gen.call(r1)
        assert mm[r1.out_off + 16:r1.out_off + 16 + MiB] == data[5 * MiB:6 * MiB]
        r1.release()
        drv.read(e.nodeid, 7 * MiB + 4096, buf4k)
        assert bytes(buf4k) == data[7 * MiB + 4096:7 * MiB + 8192]

        # -- SETUPMAPPING / REMOVEMAPPING themselves ---------------------------------------
        R, W = F.FUSE_SETUPMAPPING_FLAG_READ, F.FUSE_SETUPMAPPING_FLAG_WRITE
        nfile = size // F.FUSE_DAX_SZ
        free = [size + i * F.FUSE_DAX_SZ for i in range((window - size) // F.FUSE_DAX_SZ)]
        sm, setup = request(F.Op.SETUPMAPPING,
                            F.SETUPMAPPING_IN.pack(F.NO_FH, 0, F.FUSE_DAX_SZ, R, 0), [])
        rm, remove = request(F.Op.REMOVEMAPPING, F.REMOVEMAPPING_IN.pack(1)
                             + F.REMOVEMAPPING_ONE.pack(0, F.FUSE_DAX_SZ), [])
        k = [0]

        def map_at(slot, moffset, flags=R):
            i = k[0] = (k[0] + 1) % nfile
            U64.pack_into(mm, slot.arg_offs[0] + 8, i * F.FUSE_DAX_SZ)    # foffset
            U64.pack_into(mm, slot.arg_offs[0] + 24, flags)
            U64.pack_into(mm, slot.arg_offs[0] + 32, moffset)

        def unmap_at(slot, moffset):
            U64.pack_into(mm, slot.arg_offs[0] + 4, moffset)

        mapped: list[int] = []
        spare, spare2 = free.pop(), free.pop()     # kept out of the fresh ranges

        def setup_fresh():
            skipped = None
            if not free:               # window full: empty it, outside the measured time
                t, cpu = time.perf_counter(), daemon_cpu(d.pid)
                c.removemapping(e.nodeid, [(m, F.FUSE_DAX_SZ) for m in mapped])
                free.extend(mapped)
                mapped.clear()
                skipped = (time.perf_counter() - t, daemon_cpu(d.pid) - cpu)
            m = free.pop()
            setup(lambda s: map_at(s, m))
            mapped.append(m)
            return skipped

        def setup_replace():                       # exact overlap after the first call
            setup(lambda s: map_at(s, spare, R | W))

        def map_and_remove():
            setup(lambda s: map_at(s, spare2))
            remove(lambda s: unmap_at(s, spare2))

        g, getattr_req = request(F.Op.GETATTR, F.GETATTR_IN.pack(0, 0, 0), [F.ATTR_OUT_SIZE])
        run.compare([("SETUPMAPPING 2 MiB", "into a free range", setup_fresh, 0),
                     ("SETUPMAPPING 2 MiB", "over a mapped range (replace)", setup_replace, 0),
                     ("SETUPMAPPING + REMOVEMAPPING", "one range", map_and_remove, 0),
                     ("GETATTR (a request's floor)", "request", getattr_req, 0)])
        for slot in (sm, rm, g):
            slot.release()
        results = run.results
    finally:
        d.finish()
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "file_MiB": size >> 20, "window_MiB": window >> 20, "seconds_per_round": seconds,
        "rounds": args.repeat,
        "map_whole_file_cold_s": round(cold, 4), "results": results,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def table(out: dict) -> str:
    rows = {(r["workload"], r["path"]): r for r in out["results"]}
    lines = [
        f"Hot {out['file_MiB']} MiB file, `--dax-window={out['window_MiB']}M`, "
        f"median of {out['rounds']} interleaved rounds of {out['seconds_per_round']} s "
        f"({out['when']}; {out['machine']}; "
        f"load average {out['load_average_1min'][0]:.1f} before, "
        f"{out['load_average_1min'][1]:.1f} after: other jobs share the 2 CPUs, so compare "
        "within the table).",
        "",
        "| workload | path | ops/s | µs/op | MB/s | daemon CPU µs/op |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        mb = f"{r['MB_per_s']:,.0f}" if r["MB_per_s"] is not None else ""
        lines.append(f"| {r['workload']} | {r['path']} | {r['ops_per_s']:,.0f} | "
                     f"{r['us_per_op']:,.2f} | {mb} | {r['daemon_cpu_us_per_op']:,.2f} |")

    def ratio(workload, a, b):
        return rows[(workload, b)]["ops_per_s"] / rows[(workload, a)]["ops_per_s"]
    r4 = ratio("4 KiB random read", "READ request", "DAX window (process_vm_readv)")
    r4m = ratio("4 KiB random read", "READ request", "DAX window (memcpy, as a guest)")
    r1 = ratio("1 MiB sequential read", "READ request", "DAX window (process_vm_readv)")
    r1m = ratio("1 MiB sequential read", "READ request", "DAX window (memcpy, as a guest)")
    setup = rows[("SETUPMAPPING 2 MiB", "into a free range")]["us_per_op"]
    lines += [
        "",
        f"- 4 KiB random: the window serves {r4:,.1f}× as many reads as READ requests "
        f"({r4m:,.0f}× with a plain copy, as a guest's loads), and the daemon spends no CPU on "
        "them.",
        f"- 1 MiB sequential: {r1:,.1f}× ({r1m:,.1f}× with a plain copy).",
        f"- A SETUPMAPPING of a 2 MiB range costs {setup:,.0f} µs (the FUSE request plus the "
        "SHMEM_MAP round trip on the backend channel); mapping the whole file the first time "
        f"took {out['map_whole_file_cold_s']:.2f} s.",
    ]
    return "\n".join(lines)


def update_readme(path: Path, text: str) -> None:
    s = path.read_text()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"{path}: no {BEGIN!r} ... {END!r} section to rewrite")
    head, rest = s.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB file, 0.3 s a round")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (median kept)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dax.json"))
    ap.add_argument("--readme", help="rewrite the dax-bench section of this file")
    args = ap.parse_args(argv)
    out = bench(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    text = table(out)
    print()
    print(text)
    if args.readme:
        update_readme(Path(args.readme), text)
        print(f"\n{args.readme}: DAX section rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())

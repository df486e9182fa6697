#!/usr/bin/env python3
"""Where pyvirtiofsd's time goes, per request: an in-process, deterministic profile.

    .venv/bin/python bench/daemon_profile.py [--workloads null,getattr,...] [--duration 2]
                                             [--top 25] [--out bench/results/profile.txt]

The daemon's own request path (``QueueWorker._drain``: pop a chain from the ring, decode,
``FuseServer.serve_request`` -> ``PassthroughFs``, encode, used ring, interrupt) is run synchronously in
this process, on rings in a memfd that the load generator of ``daemon_bench.py`` fills with the
same pre-built chains it sends to a real daemon.  No threads, no sockets: nothing but the
request path is measured, and nothing else competes for the GIL.

For each workload it prints
  * "drain us/op": wall time spent inside ``QueueWorker._drain`` per operation, without any
    profiler (the daemon's Python work per request, minus the kick wake-up / poll loop, which
    the out-of-process figure of daemon_bench.py adds);
  * a cProfile table of the daemon's functions (files under src/pyvirtiofs, excluding the
    testing frontend): calls per op, own ("tottime") and inclusive ("cumtime") us per op.
    cProfile adds a roughly constant cost per Python call, so small, often-called functions
    look heavier than they are: use the percentages to rank, "drain us/op" for absolute cost.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_bench as B  # noqa: E402

from pyvirtiofs.fuse.server import FuseServer  # noqa: E402
from pyvirtiofs.guest_memory import GuestMemory, MemoryRegion  # noqa: E402
from pyvirtiofs.passthrough import PassthroughFs  # noqa: E402
from pyvirtiofs.queue_worker import QueueWorker  # noqa: E402
from pyvirtiofs.virtqueue import Virtqueue  # noqa: E402

F = B.F
SRC = str(B.REPO / "src" / "pyvirtiofs")


class InProcess:
    """Frontend rings + the daemon's Virtqueue/QueueWorker/FuseServer/PassthroughFs over the
    same memfd; the worker is drained synchronously whenever the generator waits."""

    def __init__(self, shared: str, queue_size: int = 1024, ram_size: int = 64 * B.MiB,
                 seg_size: int = B.PAGE):
        self.ram = ram = F.GuestRam(ram_size)
        self.sq = [F.SplitQueue(ram, i, queue_size, event_idx=True, indirect=True)
                   for i in range(2)]
        r = ram.regions[0]
        self.mem = GuestMemory([MemoryRegion.from_fd(r.fd, r.gpa, r.size, r.uaddr,
                                                     r.mmap_offset)])
        self.fs = PassthroughFs(shared, cache="auto")
        self.server = FuseServer(self.fs)
        self.workers = {}
        for sq in self.sq:
            vq = Virtqueue(sq.index)
            vq.size = queue_size
            vq.event_idx = True
            vq.configure(self.mem, sq.desc_gpa, sq.avail_gpa, sq.used_gpa)
            vq.kick_fd, vq.call_fd, vq.err_fd = sq.kick_fd, sq.call_fd, sq.err_fd
            vq.enabled = True
            self.workers[sq.index] = QueueWorker(vq, self.server.serve_request, f"vq{sq.index}")
        self.drain_ns = 0
        self.drv = B.Driver(ram, self.sq[1], self.sq[0], spin_us=0, seg_size=seg_size,
                            uid=os.getuid(), gid=os.getgid(), pid=os.getpid(),
                            service=self.service)
        self.drv.c = B.SlotClient(self.drv)
        self.drv.c.init()

    def service(self, q) -> None:
        t = time.perf_counter_ns()
        self.workers[q.index]._drain()
        self.drain_ns += time.perf_counter_ns() - t
        for fd in (q.kick_fd, q.call_fd):         # keep the eventfd counters small
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass


class Cfg:
    pass


def run(args) -> str:
    out = io.StringIO()

    def say(*a):
        print(*a, file=out)
        print(*a, flush=True)
    base = tempfile.mkdtemp(prefix="daemon-profile-")
    try:
        shared = os.path.join(base, "share")
        B.make_dataset(shared, args.big_size * B.MiB, args.dir_entries, 0)
        ip = InProcess(shared)
        cfg = Cfg()
        cfg.duration, cfg.warmup = args.duration, 0.2
        sess = B.Session(ip.drv, os.getpid(), cfg)
        say(f"# In-process profile of pyvirtiofsd's request path (Python "
            f"{sys.version.split()[0]}; {args.duration} s a workload)\n")
        for name in args.workloads:
            _, label, fn, wargs = B.WL_INDEX[name]
            wargs = tuple(args.readdir_size if a == "bufsize" else a for a in wargs)
            f = getattr(sess, fn)
            f(cfg.warmup, None, *wargs)
            # 1. no profiler: the time inside QueueWorker._drain per op
            ip.drain_ns = 0
            t0 = time.perf_counter_ns()
            ops, reqs, _nb, _ex = f(args.duration, None, *wargs)
            el = (time.perf_counter_ns() - t0) / 1e9
            drain = ip.drain_ns / 1e3 / ops
            # 2. cProfile of the same loop
            prof = cProfile.Profile()
            prof.enable()
            pops, preqs, _nb, _ex = f(args.duration, None, *wargs)
            prof.disable()
            st = pstats.Stats(prof)
            rows = []
            total_daemon = 0.0
            for (file, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
                if not file.startswith(SRC) or "/testing/" in file:
                    continue
                total_daemon += tt
                rows.append((tt, ct, nc, f"{func} ({file[len(SRC) + 1:]}:{line})"))
            # builtins called from daemon code (syscalls, struct, memoryview...)
            for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
                if file != "~":
                    continue
                share = sum(v[2] for k, v in callers.items()
                            if k[0].startswith(SRC) and "/testing/" not in k[0])
                tot = sum(v[2] for v in callers.values()) or 1
                if share:
                    t = tt * share / tot
                    n = sum(v[1] for k, v in callers.items()
                            if k[0].startswith(SRC) and "/testing/" not in k[0])
                    total_daemon += t
                    rows.append((t, t, n, f"{func}"))
            rows.sort(reverse=True)
            say(f"## {label}  ({ops / el:,.0f} ops/s in-process; {reqs / ops:.0f} request(s) "
                f"an op)")
            say(f"drain us/op (no profiler): {drain:.2f}   |   profiled daemon time "
                f"{total_daemon / pops * 1e6:.1f} us/op")
            say(f"{'own%':>6} {'own us/op':>10} {'incl us/op':>10} {'calls/op':>9}  function")
            for tt, ct, nc, nm in rows[:args.top]:
                say(f"{tt / total_daemon * 100:6.1f} {tt / pops * 1e6:10.2f} "
                    f"{ct / pops * 1e6:10.2f} {nc / pops:9.2f}  {nm}")
            say("")
        sess.finish()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="null,getattr,lookup,lookup_missing,read4k_qd1,"
                    "read4k_qd16,readdirplus,create_unlink,read1m,write1m")
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--big-size", type=int, default=256, help="MiB")
    ap.add_argument("--dir-entries", type=int, default=10000)
    ap.add_argument("--readdir-size", type=int, default=B.PAGE)
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in B.WL_INDEX:
            ap.error(f"unknown workload {w}")
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    umask = os.umask(0o022)
    os.umask(umask)
    text = run(args)
    os.umask(umask)             # PassthroughFs set it to 0 for the whole process
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

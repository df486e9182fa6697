#!/usr/bin/env python3
"""Daemon-level benchmark: pyvirtiofsd against the Rust virtiofsd and QEMU's C virtiofsd,
with no guest.

    .venv/bin/python bench/daemon_bench.py [--quick] [--daemons py,rust,c]
                                           [--out bench/results/daemon.json]
    bash scripts/bench.sh [same options]          # set-up included

The project's own vhost-user frontend (``pyvirtiofs.testing.frontend``, which imports nothing
of the daemon) plays QEMU and the guest driver: it connects to a daemon's socket, brings the
device up as QEMU 7.2 does (1024-entry queues, EVENT_IDX, indirect descriptors), sends FUSE_INIT
with a Linux 6.1 guest's flags, and then drives the request queue with a lean load generator
that reuses pre-built descriptor chains (only the unique, the node id and the arguments that
change are patched per request).  Chains are laid out as a Linux 6.1 guest lays them out: in
header, each argument and each reply argument in its own descriptor, data split into 4 KiB
(page) descriptors, all in an indirect table.

Every daemon gets IDENTICAL request streams, one daemon after another in the same run, each on
its own fresh directory with identical content.  Per workload and daemon it reports operations
per second (GB/s for data), latency p50/p90/p99 as the frontend sees it, and the daemon's CPU
time per operation: utime+stime of the whole daemon process (all threads; for a daemon that
forks, its whole process tree) from /proc/PID/stat, sampled around the measured interval.
Memory: VmRSS after LOOKUP of N distinct files, as bytes per cached inode.

The load generator costs CPU time too (pure Python, ~5-10 us a request); it is measured and
reported ("client us/op": the time a request spends in the generator and not waiting for the
daemon), and the "null" workload (a request with an unknown opcode, answered ENOSYS) is the
floor of a round trip through each daemon: the transport (rings, kick, interrupt) and the FUSE
decode/encode with no file system work.

Every daemon runs with the same settings (bench/daemon_settings.py), passed explicitly and
recorded in the JSON: --sandbox chroot --seccomp kill (the one confinement all three support;
the C virtiofsd's seccomp filter is always on), cache=auto, no thread pool,
--rlimit-nofile=1000000 (or the machine's hard limit).

The JSON goes to --out, a PNG beside it (needs matplotlib: ``.venv/bin/pip install -r
bench/requirements.txt``; without it the table and the JSON are still written).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import stat as _stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO / "src"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from pyvirtiofs.testing import frontend as F  # noqa: E402
from tests import peers  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import daemon_settings  # noqa: E402
import tables  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
PAGE = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")
NULL_OPCODE = 4000        # no FUSE opcode: every daemon answers ENOSYS without touching files
DAEMON_KINDS = ("py", "rust", "c")
LABEL = {"py": "pyvirtiofsd", "rust": "Rust virtiofsd 1.13.2", "c": "C virtiofsd (QEMU 7.2)"}

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_DIRENT = F.DIRENT
ENTRY = F.ENTRY_OUT_SIZE


class BenchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------
# Daemon processes
# ----------------------------------------------------------------------------------------

def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (a C virtiofsd with the namespace sandbox forks)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime (all threads) of the process tree under pid, from /proc/PID/stat."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(rest[11]) + int(rest[12])     # fields 14 and 15: utime, stime (ticks)
    return total / CLK_TCK


def cpu_ns_sched(pid: int) -> int:
    """Time on CPU (ns) of every live thread of the tree, from /proc/PID/task/*/schedstat
    (a finer-grained cross-check of cpu_seconds)."""
    total = 0
    for p in proc_tree(pid):
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            continue
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS etc. in bytes, of the process that does the work (the deepest in the tree)."""
    p = proc_tree(pid)[-1]
    out = {}
    with open(f"/proc/{p}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize"):
                out[k] = int(v.split()[0]) * 1024
            elif k == "Threads":
                out[k] = int(v)
    try:
        out["open_fds"] = len(os.listdir(f"/proc/{p}/fd"))
    except OSError:
        pass
    return out


class Daemon:
    """One daemon process serving ``shared`` on a socket in ``workdir``."""

    def __init__(self, kind: str, shared: str, workdir: str, cpu: int | None, tag: str = "",
                 nofile: int = 1000000,
                 settings: daemon_settings.DaemonSettings = daemon_settings.DaemonSettings()):
        self.kind = kind
        self.settings = settings
        self.nofile = nofile
        self.shared = shared
        d = tempfile.mkdtemp(prefix=f"bench-{kind}-", dir="/tmp")   # short sun_path
        self.sockdir = d
        self.socket_path = os.path.join(d, "vfs.sock")
        self.log_path = os.path.join(workdir, f"{kind}{tag}.log")
        self.argv = self.command(kind)
        self._logf = open(self.log_path, "wb")
        pre = None
        if cpu is not None:
            pre = lambda: os.sched_setaffinity(0, {cpu})   # noqa: E731
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(REPO / "src"), env.get("PYTHONPATH")) if x)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=pre, env=env)
        try:
            peers.wait_for_socket(self.socket_path, self.proc, timeout=30,
                                  log_path=self.log_path)
        except BaseException:
            self.stop()
            raise
        self.pid = self.proc.pid

    def command(self, kind: str) -> list[str]:
        return daemon_command(kind, self.socket_path, self.shared, self.nofile, self.settings)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(3)          # they exit when the frontend disconnects
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)    # leftovers of a forking daemon
        self._logf.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def daemon_command(kind: str, socket_path: str, shared: str, nofile: int,
                   settings: daemon_settings.DaemonSettings) -> list[str]:
    """The daemon's command line: socket, directory, the shared settings, the fd limit."""
    opts = settings.options(kind)
    if kind == "py":
        return [sys.executable, "-m", "pyvirtiofs", f"--socket-path={socket_path}",
                f"--shared-dir={shared}", *opts, f"--rlimit-nofile={nofile}",
                "--log-level=warn"]
    if kind == "rust":
        return [peers.find_rust_virtiofsd(), f"--socket-path={socket_path}",
                f"--shared-dir={shared}", *opts, f"--rlimit-nofile={nofile}"]
    if kind == "c":
        return [peers.find_c_virtiofsd(), f"--socket-path={socket_path}", "-o",
                f"source={shared}", *opts, f"--rlimit-nofile={nofile}"]
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------
# The load generator: pre-built chains on one queue
# ----------------------------------------------------------------------------------------

class Slot:
    """A reusable request: readable bytes at ``in_off``, writable at ``out_off`` (offsets in
    the RAM mapping), reached through the ring descriptor ``head``."""

    __slots__ = ("head", "q", "in_gpa", "out_gpa", "tbl_gpa", "descs", "in_off", "out_off",
                 "arg_offs", "unique", "t0", "i", "noreply", "ram")

    def release(self) -> None:
        self.q.put_desc(self.descs)
        for g in (self.in_gpa, self.out_gpa, self.tbl_gpa):
            if g is not None:
                self.ram.free(g)


class Driver:
    """Drives one daemon's request queue with pre-built chains.  ``c`` does the set-up
    requests (a FuseClient over the socket, or a SlotClient in-process).  ``service``, if
    set, is called whenever the generator waits (the in-process profiler runs the daemon's
    queue worker there, synchronously)."""

    def __init__(self, ram, q, hq, *, spin_us: float, seg_size: int, uid: int, gid: int,
                 pid: int, client=None, service=None):
        if len(ram.regions) != 1:
            raise BenchError("expected one RAM region")
        self.ram = ram
        self.mm = ram.regions[0].mm
        self.base = ram.regions[0].gpa
        self.q, self.hq = q, hq
        self.spin_ns = int(spin_us * 1000)
        self.seg = seg_size
        self.wait_ns = 0
        self.uid, self.gid, self.pid = uid, gid, pid
        self.c = client
        self.service = service
        self._unique = 1 << 40

    @classmethod
    def connect(cls, socket_path: str, *, queue_size: int, ram_size: int, spin_us: float,
                seg_size: int) -> "Driver":
        c = F.FuseClient.connect(socket_path, queue_size=queue_size, ram_size=ram_size,
                                 client_kwargs={"timeout": 60.0})
        fe = c.fe
        return cls(fe.ram, fe.queues[1], fe.queues[0], spin_us=spin_us, seg_size=seg_size,
                   uid=c.uid, gid=c.gid, pid=c.pid, client=c)

    def next_unique(self) -> int:
        self._unique += 2
        return self._unique

    def close(self) -> None:
        self.c.close()

    # -- chains -------------------------------------------------------------------------
    def slot(self, opcode: int, nodeid: int, args: list, out_sizes: list[int],
             queue=None, ext: bytes = b"") -> Slot:
        """Build a chain once; ``args`` are bytes (copied) or ints (buffer sizes)."""
        q = queue or self.q
        noreply = opcode in F.NOREPLY_OPS
        ram, mm, seg = self.ram, self.mm, self.seg
        sizes = [a if isinstance(a, int) else len(a) for a in args]
        body = sum(sizes) + len(ext)
        in_len = F.IN_HEADER.size + body
        in_gpa = ram.alloc(in_len, 64)
        in_off = in_gpa - self.base
        mm[in_off:in_off + F.IN_HEADER.size] = F.IN_HEADER.pack(
            in_len, opcode, 0, nodeid, self.uid, self.gid, self.pid, len(ext) // 8, 0)
        segs = []          # (gpa, len, flags)
        arg_offs = []
        pos = F.IN_HEADER.size
        if noreply:        # Linux sends these as one readable buffer
            segs.append((in_gpa, in_len, 0))
        else:
            segs.append((in_gpa, F.IN_HEADER.size, 0))
        for a, n in zip(list(args) + ([ext] if ext else []), sizes + ([len(ext)] if ext else [])):
            arg_offs.append(in_off + pos)
            if not isinstance(a, int):
                mm[in_off + pos:in_off + pos + n] = a
            if not noreply:
                for o in range(0, n, seg):
                    segs.append((in_gpa + pos + o, min(seg, n - o), 0))
            pos += n
        out_gpa = None
        out_off = 0
        if not noreply:
            total = F.OUT_HEADER.size + sum(out_sizes)
            out_gpa = ram.alloc(total, 64)
            out_off = out_gpa - self.base
            segs.append((out_gpa, F.OUT_HEADER.size, F.VRING_DESC_F_WRITE))
            pos = F.OUT_HEADER.size
            for n in out_sizes:
                for o in range(0, n, seg):
                    segs.append((out_gpa + pos + o, min(seg, n - o), F.VRING_DESC_F_WRITE))
                pos += n
        n = len(segs)
        tbl = None
        if q.indirect and n > 1:
            tbl = ram.alloc(16 * n, 16)
            buf = bytearray(16 * n)
            for k, (g, ln, fl) in enumerate(segs):
                if k < n - 1:
                    F._DESC.pack_into(buf, 16 * k, g, ln, fl | F.VRING_DESC_F_NEXT, k + 1)
                else:
                    F._DESC.pack_into(buf, 16 * k, g, ln, fl, 0)
            ram.write(tbl, buf)
            descs = q.take_desc(1)
            q.write_desc(descs[0], tbl, 16 * n, F.VRING_DESC_F_INDIRECT, 0)
        else:
            descs = q.take_desc(n)
            for k, (g, ln, fl) in enumerate(segs):
                if k < n - 1:
                    q.write_desc(descs[k], g, ln, fl | F.VRING_DESC_F_NEXT, descs[k + 1])
                else:
                    q.write_desc(descs[k], g, ln, fl, 0)
        s = Slot()
        s.head, s.q, s.descs, s.ram = descs[0], q, descs, ram
        s.in_gpa, s.out_gpa, s.tbl_gpa = in_gpa, out_gpa, tbl
        s.in_off, s.out_off, s.arg_offs = in_off, out_off, arg_offs
        s.unique, s.t0, s.i, s.noreply = 0, 0, 0, noreply
        return s

    # -- submit / wait ------------------------------------------------------------------
    def submit(self, s: Slot) -> None:
        u = self.next_unique()
        s.unique = u
        _U64.pack_into(self.mm, s.in_off + 8, u)
        s.t0 = time.perf_counter_ns()
        q = s.q
        q.publish(s.head)
        q.kick()

    def wait(self, q=None) -> list[tuple[int, int]]:
        """Completed (head, used len) of a queue: spin up to spin_us, then sleep on the call
        eventfd (the time spent here is what the daemon costs the generator)."""
        q = q or self.q
        if self.service is not None:
            self.service(q)
        t = time.perf_counter_ns()
        elems = q.poll_used()
        if elems:
            return elems
        spin_end = t + self.spin_ns
        pc = time.perf_counter_ns
        while True:
            last = q.last_used
            n = 0
            while q.used_idx == last:
                n += 1
                if n & 63 == 0 and pc() > spin_end:
                    break
            else:
                elems = q.poll_used()
                self.wait_ns += pc() - t
                return elems
            # sleep: drain the eventfd, fence, recheck, poll
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(q.call_fd)
            F.memory_fence()
            if q.used_idx != q.last_used:
                continue
            r, _, _ = select.select([q.call_fd], [], [], 30.0)
            if not r:
                raise BenchError(f"no completion within 30 s: {q._stuck_message(30)}")
            spin_end = pc() + self.spin_ns

    def check(self, s: Slot, used: int, ok_errors=(0,)) -> int:
        """Validate a reply's out header; returns the (negative) error."""
        ln, err, u = F.OUT_HEADER.unpack_from(self.mm, s.out_off)
        if u != s.unique or ln != used:
            raise BenchError(f"bad reply: unique {u} (want {s.unique}), len {ln} (used {used})")
        if err not in ok_errors:
            raise BenchError(f"reply error {err} ({errno.errorcode.get(-err, '?')}), "
                             f"expected one of {ok_errors}")
        return err

    def call(self, s: Slot, ok_errors=(0,)) -> int:
        """One request at queue depth 1; returns the error."""
        self.submit(s)
        while True:
            for head, used in self.wait():
                if head != s.head:
                    raise BenchError(f"unexpected completion of head {head}")
                return self.check(s, used, ok_errors)

    # -- closed loop ----------------------------------------------------------------------
    def closed_loop(self, slots: list[Slot], prepare, *, duration: float | None = None,
                    count: int | None = None, ok_errors=(0,), lat: list | None = None,
                    on_done=None) -> int:
        """Keep len(slots) requests in flight until ``duration`` seconds or ``count`` requests;
        ``prepare(slot, i)`` patches request i into a slot.  Returns requests completed."""
        by_head = {s.head: s for s in slots}
        pc = time.perf_counter_ns
        deadline = pc() + int(duration * 1e9) if duration else None
        limit = count if count is not None else 1 << 62
        i = 0
        inflight = 0
        for s in slots:
            if i >= limit:
                break
            s.i = i
            prepare(s, i)
            i += 1
            self.submit(s)
            inflight += 1
        done = 0
        check = self.check
        submit = self.submit
        append = lat.append if lat is not None else None
        while inflight:
            elems = self.wait()
            now = pc()
            more = (deadline is None or now < deadline)
            for head, used in elems:
                s = by_head[head]
                check(s, used, ok_errors)
                if on_done is not None:
                    on_done(s)
                if append is not None:
                    append(now - s.t0)
                done += 1
                if more and i < limit:
                    s.i = i
                    prepare(s, i)
                    i += 1
                    submit(s)
                else:
                    inflight -= 1
        return done


class SlotClient:
    """The few set-up requests the Session needs, sent through a Driver's slots (for the
    in-process profiler, which has no FuseClient)."""

    def __init__(self, drv: Driver):
        self.drv = drv
        self.init_out = None

    def _req(self, opcode, nodeid, args, out, ok=(0,), queue=None) -> bytes:
        d = self.drv
        s = d.slot(opcode, nodeid, args, out, queue=queue)
        try:
            if s.noreply:
                d.submit(s)
                q = s.q
                while not [h for h, _ in d.wait(q) if h == s.head]:
                    pass
                return b""
            err = d.call(s, ok)
            if err:
                raise F.FuseError(-err, opcode)
            n = _U32.unpack_from(d.mm, s.out_off)[0]
            return bytes(d.mm[s.out_off + 16:s.out_off + n])
        finally:
            s.release()

    def init(self, flags: int = F.LINUX_6_1_INIT_FLAGS):
        body = F.INIT_IN.pack(7, 38, F.LINUX_MAX_READAHEAD, flags & 0xFFFFFFFF, flags >> 32)
        self.init_out = F.parse_init_out(self._req(F.Op.INIT, 0, [body], [F.INIT_OUT.size]))
        return self.init_out

    def lookup(self, parent: int, name) -> F.EntryOut:
        return F.parse_entry(self._req(F.Op.LOOKUP, parent, [os.fsencode(name) + b"\0"],
                                       [ENTRY]))

    def open(self, nodeid: int, flags: int) -> F.OpenOut:
        return F.OpenOut._make(F.OPEN_OUT.unpack_from(
            self._req(F.Op.OPEN, nodeid, [F.OPEN_IN.pack(flags, 0)], [F.OPEN_OUT.size])))

    def release(self, nodeid: int, fh: int) -> None:
        self._req(F.Op.RELEASE, nodeid, [F.RELEASE_IN.pack(fh, 0, 0, 0)], [])

    def forget(self, nodeid: int, n: int) -> None:
        self._req(F.Op.FORGET, nodeid, [F.FORGET_IN.pack(n)], [], queue=self.drv.hq)

    def _secctx_ext(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------

def make_dataset(root: str, big_size: int, dir_entries: int, mem_files: int) -> None:
    os.makedirs(root)
    rnd = random.Random(1234)
    block = bytearray(rnd.randbytes(MiB))
    fd = os.open(os.path.join(root, "big"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for k in range(big_size // MiB):
            _U64.pack_into(block, 0, k)
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(os.path.join(root, "small"), "wb") as f:
        f.write(block[:PAGE])
    os.mkdir(os.path.join(root, "churn"))
    d = os.path.join(root, "d10k")
    os.mkdir(d)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for k in range(dir_entries):
            os.close(os.open(f"entry-{k:05d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    m = os.path.join(root, "mem")
    os.mkdir(m)
    mfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for k in range(mem_files):
            os.close(os.open(f"f{k:07d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=mfd))
    finally:
        os.close(mfd)
    os.sync()


# ----------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------

def percentiles(lat_ns: list[int]) -> dict[str, float]:
    if not lat_ns:
        return {"p50_us": None, "p90_us": None, "p99_us": None}
    s = sorted(lat_ns)
    n = len(s)

    def p(x):
        return s[min(n - 1, int(x * n))] / 1000.0
    return {"p50_us": p(0.50), "p90_us": p(0.90), "p99_us": p(0.99)}


def cpu_stat(cpus: list[int] | None) -> tuple[float, float]:
    """(busy, steal) seconds of the given CPUs (all if None), from /proc/stat."""
    want = None if cpus is None else {f"cpu{c}" for c in cpus}
    busy = steal = 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            parts = line.split()
            name = parts[0]
            if (want is None and name != "cpu") or (want is not None and name not in want):
                continue
            v = [int(x) for x in parts[1:9]]
            busy += v[0] + v[1] + v[2] + v[5] + v[6]      # user nice system irq softirq
            steal += v[7]
    return busy / CLK_TCK, steal / CLK_TCK


class Measure:
    """Brackets a measured interval: wall time, the daemon's CPU, the generator's own CPU and
    waiting, and what else ran on the CPUs we use (noise)."""

    cpus: list[int] | None = None

    def __init__(self, drv: Driver, pid: int):
        self.drv, self.pid = drv, pid

    def __enter__(self):
        self.cpu0 = cpu_seconds(self.pid)
        self.sch0 = cpu_ns_sched(self.pid)
        self.w0 = self.drv.wait_ns
        self.sys0 = cpu_stat(self.cpus)
        t = os.times()
        self.self0 = t.user + t.system
        self.th0 = time.thread_time()
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc):
        self.elapsed = (time.perf_counter_ns() - self.t0) / 1e9
        self.client_cpu = time.thread_time() - self.th0
        time.sleep(0.02)      # let the daemon's last bookkeeping land in its counters
        self.cpu = cpu_seconds(self.pid) - self.cpu0
        self.sched = (cpu_ns_sched(self.pid) - self.sch0) / 1e9
        self.waited = (self.drv.wait_ns - self.w0) / 1e9
        busy1, steal1 = cpu_stat(self.cpus)
        t = os.times()
        own = t.user + t.system - self.self0
        el = self.elapsed + 0.02
        self.other_load = max(0.0, (busy1 - self.sys0[0]) - own - self.cpu) / el
        self.steal = (steal1 - self.sys0[1]) / el

    def result(self, ops: int, unit: str, requests: int, lat: list[int], nbytes: int = 0,
               **extra) -> dict:
        el = self.elapsed
        r = {"unit": unit, "ops": ops, "requests": requests, "seconds": round(el, 4),
             "ops_per_s": ops / el, "requests_per_s": requests / el,
             "gb_per_s": (nbytes / el / 1e9) if nbytes else None,
             "daemon_cpu_s": self.cpu, "daemon_cpu_sched_s": self.sched,
             "daemon_cpu_us_per_op": self.cpu / ops * 1e6 if ops else None,
             "daemon_cpu_sched_us_per_op": self.sched / ops * 1e6 if ops else None,
             "daemon_cpu_util": self.cpu / el,
             "client_us_per_op": (el - self.waited) / ops * 1e6 if ops else None,
             "client_cpu_us_per_op": self.client_cpu / ops * 1e6 if ops else None,
             "other_load_cpus": round(self.other_load, 3), "steal_cpus": round(self.steal, 3)}
        r.update(percentiles(lat))
        r.update(extra)
        return r


class Session:
    """Everything one daemon instance is measured with."""

    def __init__(self, drv: Driver, pid: int, cfg):
        self.drv, self.pid, self.cfg = drv, pid, cfg
        c = drv.c
        self.big = c.lookup(1, "big")
        self.small = c.lookup(1, "small")
        self.churn = c.lookup(1, "churn").nodeid
        self.d10k = c.lookup(1, "d10k").nodeid
        self.big_fh = c.open(self.big.nodeid, os.O_RDWR).fh
        self.big_size = self.big.attr.size
        rnd = random.Random(42)
        self.offsets = [rnd.randrange(self.big_size // PAGE) * PAGE for _ in range(1 << 16)]
        self.lookups = 0

    def measure(self):
        return Measure(self.drv, self.pid)

    def timed(self, fn, *args):
        """Warm up, then measure; fn(duration, lat) -> (ops, requests, bytes, extra)."""
        fn(self.cfg.warmup, None, *args)
        lat: list[int] = []
        with self.measure() as m:
            ops, reqs, nbytes, extra = fn(self.cfg.duration, lat, *args)
        return m.result(ops, extra.pop("unit", "request"), reqs, lat, nbytes, **extra)

    # each workload: (duration, lat, ...) -> (ops, requests, bytes, extra)
    def w_simple(self, duration, lat, opcode, nodeid, args, out, prepare, qd, ok):
        d = self.drv
        slots = [d.slot(opcode, nodeid, args, out) for _ in range(qd)]
        try:
            n = d.closed_loop(slots, prepare, duration=duration, ok_errors=ok, lat=lat)
        finally:
            for s in slots:
                s.release()
        return n, n, 0, {}

    def null(self, duration, lat):
        return self.w_simple(duration, lat, NULL_OPCODE, 1, [], [], lambda s, i: None, 1,
                             (-errno.ENOSYS,))

    def getattr(self, duration, lat):
        body = F.GETATTR_IN.pack(0, 0, 0)
        return self.w_simple(duration, lat, F.Op.GETATTR, self.small.nodeid, [body],
                             [F.ATTR_OUT_SIZE], lambda s, i: None, 1, (0,))

    def lookup(self, duration, lat):
        r = self.w_simple(duration, lat, F.Op.LOOKUP, 1, [b"small\0"], [ENTRY],
                          lambda s, i: None, 1, (0,))
        self.lookups += r[0]
        return r

    def lookup_missing(self, duration, lat):
        return self.w_simple(duration, lat, F.Op.LOOKUP, 1, [b"no-such-file\0"], [ENTRY],
                             lambda s, i: None, 1, (0, -errno.ENOENT))

    def read_small(self, duration, lat, qd):
        mm, offs = self.drv.mm, self.offsets
        mask = len(offs) - 1
        pack = _U64.pack_into

        def prep(s, i):
            pack(mm, s.arg_offs[0] + 8, offs[i & mask])
        body = F.READ_IN.pack(self.big_fh, 0, PAGE, 0, 0, 0, 0)
        n, reqs, _, ex = self.w_simple(duration, lat, F.Op.READ, self.big.nodeid, [body],
                                       [PAGE], prep, qd, (0,))
        return n, reqs, n * PAGE, ex

    def seq_io(self, duration, lat, write: bool, size: int = MiB):
        d = self.drv
        mm = d.mm
        nchunks = self.big_size // size
        pack = _U64.pack_into
        if write:
            s = d.slot(F.Op.WRITE, self.big.nodeid,
                       [F.WRITE_IN.pack(self.big_fh, 0, size, 0, 0, 0, 0), size],
                       [F.WRITE_OUT.size])
            data_off = s.arg_offs[1]
            mm[data_off:data_off + size] = random.Random(7).randbytes(size)
        else:
            s = d.slot(F.Op.READ, self.big.nodeid,
                       [F.READ_IN.pack(self.big_fh, 0, size, 0, 0, 0, 0)], [size])
        state = {"pos": 0}

        def prep(sl, i):
            k = state["pos"]
            pack(mm, sl.arg_offs[0] + 8, (k % nchunks) * size)
            state["pos"] = k + 1
        short = []

        def on_done(sl):
            if write:
                got = _U32.unpack_from(mm, sl.out_off + 16)[0]
            else:
                got = _U32.unpack_from(mm, sl.out_off)[0] - 16
            if got != size:
                short.append(got)
        try:
            n = d.closed_loop([s], prep, duration=duration, lat=lat, on_done=on_done)
        finally:
            s.release()
        if short:
            raise BenchError(f"{len(short)} short {'writes' if write else 'reads'}: {short[:5]}")
        return n, n, n * size, {}

    def readdirplus(self, duration, lat, bufsize):
        """Whole listings: OPENDIR, READDIRPLUS until empty, RELEASEDIR."""
        d = self.drv
        mm = d.mm
        node = self.d10k
        op = d.slot(F.Op.OPENDIR, node, [F.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0)],
                    [F.OPEN_OUT.size])
        rd = d.slot(F.Op.READDIRPLUS, node, [F.READ_IN.pack(0, 0, bufsize, 0, 0, 0, 0)],
                    [bufsize])
        rl = d.slot(F.Op.RELEASEDIR, node, [F.RELEASE_IN.pack(0, 0, 0, 0)], [])
        pc = time.perf_counter_ns
        deadline = pc() + int(duration * 1e9)
        listings = reqs = entries_total = 0
        entries = 0
        unpack_dirent = _DIRENT.unpack_from
        try:
            while True:
                t0 = pc()
                d.call(op)
                fh = _U64.unpack_from(mm, op.out_off + 16)[0]
                _U64.pack_into(mm, rd.arg_offs[0], fh)
                _U64.pack_into(mm, rl.arg_offs[0], fh)
                off = 0
                entries = 0
                nreq = 2
                while True:
                    _U64.pack_into(mm, rd.arg_offs[0] + 8, off)
                    d.call(rd)
                    nreq += 1
                    n = _U32.unpack_from(mm, rd.out_off)[0] - 16
                    if n <= 0:
                        break
                    base = rd.out_off + 16
                    p = 0
                    while p + ENTRY + _DIRENT.size <= n:
                        _ino, doff, namelen, _typ = unpack_dirent(mm, base + p + ENTRY)
                        off = doff
                        entries += 1
                        p += ENTRY + ((_DIRENT.size + namelen + 7) & ~7)
                d.call(rl)
                if lat is not None:
                    lat.append(pc() - t0)
                listings += 1
                reqs += nreq
                entries_total += entries
                if pc() >= deadline:
                    break
        finally:
            for s in (op, rd, rl):
                s.release()
        # The guest gives back the lookup references readdirplus handed out (Linux would
        # forget them when it drops the dentries); keep the daemon's tables as they were.
        return listings, reqs, 0, {"unit": "listing", "entries_per_listing": entries,
                                   "entries_per_s": None, "readdir_bufsize": bufsize,
                                   "_entries_total": entries_total}

    def create_unlink(self, duration, lat):
        """CREATE, RELEASE, UNLINK a file (and FORGET its node on the hiprio queue, as the
        guest does once the dentry goes)."""
        d = self.drv
        mm = d.mm
        parent = self.churn
        ext = d.c._secctx_ext()
        base = getattr(self, "_churn_seq", 0)
        name = f"c{base:09d}\0".encode()
        cr = d.slot(F.Op.CREATE, parent,
                    [F.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644 | _stat.S_IFREG, 0, 0), name],
                    [ENTRY, F.OPEN_OUT.size], ext=ext)
        rel = d.slot(F.Op.RELEASE, 0, [F.RELEASE_IN.pack(0, os.O_RDWR, 0, 0)], [])
        un = d.slot(F.Op.UNLINK, parent, [name], [])
        forgets = [d.slot(F.Op.FORGET, 0, [F.FORGET_IN.pack(1)], [], queue=d.hq)
                   for _ in range(32)]
        free_f = list(forgets)
        fby = {s.head: s for s in forgets}
        hq = d.hq
        pc = time.perf_counter_ns
        deadline = pc() + int(duration * 1e9)
        k = base
        it = 0
        try:
            while True:
                t0 = pc()
                nm = f"c{k:09d}".encode()
                mm[cr.arg_offs[1]:cr.arg_offs[1] + 10] = nm
                mm[un.arg_offs[0]:un.arg_offs[0] + 10] = nm
                d.call(cr)
                nodeid = _U64.unpack_from(mm, cr.out_off + 16)[0]
                fh = _U64.unpack_from(mm, cr.out_off + 16 + ENTRY)[0]
                _U64.pack_into(mm, rel.in_off + 16, nodeid)
                _U64.pack_into(mm, rel.arg_offs[0], fh)
                d.call(rel)
                d.call(un)
                for h, _ln in hq.poll_used():
                    free_f.append(fby[h])
                while not free_f:
                    for h, _ln in d.wait(hq):
                        free_f.append(fby[h])
                f = free_f.pop()
                _U64.pack_into(mm, f.in_off + 16, nodeid)
                d.submit(f)
                if lat is not None:
                    lat.append(pc() - t0)
                k += 1
                it += 1
                if pc() >= deadline:
                    break
            while len(free_f) < len(forgets):
                for h, _ln in d.wait(hq):
                    free_f.append(fby[h])
        finally:
            self._churn_seq = k
            for s in (cr, rel, un, *forgets):
                s.release()
        return it, 3 * it, 0, {"unit": "create+release+unlink", "forgets": it}

    def finish(self):
        c = self.drv.c
        if self.lookups:
            c.forget(self.small.nodeid, self.lookups)
        c.release(self.big.nodeid, self.big_fh)


WORKLOADS = [
    # name, label, function, args
    ("null", "null (ENOSYS) QD1", "null", ()),
    ("getattr", "GETATTR QD1", "getattr", ()),
    ("lookup", "LOOKUP existing QD1", "lookup", ()),
    ("lookup_missing", "LOOKUP missing QD1", "lookup_missing", ()),
    ("read4k_qd1", "4 KiB READ random QD1", "read_small", (1,)),
    ("read4k_qd16", "4 KiB READ random QD16", "read_small", (16,)),
    ("read1m", "1 MiB READ seq QD1", "seq_io", (False,)),
    ("readdirplus", "READDIRPLUS 10k dir (listing)", "readdirplus", ("bufsize",)),
    ("create_unlink", "CREATE+RELEASE+UNLINK", "create_unlink", ()),
    ("write1m", "1 MiB WRITE seq QD1", "seq_io", (True,)),
]
WL_INDEX = {w[0]: w for w in WORKLOADS}


def memory_test(drv: Driver, pid: int, nfiles: int, qd: int = 16) -> dict:
    """RSS after LOOKUP of nfiles distinct files (the daemon keeps an inode for each)."""
    c = drv.c
    mdir = c.lookup(1, "mem").nodeid
    mm = drv.mm
    slots = [drv.slot(F.Op.LOOKUP, mdir, [b"f0000000\0"], [ENTRY]) for _ in range(qd)]

    def prep(s, i):
        mm[s.arg_offs[0]:s.arg_offs[0] + 8] = b"f%07d" % i

    warm = min(1000, nfiles // 10)
    seen = set()

    def on_done(s):
        seen.add(_U64.unpack_from(mm, s.out_off + 16)[0])
    try:
        drv.closed_loop(slots, prep, count=warm, on_done=on_done)
        time.sleep(0.2)
        st0 = proc_status(pid)
        t0 = time.perf_counter()

        def prep2(s, i):
            prep(s, i + warm)
        cpu0 = cpu_ns_sched(pid)      # ns resolution: this interval can be short
        drv.closed_loop(slots, prep2, count=nfiles - warm, on_done=on_done)
        el = time.perf_counter() - t0
        cpu = (cpu_ns_sched(pid) - cpu0) / 1e9
        time.sleep(0.2)
        st1 = proc_status(pid)
    finally:
        for s in slots:
            s.release()
    if len(seen) != nfiles:
        raise BenchError(f"memory test: {len(seen)} distinct node ids for {nfiles} files")
    n = nfiles - warm
    return {"files": nfiles, "rss_before": st0["VmRSS"], "rss_after": st1["VmRSS"],
            "rss_anon_before": st0.get("RssAnon"), "rss_anon_after": st1.get("RssAnon"),
            "open_fds_after": st1.get("open_fds"), "threads": st1.get("Threads"),
            "bytes_per_inode": (st1["VmRSS"] - st0["VmRSS"]) / n,
            "lookups_per_s_qd16": n / el, "daemon_cpu_us_per_lookup": cpu / n * 1e6,
            "measured_over": n}


# ----------------------------------------------------------------------------------------
# Profiling hook (py-spy on pyvirtiofsd)
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def maybe_profile(cfg, kind: str, pid: int, name: str):
    if not cfg.profile or kind != "py" or name in ("read1m", "write1m") and not cfg.profile_all:
        yield
        return
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not spy:
        raise BenchError("--profile needs py-spy (.venv/bin/pip install -r bench/requirements.txt)")
    os.makedirs(cfg.profile, exist_ok=True)
    procs = []
    for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
        out = os.path.join(cfg.profile, f"{name}.{ext}")
        procs.append(subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", str(cfg.profile_rate), "--format",
             fmt, "-o", out, "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    time.sleep(1.0)           # py-spy attaches
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------

def run_daemon(kind: str, cfg, workdir: str) -> dict:
    shared = os.path.join(workdir, f"share-{kind}")
    t = time.monotonic()
    make_dataset(shared, cfg.big_size, cfg.dir_entries, cfg.mem_files)
    log(f"[{kind}] data set ready in {time.monotonic() - t:.1f}s")
    res: dict = {"daemon": kind, "label": LABEL[kind], "workloads": {}}
    try:
        dm = Daemon(kind, shared, workdir, cfg.daemon_cpu, nofile=cfg.nofile,
                    settings=cfg.settings)
        try:
            drv = Driver.connect(dm.socket_path, queue_size=cfg.queue_size,
                                 ram_size=cfg.ram_size, spin_us=cfg.spin_us,
                                 seg_size=cfg.seg_size)
            init = drv.c.init_out
            res["init"] = {"minor": init.minor, "max_write": init.max_write,
                           "max_pages": init.max_pages, "flags": hex(init.flags)}
            res["pid_tree"] = proc_tree(dm.pid)
            res["argv"] = dm.argv
            res["settings"] = cfg.settings.record()
            sess = Session(drv, dm.pid, cfg)
            for name in cfg.workloads:
                _, label, fn, args = WL_INDEX[name]
                args = tuple(cfg.readdir_size if a == "bufsize" else a for a in args)
                with maybe_profile(cfg, kind, dm.pid, name):
                    r = sess.timed(getattr(sess, fn), *args)
                if r.pop("_entries_total", None) is not None:
                    r["entries_per_s"] = r["ops_per_s"] * r["entries_per_listing"]
                r["label"] = label
                res["workloads"][name] = r
                log(f"[{kind}] {label:32s} {fmt_rate(r):>14s}  cpu {r['daemon_cpu_us_per_op']:8.1f}"
                    f" us/op  p50 {r['p50_us']:8.1f} us  client {r['client_cpu_us_per_op']:.1f} us/op"
                    f"  other load {r['other_load_cpus']:.2f}")
            sess.finish()
            drv.close()
        finally:
            dm.stop()
        res["log_tail"] = dm.log()[-2000:]
        if cfg.mem_files:
            dm = Daemon(kind, shared, workdir, cfg.daemon_cpu, tag="-mem", nofile=cfg.nofile,
                        settings=cfg.settings)
            try:
                drv = Driver.connect(dm.socket_path, queue_size=cfg.queue_size,
                                     ram_size=16 * MiB, spin_us=cfg.spin_us,
                                     seg_size=cfg.seg_size)
                res["memory"] = memory_test(drv, dm.pid, cfg.mem_files)
                m = res["memory"]
                log(f"[{kind}] memory: RSS {m['rss_before'] / MiB:.1f} -> "
                    f"{m['rss_after'] / MiB:.1f} MiB after {cfg.mem_files} lookups: "
                    f"{m['bytes_per_inode']:.0f} B/inode")
                drv.close()
            finally:
                dm.stop()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return res


def median_of(runs: list[dict]) -> dict:
    """One daemon's rounds folded into one result: per workload the round with the median
    throughput (its other figures with it), every round's throughput and CPU/op listed."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[-1])
    out["workloads"] = {}
    for w in runs[0]["workloads"]:
        rs = sorted((r["workloads"][w] for r in runs), key=lambda r: r["ops_per_s"])
        med = dict(rs[len(rs) // 2])
        med["rounds_ops_per_s"] = [r["workloads"][w]["ops_per_s"] for r in runs]
        med["rounds_cpu_us_per_op"] = [r["workloads"][w]["daemon_cpu_us_per_op"] for r in runs]
        out["workloads"][w] = med
    mems = [r["memory"] for r in runs if "memory" in r]
    if mems:
        ms = sorted(mems, key=lambda m: m["bytes_per_inode"])
        out["memory"] = dict(ms[len(ms) // 2])
        out["memory"]["rounds_bytes_per_inode"] = [m["bytes_per_inode"] for m in mems]
    return out


def fmt_rate(r: dict) -> str:
    if r.get("gb_per_s") and r["gb_per_s"] > 0.05:
        return f"{r['gb_per_s']:.2f} GB/s"
    return f"{r['ops_per_s']:,.0f}/s"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def table(results: dict, kinds: list[str], client_key: str = "client_cpu_us_per_op") -> str:
    """Markdown tables: throughput with ratios, then CPU per op with ratios, latency."""
    others = [k for k in kinds if k != "py"]
    wl = [w[0] for w in WORKLOADS if any(w[0] in results[k]["workloads"] for k in kinds)]
    lines = []
    head = ["workload (unit)"] + [f"{k} ops/s" for k in kinds]
    if "py" in kinds:
        head += [f"py/{k} thr (higher=better)" for k in others]
    lines.append("### Throughput (operations per second; GB/s for data)\n")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w in wl:
        row = [f"{WL_INDEX[w][1]}"]
        vals = {}
        for k in kinds:
            r = results[k]["workloads"].get(w)
            vals[k] = r["ops_per_s"] if r else None
            if r is None:
                row.append("-")
            elif r.get("gb_per_s") and r["gb_per_s"] > 0.05:
                row.append(f"{r['ops_per_s']:,.0f} ({r['gb_per_s']:.2f} GB/s)")
            else:
                row.append(f"{r['ops_per_s']:,.0f}")
        if "py" in kinds:
            row += [fmt(ratio(vals["py"], vals[k])) for k in others]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\n### Daemon CPU time per operation (us; utime+stime from /proc/PID/stat)\n")
    head = ["workload"] + [f"{k} CPU us/op" for k in kinds]
    if "py" in kinds:
        head += [f"py/{k} CPU (lower=better)" for k in others]
    head += [f"client us/op ({kinds[0]} run)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w in wl:
        row = [WL_INDEX[w][1]]
        vals = {}
        for k in kinds:
            r = results[k]["workloads"].get(w)
            vals[k] = r["daemon_cpu_us_per_op"] if r else None
            row.append(fmt(vals[k], ".1f"))
        if "py" in kinds:
            row += [fmt(ratio(vals["py"], vals[k])) for k in others]
        ref = results[kinds[0]]["workloads"].get(w)
        row.append(fmt(ref[client_key] if ref else None, ".1f"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\n### Latency seen by the frontend (us): p50 / p90 / p99; other load = CPUs' "
                 "worth of unrelated work on the CPUs used, during the run (noise)\n")
    head = ["workload"] + [f"{k} p50/p90/p99" for k in kinds] + ["other load " + "/".join(kinds)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w in wl:
        row = [WL_INDEX[w][1]]
        for k in kinds:
            r = results[k]["workloads"].get(w)
            row.append("-" if r is None else
                       f"{r['p50_us']:.1f} / {r['p90_us']:.1f} / {r['p99_us']:.1f}")
        row.append(" / ".join(fmt(results[k]["workloads"].get(w, {}).get("other_load_cpus"))
                              for k in kinds))
        lines.append("| " + " | ".join(row) + " |")
    if any("memory" in results[k] for k in kinds):
        lines.append("\n### Memory: VmRSS after LOOKUP of N distinct files\n")
        head = ["daemon", "files", "RSS before (MiB)", "RSS after (MiB)", "bytes/inode",
                "open fds", "lookups/s QD16", "CPU us/lookup"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for k in kinds:
            m = results[k].get("memory")
            if not m:
                continue
            lines.append(f"| {k} | {m['files']} | {m['rss_before'] / MiB:.1f} | "
                         f"{m['rss_after'] / MiB:.1f} | {m['bytes_per_inode']:.0f} | "
                         f"{m['open_fds_after']} | {m['lookups_per_s_qd16']:,.0f} | "
                         f"{m['daemon_cpu_us_per_lookup']:.1f} |")
        if "py" in kinds:
            for k in others:
                a, b = results["py"].get("memory"), results[k].get("memory")
                if a and b:
                    lines.append(f"\npy/{k} bytes per inode (lower=better): "
                                 f"{a['bytes_per_inode'] / b['bytes_per_inode']:.2f}")
    return "\n".join(lines)


def plot(results: dict, kinds: list[str], path: str, subtitle: str = "") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot.  Install it with\n"
            f"  {sys.executable} -m pip install -r {REPO / 'bench' / 'requirements.txt'}")
        return False
    wl = [w for w in WORKLOADS if any(w[0] in results[k]["workloads"] for k in kinds)]
    names = [w[1] for w in wl]
    ref = "rust" if "rust" in kinds else kinds[0]
    colors = {"py": "#3572A5", "rust": "#DEA584", "c": "#555555"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    width = 0.8 / len(kinds)
    x = range(len(wl))

    def rel_spread(k, w, key, rounds_key):
        """(median, low, high) of the per-round ratios k/ref (rounds interleave the
        daemons); the median round's ratio when there is one round."""
        a, b = results[k]["workloads"].get(w), results[ref]["workloads"].get(w)
        if not a or not b:
            return None
        rs = [x / y for x, y in zip(a.get(rounds_key, []), b.get(rounds_key, [])) if y]
        if len(rs) < 2:
            rs = [a[key] / b[key]] if b.get(key) else []
        if not rs:
            return None
        rs.sort()
        return rs[len(rs) // 2] if len(rs) % 2 else (rs[len(rs) // 2 - 1] + rs[len(rs) // 2]) / 2, \
            rs[0], rs[-1]

    def bars(ax, key, title, log_scale=False, rel=None):
        for j, k in enumerate(kinds):
            ys, lo, hi = [], [], []
            for w in wl:
                r = results[k]["workloads"].get(w[0])
                v = r.get(key) if r else None
                if rel and v is not None:
                    m = rel_spread(k, w[0], key, rel)
                    v, lo_, hi_ = m if m else (0, 0, 0)
                    lo.append(v - lo_)
                    hi.append(hi_ - v)
                ys.append(v or 0)
            ax.bar([i + (j - (len(kinds) - 1) / 2) * width for i in x], ys, width,
                   label=LABEL[k], color=colors.get(k),
                   yerr=[lo, hi] if rel else None, capsize=2 if rel else 0)
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0][0], "ops_per_s", f"Throughput relative to {LABEL[ref]} (higher is better)\n"
         "median of the per-round ratios; whiskers: their range", rel="rounds_ops_per_s")
    axes[0][0].axhline(1.0, color="k", lw=0.8)
    bars(axes[0][1], "daemon_cpu_us_per_op", f"Daemon CPU per operation relative to "
         f"{LABEL[ref]} (lower is better)\nmedian of the per-round ratios; whiskers: their range",
         rel="rounds_cpu_us_per_op")
    axes[0][1].axhline(1.0, color="k", lw=0.8)
    bars(axes[1][0], "p50_us", "Latency p50 seen by the frontend, us (log; lower is better)",
         log_scale=True)
    ax = axes[1][1]
    mk = [k for k in kinds if "memory" in results[k]]
    ax.bar(range(len(mk)), [results[k]["memory"]["bytes_per_inode"] for k in mk],
           color=[colors.get(k) for k in mk])
    ax.set_xticks(range(len(mk)))
    ax.set_xticklabels([LABEL[k] for k in mk], fontsize=8)
    if mk:
        ax.set_title(f"RSS per cached inode after {results[mk[0]]['memory']['files']:,} "
                     "lookups, bytes (lower is better)", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("virtiofs daemons driven by the same vhost-user frontend (no guest)"
                 + (f"\n{subtitle}" if subtitle else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_subtitle(full: dict) -> str:
    """When and how the plotted run was taken, as the README's block says it."""
    entries = {k: (k, v) for k, v in full["daemons"].items()}
    alike = ("every daemon with the same settings" if tables.like_for_like(entries) else
             "NOT like for like: the daemons ran with different settings (see the README)")
    return f"{full['meta']['date']}, {alike}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB file, 1 s a workload, 20,000 files for the memory test")
    ap.add_argument("--daemons", default="py,rust,c", help="comma list of py, rust, c")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS),
                    help="comma list of: " + ", ".join(w[0] for w in WORKLOADS))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "daemon.json"))
    ap.add_argument("--duration", type=float, help="seconds measured a workload (3; quick 1)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up a workload (0.5; quick 0.3)")
    ap.add_argument("--big-size", type=int, help="MiB of the sequential I/O file (1024; quick 256)")
    ap.add_argument("--mem-files", type=int, help="files looked up for the memory figure "
                    "(100000; quick 20000; 0 = skip)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all daemons (interleaved); the median round is reported")
    ap.add_argument("--dir-entries", type=int, default=10000)
    ap.add_argument("--readdir-size", type=int, default=PAGE,
                    help="READDIRPLUS buffer (Linux 6.1 asks for one page)")
    ap.add_argument("--seg-size", type=int, default=PAGE,
                    help="descriptor size data is split into (Linux: a page)")
    ap.add_argument("--queue-size", type=int, default=1024)
    ap.add_argument("--placement", choices=["same", "split", "free"], default="same",
                    help="same (default): generator and daemon pinned to one CPU, the generator "
                    "sleeping while it waits (a synchronous ping-pong: the least noisy here, "
                    "and no cross-CPU wake-ups, which cost ~10-30 us each in this nested VM); "
                    "split: generator on one CPU busy-polling, daemon on another; free: no "
                    "pinning")
    ap.add_argument("--spin-us", type=float, default=None,
                    help="the generator busy-polls the used ring this long before sleeping "
                    "(0 with --placement=same, else 1000)")
    ap.add_argument("--base-dir", default=None, help="where the shared directories go "
                    "(default: the temp dir, here ext4)")
    ap.add_argument("--profile", metavar="DIR",
                    help="record py-spy profiles of pyvirtiofsd (small-request workloads) in DIR")
    ap.add_argument("--profile-all", action="store_true", help="profile the 1 MiB ones too")
    ap.add_argument("--profile-rate", type=int, default=500)
    daemon_settings.add_arguments(ap)
    ap.add_argument("--plot-only", metavar="JSON",
                    help="run nothing: redraw JSON's PNG (beside it) from its results")
    cfg = ap.parse_args(argv)
    if cfg.plot_only:
        with open(cfg.plot_only) as f:
            full = json.load(f)
        res = full["daemons"]
        png = os.path.splitext(cfg.plot_only)[0] + ".png"
        if not plot(res, list(res), png, plot_subtitle(full)):
            return 1
        log(f"wrote {png}")
        return 0
    kinds = [k.strip() for k in cfg.daemons.split(",") if k.strip()]
    cfg.settings = daemon_settings.from_arguments(cfg, cache="auto")
    for k in kinds:
        if k not in DAEMON_KINDS:
            ap.error(f"unknown daemon {k!r}")
        try:
            cfg.settings.check(k)
        except daemon_settings.UnsupportedSettings as e:
            ap.error(str(e))
    cfg.workloads = [w.strip() for w in cfg.workloads.split(",") if w.strip()]
    for w in cfg.workloads:
        if w not in WL_INDEX:
            ap.error(f"unknown workload {w!r}")
    q = cfg.quick
    cfg.duration = cfg.duration or (1.0 if q else 3.0)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (0.3 if q else 0.5)
    cfg.big_size = (cfg.big_size or (256 if q else 1024)) * MiB
    cfg.mem_files = cfg.mem_files if cfg.mem_files is not None else (20000 if q else 100000)
    cfg.ram_size = 64 * MiB
    cpus = sorted(os.sched_getaffinity(0))
    ncpu = len(cpus)
    cfg.daemon_cpu = None
    cfg.cpus_used = cpus
    if cfg.placement == "same":
        cfg.spin_us = 0.0 if cfg.spin_us is None else cfg.spin_us
        os.sched_setaffinity(0, {cpus[-1]})
        cfg.daemon_cpu = cpus[-1]
        cfg.cpus_used = [cpus[-1]]
    elif cfg.placement == "split":
        if ncpu < 2:
            ap.error("--placement=split needs two CPUs")
        os.sched_setaffinity(0, {cpus[0]})
        cfg.daemon_cpu = cpus[1]
        cfg.cpus_used = cpus[:2]
    if cfg.spin_us is None:
        cfg.spin_us = 1000.0
    # Every cached inode holds an fd: let the daemons (our children) have a million, or as
    # many as this machine allows (raising the hard limit needs CAP_SYS_RESOURCE).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1 << 20), max(hard, 1 << 20)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cfg.nofile = min(hard, 1000000)
    cfg.mem_files_requested = cfg.mem_files
    if cfg.mem_files > cfg.nofile - 1000:
        cfg.mem_files = max(0, cfg.nofile - 1000)
        log(f"note: RLIMIT_NOFILE hard limit is {hard} and cannot be raised here; every cached "
            f"inode holds an fd in all three daemons, so the memory test looks up "
            f"{cfg.mem_files} files instead of {cfg.mem_files_requested}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)

    Measure.cpus = None if cfg.placement == "free" else cfg.cpus_used
    workdir = tempfile.mkdtemp(prefix="daemon-bench-", dir=cfg.base_dir)
    rounds: dict = {k: [] for k in kinds}
    loadavg_start = os.getloadavg()
    commit = tables.git_commit(REPO)     # the code that runs, before anything can change it
    build = tables.pyvirtiofs_build() if "py" in kinds else None
    t0 = time.monotonic()
    try:
        for rnd in range(cfg.repeat):
            for k in kinds:
                if cfg.repeat > 1:
                    log(f"--- round {rnd + 1}/{cfg.repeat}: {k}")
                rounds[k].append(run_daemon(k, cfg, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {k: median_of(rounds[k]) for k in kinds}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
        "commit": commit, "cpu_model": tables.cpu_model(),
        "settings": cfg.settings.record(), "pyvirtiofs_build": build,
        "kernel": platform.release(), "python": platform.python_version(), "cpus": ncpu,
        "placement": cfg.placement, "cpus_used": cfg.cpus_used, "quick": q,
        "repeat": cfg.repeat, "duration_s": cfg.duration,
        "warmup_s": cfg.warmup, "big_file_bytes": cfg.big_size, "queue_size": cfg.queue_size,
        "seg_size": cfg.seg_size, "readdir_size": cfg.readdir_size, "spin_us": cfg.spin_us,
        "mem_files": cfg.mem_files, "mem_files_requested": cfg.mem_files_requested,
        "rlimit_nofile": cfg.nofile, "dir_entries": cfg.dir_entries,
        "base_dir": cfg.base_dir or tempfile.gettempdir(),
        "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    out = {"meta": meta, "daemons": results}
    with open(cfg.out, "w") as f:
        json.dump(out, f, indent=1)
    md = table(results, kinds, "client_cpu_us_per_op" if cfg.spin_us == 0 else "client_us_per_op")
    print(md)
    png = os.path.splitext(cfg.out)[0] + ".png"
    if plot(results, kinds, png, plot_subtitle(out)):
        log(f"wrote {cfg.out} and {png}")
    else:
        log(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

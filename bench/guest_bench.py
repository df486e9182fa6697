#!/usr/bin/env python3
"""Guest-level benchmark: pyvirtiofsd against the Rust virtiofsd and QEMU's virtio-9p, as a
real Linux guest sees them.

    .venv/bin/python bench/guest_bench.py [--quick] [--reps N] [--out bench/results/guest.json]
    bash scripts/bench-guest.sh [same options]          # set-up included

ONE guest boot (QEMU, TCG unless $PYVIRTIOFS_ACCEL=kvm, 1 vCPU by default, 2 GiB) mounts three
shares whose host directories hold IDENTICAL trees:

* ``pyv``   pyvirtiofsd  ``python -m pyvirtiofs --socket-path=S --shared-dir=D OPTIONS``
* ``rust``  Rust virtiofsd 1.13.2  ``--socket-path=S --shared-dir=D OPTIONS``
* ``ninep`` QEMU's virtio-9p, mounted ``trans=virtio,version=9p2000.L,msize=512000,cache=mmap``

OPTIONS are the same for both daemons (bench/daemon_settings.py), recorded in the JSON:
``--sandbox=chroot --seccomp=kill --cache=auto --thread-pool-size=0`` unless --sandbox,
--seccomp or --thread-pool-size say otherwise.

The guest root is the host's ``/`` (read-only, over 9p), so the host's fio, tar, find, du, git
and python3 run inside the guest.  A Python driver (embedded below, standard library only)
runs every workload on each share in turn and times it with ``time.monotonic()`` inside the
guest.  The shares go in lockstep (one workload on all three shares, then the next workload),
so that figures compared side by side were taken seconds apart; the order of the shares
rotates from one repetition to the next, and the table shows the median over the repetitions.
Before the first repetition an untimed warm-up loads the programs and writes and reads a file
on every share, so that no share pays for going first.  Workloads (sizes for the full run; ``--quick`` in brackets):

* fio sequential write then read, 1 MiB blocks, 256 MiB file [128 MiB], psync, buffered I/O
  (the share's cache mode), drop_caches before the read.  No fsync: virtiofs with cache=auto
  (no writeback cache) and 9p with cache=mmap are both write-through, so every byte has reached
  the server when write() returns; no host-disk flush is in the figures.
* fio 4 KiB random read of that file, 16,384 reads [4,096], after drop_caches: psync; libaio
  iodepth 16 (buffered, as the share's cache mode serves it: Linux completes buffered AIO
  reads inline, so this is queue depth 1 in practice); and libaio iodepth 16 with O_DIRECT
  (16 requests really in flight).  fio's random map visits every block at most once, so no
  read hits the page cache.
* create, stat, unlink of 10,000 empty files [2,000] in one directory (drop_caches between
  create and stat).
* tar -x of the Python standard library (the guest python3's stdlib minus site-packages and
  dist-packages: ~1,400 files, ~54 MB), from the guest's tmpfs into the share.
* find and du -s over the extracted tree, each after drop_caches; then rm -rf of it.
* git status in a repository (that same stdlib, committed on the host and copied into each
  share beforehand): one untimed status refreshes the index, then a timed one after
  drop_caches (cold) and a timed one right after (warm).

9p's cache mode: cache=mmap, i.e. the default (no data caching; read/write go to the server,
coherent) plus the page-cache mmap that git needs.  It is the closest 9p counterpart of
virtiofs cache=auto for the write path (write-through, coherent); cache=loose would give 9p a
write-back page cache and never-revalidated dentries (like virtiofs cache=always plus a
writeback cache), so it is available as ``--ninep-cache loose`` but not the default.

The guest's vCPU (TCG) and the daemons want a core each, so other work on the host skews
the figures: the host CPU time used by processes that are not ours is sampled during the run
and reported (``--wait-idle SECS`` waits for a quiet host before booting).

The JSON goes to --out (default bench/results/guest.json): every repetition's raw figures, the
medians, the order of the shares, the guest's output and the tails of the daemons' logs.  A
workload that fails on one share is recorded as failed (with fio's/tar's error) and the rest
goes on; a daemon that dies makes the guest stop, and the figures gathered until then are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import daemon_settings  # noqa: E402  (OPTIONS: the same sandbox, seccomp, cache for both)
import tables  # noqa: E402

SHARES = ("pyv", "rust", "ninep")
LABELS = {"pyv": "pyvirtiofsd", "rust": "Rust virtiofsd", "ninep": "9p"}

#: (key, description, unit, better)
WORKLOADS = (
    ("seq_write_1m", "fio seq write 1 MiB", "MB/s", "higher"),
    ("seq_read_1m", "fio seq read 1 MiB (cold)", "MB/s", "higher"),
    ("randread_4k_psync", "fio randread 4 KiB psync", "IOPS", "higher"),
    ("randread_4k_libaio16", "fio randread 4 KiB libaio qd16 (buffered)", "IOPS", "higher"),
    ("randread_4k_libaio16_direct", "fio randread 4 KiB libaio qd16 O_DIRECT", "IOPS", "higher"),
    ("meta_create", "create N files", "s", "lower"),
    ("meta_stat", "stat N files (cold)", "s", "lower"),
    ("meta_unlink", "unlink N files", "s", "lower"),
    ("meta_total", "create+stat+unlink N files", "s", "lower"),
    ("untar", "tar -x stdlib", "s", "lower"),
    ("find", "find tree (cold)", "s", "lower"),
    ("du", "du -s tree (cold)", "s", "lower"),
    ("rm_rf", "rm -rf tree", "s", "lower"),
    ("git_status_cold", "git status (cold)", "s", "lower"),
    ("git_status_warm", "git status (warm)", "s", "lower"),
)

# --------------------------------------------------------------------------
# The guest side: runs under the guest's (= the host's) /usr/bin/python3, standard library only.
# --------------------------------------------------------------------------

GUEST_DRIVER = r'''
import json, os, subprocess, sys, time, traceback

cfg = json.load(open(sys.argv[1]))
DEVNULL = subprocess.DEVNULL

def emit(kind, **kw):
    kw["kind"] = kind
    sys.stdout.write("GBENCH " + json.dumps(kw) + "\n")
    sys.stdout.flush()

def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")

def run(cmd, cwd=None, timeout=None, out=False):
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, stdin=DEVNULL, stdout=subprocess.PIPE if out else DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout or cfg["cmd_timeout"])
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError("%s exited %d: %s" % (" ".join(cmd[:3]), r.returncode,
                           r.stderr.decode("utf-8", "replace").strip()[-400:]))
    return dt, (r.stdout.decode("utf-8", "replace") if out else "")

def fio(path, rw, bs, extra=()):
    cmd = ["fio", "--output-format=json", "--thread", "--name=gb", "--filename=" + path,
           "--rw=" + rw, "--bs=" + bs, "--size=%dM" % cfg["file_mib"], "--ioengine=psync",
           "--randrepeat=1", "--fallocate=none", *extra]
    dt, out = run(cmd, out=True)
    j = json.loads(out[out.index("{"):])
    job = j["jobs"][0]
    if job.get("error"):
        raise RuntimeError("fio error %s" % job["error"])
    d = job["write" if "write" in rw else "read"]
    return {"bw_MBps": d["bw_bytes"] / 1e6, "iops": d["iops"], "io_bytes": d["io_bytes"],
            "fio_runtime_s": d["runtime"] / 1000.0, "wall_s": dt,
            "lat_mean_us": d.get("clat_ns", {}).get("mean", 0) / 1000.0}

def workloads(mp):
    w = os.path.join(mp, "w")
    os.makedirs(w, exist_ok=True)
    dat = os.path.join(w, "fio.dat")
    n = cfg["files"]
    rio = "--io_size=%dk" % (4 * cfg["rand_ios"])

    def seq_write():
        if os.path.exists(dat):
            os.unlink(dat)
        drop_caches()
        r = fio(dat, "write", "1M")
        return r["bw_MBps"], r
    yield "seq_write_1m", seq_write

    def seq_read():
        drop_caches()
        r = fio(dat, "read", "1M")
        return r["bw_MBps"], r
    yield "seq_read_1m", seq_read

    def rr_psync():
        drop_caches()
        r = fio(dat, "randread", "4k", [rio])
        return r["iops"], r
    yield "randread_4k_psync", rr_psync

    def rr_aio():
        drop_caches()
        r = fio(dat, "randread", "4k", [rio, "--ioengine=libaio", "--iodepth=16"])
        return r["iops"], r
    yield "randread_4k_libaio16", rr_aio

    def rr_aio_direct():
        drop_caches()
        r = fio(dat, "randread", "4k", [rio, "--ioengine=libaio", "--iodepth=16", "--direct=1"])
        return r["iops"], r
    yield "randread_4k_libaio16_direct", rr_aio_direct

    def cleanup_fio():
        if os.path.exists(dat):
            os.unlink(dat)
        return None, None
    yield None, cleanup_fio

    meta = {}
    def m_create():
        d = os.path.join(w, "meta")
        if os.path.isdir(d):
            for e in os.listdir(d):
                os.unlink(os.path.join(d, e))
        else:
            os.mkdir(d)
        names = [os.path.join(d, "f%06d" % i) for i in range(n)]
        meta["d"], meta["names"] = d, names
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        t0 = time.monotonic()
        for p in names:
            os.close(os.open(p, flags, 0o644))
        dt = time.monotonic() - t0
        meta["create"] = dt
        return dt, {"files": n}
    yield "meta_create", m_create

    def m_stat():
        drop_caches()
        t0 = time.monotonic()
        for p in meta["names"]:
            os.stat(p)
        dt = time.monotonic() - t0
        meta["stat"] = dt
        return dt, None
    yield "meta_stat", m_stat

    def m_unlink():
        t0 = time.monotonic()
        for p in meta["names"]:
            os.unlink(p)
        dt = time.monotonic() - t0
        meta["unlink"] = dt
        os.rmdir(meta["d"])
        return dt, None
    yield "meta_unlink", m_unlink

    tree = os.path.join(w, "untar")
    def untar():
        if os.path.exists(tree):
            run(["rm", "-rf", tree])
        os.mkdir(tree)
        drop_caches()
        dt, _ = run(["tar", "-xf", cfg["tarball"], "-C", tree])
        return dt, None
    yield "untar", untar

    def find():
        drop_caches()
        dt, out = run(["find", tree], out=True)
        return dt, {"entries": out.count("\n")}
    yield "find", find

    def du():
        drop_caches()
        dt, out = run(["du", "-s", tree], out=True)
        return dt, {"du": out.split()[0] if out.split() else ""}
    yield "du", du

    def rm_rf():
        dt, _ = run(["rm", "-rf", tree])
        return dt, None
    yield "rm_rf", rm_rf

    repo = os.path.join(mp, "repo")
    git = ["git", "-c", "safe.directory=*", "-C", repo]
    def git_cold():
        run(git + ["status", "--porcelain"])         # refreshes the index (untimed)
        drop_caches()
        dt, out = run(git + ["status", "--porcelain"], out=True)
        return dt, {"changed_lines": len(out.splitlines())}
    yield "git_status_cold", git_cold

    def git_warm():
        dt, out = run(git + ["status", "--porcelain"], out=True)
        return dt, {"changed_lines": len(out.splitlines())}
    yield "git_status_warm", git_warm

    # meta_total last: the sum of the three phases above
    def total():
        if None in (meta.get("create"), meta.get("stat"), meta.get("unlink")):
            raise RuntimeError("a create/stat/unlink phase failed")
        return meta["create"] + meta["stat"] + meta["unlink"], None
    yield "meta_total", total


def main():
    shares = cfg["shares"]
    mps = set(shares.values())
    with open("/proc/mounts") as f:
        mounts = [l.strip() for l in f if l.split()[1] in mps]
    emit("start", uname=os.uname().release, cpus=os.cpu_count(), mounts=mounts)
    # The tarball travels in the first share; copy it into the guest's tmpfs first (untimed).
    t0 = time.monotonic()
    src = os.path.join(shares[cfg["order"][0][0]], "stdlib.tar")
    with open(src, "rb") as f, open(cfg["tarball"], "wb") as g:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            g.write(b)
    emit("info", msg="tarball copied in %.2f s" % (time.monotonic() - t0))
    # Warm-up (untimed): load the programs from the host root, and let every share and the
    # guest's page allocator see a first write, so that no share pays for being first.
    t0 = time.monotonic()
    for prog in (["fio", "--version"], ["tar", "--version"], ["find", "--version"],
                 ["du", "--version"], ["git", "--version"], ["rm", "--version"]):
        run(prog)
    for name in cfg["order"][0]:
        p = os.path.join(shares[name], "warmup.dat")
        try:
            fio(p, "write", "1M")
            drop_caches()
            fio(p, "read", "1M")
            os.unlink(p)
        except Exception as e:
            emit("info", msg="warm-up on %s failed: %s" % (name, e))
    emit("info", msg="warm-up done in %.2f s" % (time.monotonic() - t0))
    # Lockstep: each workload runs on every share (in this repetition's order) before the
    # next workload starts, so that the figures compared side by side are seconds apart.
    for rep, order in enumerate(cfg["order"]):
        emit("progress", msg="rep %d, order %s" % (rep + 1, " ".join(order)))
        steps = {}
        for name in order:
            try:
                steps[name] = list(workloads(shares[name]))
            except Exception as e:
                emit("error", rep=rep, share=name, workload="setup",
                     error="%s: %s" % (type(e).__name__, e))
        nsteps = max((len(v) for v in steps.values()), default=0)
        for i in range(nsteps):
            for name in order:
                if name not in steps:
                    continue
                key, fn = steps[name][i]
                t1 = time.monotonic()
                try:
                    value, detail = fn()
                except Exception as e:
                    if key:
                        emit("error", rep=rep, share=name, workload=key,
                             error="%s: %s" % (type(e).__name__, e))
                    continue
                if key:
                    emit("result", rep=rep, share=name, workload=key, value=value, detail=detail,
                         elapsed=time.monotonic() - t1)
    emit("end")

main()
'''



# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"guest_bench: {msg}", file=sys.stderr, flush=True)


def ensure_fio() -> str:
    """fio on the host (the guest runs the host's binaries); apt-get install it if missing."""
    path = shutil.which("fio")
    if path:
        return path
    if os.geteuid() != 0:
        raise SystemExit("guest_bench: fio is not installed and we are not root; run "
                         "`apt-get install -y fio` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600", "fio"]
    log("installing fio (apt-get install -y fio)")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-o", "DPkg::Lock::Timeout=600"], env=env,
                       capture_output=True, text=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    path = shutil.which("fio")
    if r.returncode != 0 or not path:
        raise SystemExit(f"guest_bench: could not install fio (apt-get exit {r.returncode}):\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    return path


def guest_stdlib() -> Path:
    """The standard library of the python3 the guest runs (the host's /usr/bin/python3)."""
    py = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "/usr/bin/python3"
    r = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                       capture_output=True, text=True, check=True)
    return Path(r.stdout.strip())


def prepare_trees(work: Path, names: list[str]) -> dict:
    """stdlib.tar and a git repository of the same tree, copied identically into each share."""
    stdlib = guest_stdlib()
    tarball = work / "stdlib.tar"
    subprocess.run(["tar", "-C", str(stdlib.parent), "-cf", str(tarball),
                    "--exclude=site-packages", "--exclude=dist-packages", stdlib.name],
                   check=True)
    src = work / "repo-src"
    src.mkdir()
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(src)], check=True)
    genv = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost",
                GIT_CONFIG_NOSYSTEM="1", HOME=str(work))
    for cmd in (["init", "-q"], ["add", "-A", "-f", "."], ["commit", "-q", "-m", "stdlib"]):
        subprocess.run(["git", "-C", str(src), *cmd], env=genv, check=True)
    files = int(subprocess.run(["git", "-C", str(src), "ls-files"], env=genv, check=True,
                               capture_output=True, text=True).stdout.count("\n"))
    dirs = {}
    for n in names:
        d = work / f"share-{n}"
        d.mkdir()
        shutil.copy2(tarball, d / "stdlib.tar")
        subprocess.run(["cp", "-a", str(src), str(d / "repo")], check=True)
        dirs[n] = d
    shutil.rmtree(src)
    return {"dirs": dirs, "stdlib": str(stdlib), "tar_bytes": tarball.stat().st_size,
            "tar_files": files}


def median(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def fmt_val(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v:,.0f}"
    if unit == "MB/s":
        return f"{v:,.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def summarise(results: list[dict], errors: list[dict], names: list[str]) -> dict:
    summ: dict = {}
    for key, desc, unit, better in WORKLOADS:
        row: dict = {"description": desc, "unit": unit, "better": better}
        for n in names:
            vals = [r["value"] for r in results if r["share"] == n and r["workload"] == key]
            errs = [e["error"] for e in errors if e["share"] == n and e["workload"] == key]
            best = (max(vals) if better == "higher" else min(vals)) if vals else None
            row[n] = {"median": median(vals), "best": best, "values": vals, "errors": errs}
        summ[key] = row
    return summ


def table(summ: dict, names: list[str], nfiles: int, stat: str = "median") -> str:
    cols = [LABELS[n] for n in names]
    ratios = [o for o in ("rust", "ninep") if o in names and "pyv" in names]
    head = ["workload", "unit", "better", *cols, *[f"pyv/{LABELS[o]}" for o in ratios]]
    rows = []
    for key, desc, unit, better in WORKLOADS:
        row = summ[key]
        cells = [desc.replace(" N ", f" {nfiles:,} "), unit, better]
        for n in names:
            c = row[n]
            if c[stat] is None:
                cells.append("FAIL: " + (c["errors"][0][:60] if c["errors"] else "no result"))
            else:
                s = fmt_val(c[stat], unit)
                if c["errors"]:
                    s += f" ({len(c['errors'])} failed)"
                cells.append(s)
        for o in ratios:
            a, b = row["pyv"][stat], row[o][stat]
            cells.append(f"{a / b:.2f}" if a is not None and b else "-")
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def log_findings(text: str) -> list[str]:
    pat = re.compile(r"Traceback|\bERROR\b|\bError\b|\bWARN(ING)?\b|exception|panic", re.I)
    return [l for l in text.splitlines() if pat.search(l)]


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]          # all but idle and iowait (guest time is in user)


def _our_jiffies() -> int:
    """utime+stime of this process and all its descendants (QEMU, the daemons)."""
    me = os.getpid()
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        parent[int(d)] = int(rest[1])
        ticks[int(d)] = int(rest[11]) + int(rest[12])
    total = 0
    for pid, t in ticks.items():
        p, hops = pid, 0
        while p and p != me and hops < 64:
            p, hops = parent.get(p, 0), hops + 1
        if p == me:
            total += t
    return total


class ForeignLoad:
    """Samples how much host CPU went to processes that are not ours (other jobs on the
    machine disturb the figures: QEMU's TCG vCPU and the daemons want a core each)."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self.loadavg_start = open("/proc/loadavg").read().split()[:3]
        self.loadavg_end: list[str] = []

    def _run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        b0, o0, t0 = _busy_jiffies(), _our_jiffies(), time.monotonic()
        while not self._stop.wait(self.interval):
            b1, o1, t1 = _busy_jiffies(), _our_jiffies(), time.monotonic()
            self.samples.append(max(0.0, ((b1 - b0) - (o1 - o0)) / hz / (t1 - t0)))
            b0, o0, t0 = b1, o1, t1

    def start(self) -> "ForeignLoad":
        self._th.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._th.join(10)
        self.loadavg_end = open("/proc/loadavg").read().split()[:3]
        s = self.samples
        return {"foreign_cpu_cores_mean": round(statistics.mean(s), 3) if s else None,
                "foreign_cpu_cores_max": round(max(s), 3) if s else None,
                "intervals_over_0.25_core": sum(1 for x in s if x > 0.25), "intervals": len(s),
                "loadavg_start": self.loadavg_start, "loadavg_end": self.loadavg_end}


def wait_idle(limit: float, threshold: float = 0.25, window: float = 5.0) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + limit
    while True:
        b0, o0, t0 = _busy_jiffies(), _our_jiffies(), time.monotonic()
        time.sleep(window)
        b1, o1, t1 = _busy_jiffies(), _our_jiffies(), time.monotonic()
        load = max(0.0, ((b1 - b0) - (o1 - o0)) / hz / (t1 - t0))
        if load < threshold:
            log(f"host is quiet enough ({load:.2f} cores used by others)")
            return
        if time.monotonic() > deadline:
            log(f"host still busy ({load:.2f} cores used by others); starting anyway")
            return
        log(f"waiting for the host to calm down ({load:.2f} cores used by others)")


def tail_progress(path: Path, stop: threading.Event) -> None:
    """Echo the guest's progress lines (out.log of the kept run directory) while it runs."""
    pos = 0
    buf = ""
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
                pos += len(data)
        except FileNotFoundError:
            data = b""
        buf += data.decode("utf-8", "replace")
        *lines, buf = buf.split("\n")
        for l in lines:
            if not l.startswith("GBENCH "):
                continue
            try:
                m = json.loads(l[7:])
            except ValueError:
                continue
            if m["kind"] in ("progress", "info"):
                log(f"[guest] {m['msg']}")
            elif m["kind"] == "result":
                log(f"[guest]   {m['workload']:<28} {m['share']:<6} {m['value']:10.4g}  "
                    f"({m['elapsed']:.1f} s)")
            elif m["kind"] == "error":
                log(f"[guest]   {m['workload']:<28} {m['share']:<6} FAILED {m['error'][:200]}")
        stop.wait(1.0)


def daemon_argv(share: str, sock: str, shared_dir: str,
                settings: daemon_settings.DaemonSettings, rust_bin: str | None) -> list[str]:
    """A virtiofs share's daemon command line, with the settings every daemon gets."""
    if share == "pyv":
        return [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                f"--shared-dir={shared_dir}", *settings.options("py")]
    if share == "rust":
        return [rust_bin or "virtiofsd", f"--socket-path={sock}", f"--shared-dir={shared_dir}",
                *settings.options("rust")]
    raise ValueError(share)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (~3 min)")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions, share order rotated each time (default 3; --quick 2)")
    ap.add_argument("--smp", type=int, default=1, help="guest vCPUs (default 1)")
    ap.add_argument("--mem", default="2G")
    ap.add_argument("--ninep-cache", default="mmap", choices=("none", "mmap", "loose"),
                    help="9p cache mode (default mmap: write-through, coherent, like "
                         "virtiofs cache=auto on the write path)")
    ap.add_argument("--shares", default=",".join(SHARES),
                    help="comma-separated subset of pyv,rust,ninep")
    ap.add_argument("--file-mib", type=int, default=None, help="fio file size (256; --quick 64)")
    ap.add_argument("--files", type=int, default=None, help="create/stat/unlink count "
                    "(10000; --quick 2000)")
    ap.add_argument("--workdir", default=None,
                    help="where the share directories go (default: a new folder in /var/tmp)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECS",
                    help="before booting, wait up to SECS for other processes to use less "
                         "than a quarter of a core (default 0: do not wait)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--timeout", type=float, default=None, help="guest timeout in seconds")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "guest.json"))
    daemon_settings.add_arguments(ap)
    a = ap.parse_args(argv)
    settings = daemon_settings.from_arguments(a, cache="auto")

    names = [n.strip() for n in a.shares.split(",") if n.strip()]
    for n in names:
        if n not in SHARES:
            ap.error(f"unknown share {n!r}")
    reps = a.reps or (2 if a.quick else 3)
    file_mib = a.file_mib or (128 if a.quick else 256)
    nfiles = a.files or (2000 if a.quick else 10000)
    rand_ios = 4096 if a.quick else 16384
    if rand_ios * 4096 > file_mib << 20:
        rand_ios = (file_mib << 20) // 4096

    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO))
    from pyvirtiofs.testing.guestvm import (DaemonProcess, GuestError, Share, run_guest,
                                            ensure_host_tools)
    ensure_host_tools()
    fio_path = ensure_fio()
    fio_version = subprocess.run([fio_path, "--version"], capture_output=True,
                                 text=True).stdout.strip()
    rust_bin = None
    if "rust" in names:
        from tests.peers import find_rust_virtiofsd
        rust_bin = find_rust_virtiofsd()
        log(f"Rust virtiofsd: {rust_bin}")

    base = a.workdir or os.environ.get("PYVIRTIOFS_BENCH_DIR") or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pyvfs-gbench-", dir=base))
    sockdir = Path(tempfile.mkdtemp(prefix="pvgb-", dir="/tmp"))
    log(f"work directory {work}")
    t_start = time.monotonic()
    commit = tables.git_commit(REPO)     # the code that runs, before anything can change it
    try:
        trees = prepare_trees(work, names)
        log(f"trees: {trees['stdlib']} -> {trees['tar_files']} files, "
            f"{trees['tar_bytes'] / 1e6:.1f} MB tar, copied into {len(names)} shares")
        mounts = {"pyv": "/mnt/pyv", "rust": "/mnt/rust", "ninep": "/mnt/ninep"}
        order = [names[r % len(names):] + names[:r % len(names)] for r in range(reps)]
        cfg = {"shares": {n: mounts[n] for n in names}, "order": order, "files": nfiles,
               "file_mib": file_mib, "rand_ios": rand_ios, "tarball": "/tmp/stdlib.tar",
               "cmd_timeout": 900}
        script = ("cat > /tmp/gb_driver.py <<'GB_DRIVER_EOF'\n" + GUEST_DRIVER +
                  "\nGB_DRIVER_EOF\n"
                  "cat > /tmp/gb_config.json <<'GB_CONFIG_EOF'\n" + json.dumps(cfg) +
                  "\nGB_CONFIG_EOF\n"
                  "exec python3 -u /tmp/gb_driver.py /tmp/gb_config.json\n")

        daemons: dict[str, DaemonProcess] = {}
        shares = []
        argvs = {}
        for n in names:
            d = str(trees["dirs"][n])
            if n == "ninep":
                shares.append(Share("ninep", ninep_dir=d, mountpoint=mounts[n],
                                    mount_opts=f"cache={a.ninep_cache}"))
                continue
            sock = str(sockdir / f"{n}.sock")
            argv = daemon_argv(n, sock, d, settings, rust_bin)
            argvs[n] = argv
            env = dict(os.environ)
            env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"]
                                                     if env.get("PYTHONPATH") else "")
            daemons[n] = DaemonProcess(argv, sock, log_path=work / f"{n}.log", env=env).start()
            shares.append(Share(n, socket=sock, mountpoint=mounts[n]))

        guest_dir = work / "guest"
        guest_dir.mkdir()
        timeout = a.timeout or (600 if a.quick else 1800)
        stop = threading.Event()
        th = threading.Thread(target=tail_progress, args=(guest_dir / "out.log", stop),
                              daemon=True)
        th.start()
        guest_error = None
        status = None
        if a.wait_idle > 0:
            wait_idle(a.wait_idle)
        load = ForeignLoad().start()
        t0 = time.monotonic()
        try:
            r = run_guest(script, shares, hostroot=True, mem=a.mem, smp=a.smp, timeout=timeout,
                          daemons=list(daemons.values()), keep_dir=str(guest_dir))
            status = r.status
            output = r.output
        except GuestError as e:
            guest_error = str(e)
            output = (guest_dir / "out.log").read_text(errors="replace") \
                if (guest_dir / "out.log").exists() else ""
            log(f"GUEST FAILED: {guest_error[:3000]}")
        finally:
            stop.set()
            th.join(5)
            host_load = load.stop()
        wall = time.monotonic() - t0
        for d in daemons.values():
            d.stop()

        msgs = []
        for l in output.splitlines():
            if l.startswith("GBENCH "):
                try:
                    msgs.append(json.loads(l[7:]))
                except ValueError:
                    pass
        results = [m for m in msgs if m["kind"] == "result"]
        errors = [m for m in msgs if m["kind"] == "error"]
        start = next((m for m in msgs if m["kind"] == "start"), {})
        finished = any(m["kind"] == "end" for m in msgs)
        if status not in (None, 0):
            log(f"guest script exited with status {status}")
        other = [l for l in output.splitlines() if not l.startswith("GBENCH ")]

        summ = summarise(results, errors, names)
        md = table(summ, names, nfiles)
        md_best = table(summ, names, nfiles, "best")
        daemon_logs = {}
        for n, d in daemons.items():
            text = d.log
            daemon_logs[n] = {"argv": argvs[n], "settings": settings.record(),
                              "exit_status": d.returncode,
                              "findings": log_findings(text)[-50:],
                              "tail": text.splitlines()[-30:], "bytes": len(text)}
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True).stdout.splitlines()[0]
        rust_version = (subprocess.run([rust_bin, "--version"], capture_output=True,
                                       text=True).stdout.strip() if rust_bin else None)
        git_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
            "host_kernel": platform.release(), "host_cpus": os.cpu_count(),
            "cpu_model": next((l.split(":", 1)[1].strip() for l in
                               open("/proc/cpuinfo") if l.startswith("model name")), ""),
            "guest_mounts": start.get("mounts"),
            "guest_kernel": start.get("uname"), "guest_cpus": a.smp, "guest_mem": a.mem,
            "accel": os.environ.get("PYVIRTIOFS_ACCEL", "tcg"), "qemu": qemu,
            "fio": fio_version, "rust_virtiofsd": rust_version,
            "python_daemon": platform.python_version(), "repo_rev": git_rev,
            "settings": settings.record(), "commit": commit,
            "pyvirtiofs_build": tables.pyvirtiofs_build(),
            "ninep_mount": f"trans=virtio,version=9p2000.L,msize=512000,cache={a.ninep_cache}",
            "virtiofs_cache": "auto", "quick": a.quick, "reps": reps, "order": order,
            "file_mib": file_mib, "files": nfiles, "rand_ios": rand_ios,
            "tree": {"stdlib": trees["stdlib"], "files": trees["tar_files"],
                     "tar_bytes": trees["tar_bytes"]},
            "guest_wall_s": wall, "total_wall_s": time.monotonic() - t_start,
            "guest_status": status, "guest_error": guest_error, "finished": finished,
            "host_load": host_load,
        }
        out = {"meta": meta, "summary": summ, "results": results, "errors": errors,
               "table_md": md, "table_best_md": md_best, "daemon_logs": daemon_logs, "guest_other_output": other[-100:]}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")

        print()
        print(f"Guest benchmark: {meta['accel']}, {a.smp} vCPU, {a.mem}, guest {meta['guest_kernel']}; "
              f"virtiofs cache=auto, 9p {meta['ninep_mount']}; median of {reps} reps "
              f"(order rotated); fio file {file_mib} MiB, {rand_ios} random reads; "
              f"tree {trees['tar_files']} files")
        print("Ratios are pyvirtiofsd / peer of the figure itself: for 's' (lower is better) "
              ">1 means pyvirtiofsd is slower; for MB/s and IOPS (higher is better) <1 means "
              "pyvirtiofsd is slower.")
        print(md)
        if reps > 1:
            print(f"\nBest of {reps} (max for MB/s and IOPS, min for seconds), less sensitive "
                  "to other load on the host:")
            print(md_best)
        for n, info in daemon_logs.items():
            if info["findings"]:
                print(f"\n{LABELS[n]} log: {len(info['findings'])} notable lines, last ones:")
                for l in info["findings"][-10:]:
                    print("  " + l[:300])
        if errors:
            print(f"\n{len(errors)} workload failure(s):")
            for e in errors:
                print(f"  rep {e['rep'] + 1} {LABELS[e['share']]} {e['workload']}: {e['error'][:300]}")
        if other:
            print("\nother guest output (tail):")
            for l in other[-15:]:
                print("  " + l[:300])
        fl = host_load["foreign_cpu_cores_mean"]
        print(f"\nhost CPU used by other processes during the run: {fl} cores on average "
              f"(max {host_load['foreign_cpu_cores_max']}; "
              f"{host_load['intervals_over_0.25_core']}/{host_load['intervals']} 2-s intervals "
              f"over 0.25 core); loadavg {' '.join(host_load['loadavg_start'])} -> "
              f"{' '.join(host_load['loadavg_end'])}")
        if fl is not None and fl > 0.25:
            print("WARNING: the host was busy with other work; the figures are noisy "
                  "(TCG guest + daemons want all the cores)")
        print(f"\nguest wall {wall:.0f} s, total {meta['total_wall_s']:.0f} s; JSON: {a.out}")
        if guest_error or not finished:
            print("guest did not finish: " + (guest_error or f"status {status}")[:2000])
            return 1
        return 0
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

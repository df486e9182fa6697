#!/usr/bin/env python3
"""Object storage benchmark: a bucket on moto's S3 API server (loopback), read and written by

* ``pyv``   a real guest through pyvirtiofsd ``--source=s3://bucket`` (virtiofs);
* ``s3fs``  s3fs, the Python fsspec client, on the host (no guest, no virtiofs);
* ``fuse``  a real guest through the Rust virtiofsd re-exporting a host FUSE mount of the
            bucket made by s3fs-fuse (Debian's ``s3fs`` package): two daemons, two caches.

    .venv/bin/python bench/objstore_bench.py [--rounds 3] [--out bench/results/objstore.json]
    .venv/bin/python bench/objstore_bench.py --render-only   # rewrite the README block only

Not in CI.  Needs moto and s3fs (requirements-test.txt), QEMU (the e2e set-up), the Rust
virtiofsd (tests/peers.py) and ``apt-get install s3fs`` for the third column (without it the
column is left out and the run says so).

Workloads, the same for every client: read a 1 GiB object sequentially (``cat`` in the guest,
1 MiB reads through s3fs's file object on the host); read 1,000 objects of 4 KiB (``cat
small/*``: one listing, then each file); write 1,000 files of 4 KiB (each closed, hence
uploaded, before the next).  Every round starts cold: fresh daemons, a fresh s3fs-fuse mount
and a fresh guest boot (QEMU, TCG unless $PYVIRTIOFS_ACCEL=kvm, 1 vCPU), the guest's caches
dropped before each share; the two guest shares are in one guest, their order alternating from
round to round; the host s3fs client runs between guest rounds.  The guest times itself from
/proc/uptime (10 ms steps; the workloads take seconds).  Figures: medians over the rounds, and
pyvirtiofsd's ratio to each other client with its range over the rounds.  The results file
records the date, commit, machine, versions and the load (``uptime``) before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO), str(REPO / "bench")]

import tables  # noqa: E402

RESULTS = REPO / "bench" / "results" / "objstore.json"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"
CLIENTS = ("pyv", "s3fs", "fuse")
WORKLOADS = ("read_big", "read_small", "write_small")

GUEST_SCRIPT = r"""
now() { read t _ < /proc/uptime; echo $t; }
run() {
  cd /mnt/$1
  echo 3 > /proc/sys/vm/drop_caches
  a=$(now); cat big.bin > /dev/null
  b=$(now); cat small/* > /dev/null
  c=$(now); mkdir w-$1
  i=0; while [ $i -lt @FILES@ ]; do printf "%@SIZE@s" x > w-$1/f$i; i=$((i+1)); done
  d=$(now)
  echo "RESULT $1 read_big $a $b"
  echo "RESULT $1 read_small $b $c"
  echo "RESULT $1 write_small $c $d"
}
for s in @ORDER@; do run $s; done
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"objstore_bench: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def moto_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **CREDS))

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    try:
        wait_for(listening, "moto's server listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def fill_bucket(url: str, big_mib: int, files: int, size: int, tmp: Path) -> None:
    import boto3
    s3 = boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in CREDS.items()
                                                 if k != "AWS_DEFAULT_REGION"},
                      region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))
    s3.upload_file(str(big), BUCKET, "big.bin")
    big.unlink()
    for i in range(files):
        s3.put_object(Bucket=BUCKET, Key=f"small/f{i:04d}", Body=os.urandom(size))


def host_s3fs_round(url: str, files: int, size: int, tag: str) -> dict[str, float]:
    import s3fs
    fs = s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing",
                           skip_instance_cache=True)
    out = {}
    t = time.perf_counter()
    with fs.open(f"{BUCKET}/big.bin", "rb") as f:
        while f.read(1 << 20):
            pass
    out["read_big"] = time.perf_counter() - t
    t = time.perf_counter()
    for name in fs.ls(f"{BUCKET}/small", detail=False):
        fs.cat_file(name)
    out["read_small"] = time.perf_counter() - t
    body = b"x".rjust(size)
    t = time.perf_counter()
    for i in range(files):
        fs.pipe_file(f"{BUCKET}/w-s3fs-{tag}/f{i}", body)
    out["write_small"] = time.perf_counter() - t
    return out


class FuseMount:
    """s3fs-fuse mounting the bucket on the host, for the Rust virtiofsd to re-export."""

    def __init__(self, url: str, tmp: Path):
        self.mnt = tmp / "s3fs-fuse"
        self.mnt.mkdir(exist_ok=True)
        pw = tmp / "passwd-s3fs"
        pw.write_text("testing:testing\n")
        pw.chmod(0o600)
        subprocess.run(["s3fs", BUCKET, str(self.mnt), "-o", f"url={url}", "-o",
                        "use_path_request_style", "-o", f"passwd_file={pw}", "-o",
                        "dbglevel=warn"], check=True)
        wait_for(lambda: os.path.ismount(self.mnt), "the s3fs-fuse mount")

    def close(self) -> None:
        for _ in range(50):
            if subprocess.run(["fusermount", "-u", str(self.mnt)]).returncode == 0:
                return
            time.sleep(0.2)
        raise SystemExit(f"objstore_bench: cannot unmount {self.mnt}")


def guest_round(url: str, tmp: Path, order: list[str], files: int, size: int,
                argv_log: dict) -> dict[str, dict[str, float]]:
    from pyvirtiofs.testing import guestvm
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **CREDS)
    procs, shares, fuse = [], [], None
    try:
        if "pyv" in order:
            sock = str(tmp / "pyv.sock")
            argv = [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                    f"--source=s3://{BUCKET}", f"--source-option=endpoint_url={url}"]
            argv_log["pyv"] = argv[1:]
            procs.append(subprocess.Popen(argv, env=env, stderr=open(tmp / "pyv.log", "ab")))
            shares.append(guestvm.Share("pyv", socket=sock))
            wait_for(lambda: os.path.exists(sock), "pyvirtiofsd's socket")
        if "fuse" in order:
            from tests import peers
            fuse = FuseMount(url, tmp)
            sock = str(tmp / "rust.sock")
            argv = [peers.find_rust_virtiofsd(), f"--socket-path={sock}",
                    f"--shared-dir={fuse.mnt}", "--sandbox=none"]
            argv_log["fuse"] = argv[1:]
            procs.append(subprocess.Popen(argv, stderr=open(tmp / "rust.log", "ab")))
            shares.append(guestvm.Share("fuse", socket=sock))
            wait_for(lambda: os.path.exists(sock), "the Rust virtiofsd's socket")
        script = (GUEST_SCRIPT.replace("@FILES@", str(files)).replace("@SIZE@", str(size))
                  .replace("@ORDER@", " ".join(order)))
        res = guestvm.run_guest(script, shares, daemons=procs, timeout=1800)
        if res.status != 0:
            raise SystemExit(f"objstore_bench: the guest script failed:\n{res.output}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if fuse is not None:
            fuse.close()
    out: dict[str, dict[str, float]] = {}
    for line in res.output.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "RESULT":
            out.setdefault(parts[1], {})[parts[2]] = float(parts[4]) - float(parts[3])
    for s in order:
        if set(out.get(s, {})) != set(WORKLOADS):
            raise SystemExit(f"objstore_bench: no figures for {s} in:\n{res.output}")
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def versions() -> dict[str, str]:
    from importlib.metadata import version
    v = {p: version(p) for p in ("s3fs", "fsspec", "moto", "botocore")}
    if shutil.which("s3fs"):
        v["s3fs-fuse"] = subprocess.run(["s3fs", "--version"], capture_output=True,
                                        text=True).stdout.split("\n")[0]
    return v


def run(a: argparse.Namespace) -> dict:
    from pyvirtiofs.testing import guestvm
    clients = ["pyv", "s3fs"] + (["fuse"] if shutil.which("s3fs") else [])
    if "fuse" not in clients:
        log("s3fs-fuse is not installed (apt-get install s3fs): the fuse column is left out")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": tables.git_commit(REPO), "uptime_before": uptime(),
            "cpu_model": tables.cpu_model(), "host_cpus": os.cpu_count(),
            "python": platform.python_version(), "accel": os.environ.get(
                "PYVIRTIOFS_ACCEL", "tcg"), "guest_kernel": os.environ.get(
                "PYVIRTIOFS_GUEST_KERNEL") or guestvm.DEFAULT_KERNEL,
            "rounds": a.rounds, "big_mib": a.big_mib, "files": a.files, "file_size": a.size,
            "clients": clients, "versions": versions()}
    rounds: list[dict[str, dict[str, float]]] = []
    argv_log: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="objbench-") as d, moto_server() as url:
        tmp = Path(d)
        log(f"filling the bucket: {a.big_mib} MiB object, {a.files} objects of {a.size} B")
        fill_bucket(url, a.big_mib, a.files, a.size, tmp)
        for r in range(a.rounds):
            guests = [c for c in clients if c != "s3fs"]
            order = guests if r % 2 == 0 else guests[::-1]
            log(f"round {r + 1}/{a.rounds}: guest with {' then '.join(order)}")
            fig = guest_round(url, tmp, order, a.files, a.size, argv_log)
            # the guest wrote into w-<share>/: a fresh name for the next round
            import boto3
            s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
            for s in order:
                keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix=f"w-{s}/") for o in p.get("Contents", [])]
                n = sum(not k.endswith("/") for k in keys)  # s3fs-fuse adds "w-fuse/"
                if n != a.files:
                    raise SystemExit(f"objstore_bench: {s} left {n} of {a.files} "
                                     "files in the bucket")
                for i in range(0, len(keys), 1000):
                    s3.delete_objects(Bucket=BUCKET, Delete={
                        "Objects": [{"Key": k} for k in keys[i:i + 1000]]})
            log(f"round {r + 1}/{a.rounds}: s3fs on the host")
            fig["s3fs"] = host_s3fs_round(url, a.files, a.size, str(r))
            log(f"round {r + 1}: " + json.dumps(fig))
            rounds.append(fig)
    meta["uptime_after"] = uptime()
    meta["argv"] = argv_log
    summary = {}
    for w in WORKLOADS:
        summary[w] = {c: {"values": [rd[c][w] for rd in rounds],
                          "median": statistics.median(rd[c][w] for rd in rounds)}
                      for c in clients}
    return {"meta": meta, "rounds": rounds, "summary": summary}


# -- the README table ------------------------------------------------------------------------

LABEL = {"pyv": "guest → pyvirtiofsd --source", "s3fs": "s3fs (Python) on the host",
         "fuse": "guest → Rust virtiofsd → s3fs-fuse"}
DESCRIPTION = {"read_big": "sequential read of a {big} MiB object",
               "read_small": "read {files:,} objects of {kib} KiB (one listing, then each)",
               "write_small": "write {files:,} files of {kib} KiB (each uploaded at close)"}


def _rate(w: str, seconds: float, m: dict) -> float:
    """MB/s for the big read, files/s for the others: higher is better everywhere."""
    if w == "read_big":
        return m["big_mib"] * (1 << 20) / 1e6 / seconds
    return m["files"] / seconds


def render(res: dict) -> str:
    m = res["meta"]
    clients = m["clients"]
    lines = [
        f"Measured {m['date']} at {tables.commit_text(m.get('commit'))}, on "
        f"{m.get('cpu_model') or 'a CPU model not recorded'} ({m['host_cpus']} CPUs), guest "
        f"Linux {m['guest_kernel']} under {m['accel'].upper()} with 1 vCPU, moto {m['versions']['moto']} as the store "
        f"for every client; s3fs {m['versions']['s3fs']}"
        + (f", {m['versions']['s3fs-fuse'].split(' (')[0]}" if "s3fs-fuse" in m["versions"]
           else "")
        + f". Median of {m['rounds']} rounds, each from cold. `uptime` before: "
        f"`{m['uptime_before'].split('load average: ')[-1]}`, after: "
        f"`{m['uptime_after'].split('load average: ')[-1]}` (load averages).",
        "",
        "Rates, higher is better; ratio = pyvirtiofsd's rate ÷ the other's, of the medians, "
        "with its range over the rounds in brackets (below 1: pyvirtiofsd is slower).",
        "",
    ]
    others = [c for c in clients if c != "pyv"]
    head = ["workload", "unit"] + [LABEL[c] for c in clients] + \
        [f"pyv ÷ {c}" for c in others]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w, row in res["summary"].items():
        desc = DESCRIPTION[w].format(big=m["big_mib"], files=m["files"],
                                     kib=m["file_size"] // 1024)
        cells = [desc, "MB/s" if w == "read_big" else "files/s"]
        cells += [f"{_rate(w, row[c]['median'], m):.1f}" for c in clients]
        for c in others:
            ratio = row[c]["median"] / row["pyv"]["median"]  # rates: inverse of the seconds
            per = [b / a for a, b in zip(row["pyv"]["values"], row[c]["values"])]
            cells.append(f"{ratio:.2f} ({min(per):.2f}–{max(per):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096, help="bytes per small file")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the README block from --out without running anything")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if not a.render_only:
        res = run(a)
        out.write_text(json.dumps(res, indent=1) + "\n")
        log(f"wrote {out}")
    if out.resolve() == RESULTS.resolve():
        return tables.main(["objstore"])
    print(render(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

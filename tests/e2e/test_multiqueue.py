"""Several request queues with a real guest: Linux 6.12, two vCPUs, ``num-request-queues=2``.

Linux >= 6.10 maps each CPU to one request queue, so a process pinned to CPU 0 sends its
requests on queue 1 and one pinned to CPU 1 on queue 2.  The guest runs one such process per
CPU, each doing a chain of dependent operations (append numbered records, create, rename,
unlink) in its own directory, and hands files over to the other CPU.  What must hold:

* both request queues carry requests: the daemon's log says how many each queue served, and
  each queue served at least the requests of the process pinned to its CPU;
* per-queue ordering: each process's records and files come out exactly in the order it issued
  them, seen from the guest after dropping its caches and from the host;
* across queues: once a request on one queue has been answered, a request on the other queue
  sees its effect (the file handed over over a pipe is there with its content).

The daemon must also exit 0 without a traceback.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

ROUNDS = 150

GUEST = textwrap.dedent('''\
    import json, os, sys

    root, rounds = sys.argv[1], int(sys.argv[2])

    def cpu_now():
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])  # field 39: processor

    def worker(cpu, send, recv):
        os.sched_setaffinity(0, {cpu})
        other = 1 - cpu
        d = os.path.join(root, f"cpu{cpu}")
        os.mkdir(d)
        log = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        seen_cpus = set()
        for i in range(rounds):
            os.write(log, f"{cpu}:{i}\\n".encode())
            p = os.path.join(d, f"f{i}")
            with open(p, "w") as f:
                f.write(f"{cpu}/{i}")
            os.rename(p, p + ".r")
            if i % 2:
                os.unlink(p + ".r")
            if i % 10 == 0:
                # Hand a file to the other CPU once our requests have been answered; it
                # reads it through its own queue and sends back what it found.
                h = os.path.join(root, f"hand-{cpu}-{i}")
                with open(h, "w") as f:
                    f.write(f"from cpu {cpu} round {i}")
                os.write(send, f"{h}\\n".encode())
                got = b""
                while not got.endswith(b"\\n"):
                    got += os.read(recv, 4096)
                if got.decode() != "ok\\n":
                    raise AssertionError(got.decode())
            seen_cpus.add(cpu_now())
        os.close(log)
        os.write(send, b"done\\n")
        return seen_cpus

    def peer(cpu, recv, send):
        """Serve the other CPU's hand-overs (runs in a second process pinned to the same CPU)."""
        os.sched_setaffinity(0, {cpu})
        buf = b""
        while True:
            data = os.read(recv, 4096)
            if not data:
                return
            buf += data
            while b"\\n" in buf:
                line, buf = buf.split(b"\\n", 1)
                line = line.decode()
                if line == "done":
                    return
                try:
                    with open(line) as f:
                        content = f.read()
                    want = "from cpu %s round %s" % tuple(line.rsplit("-", 2)[1:])
                    msg = "ok" if content == want else f"{line}: read {content!r}, want {want!r}"
                except OSError as e:
                    msg = f"{line}: {e}"
                os.write(send, f"{msg}\\n".encode())

    pids = []
    # worker on CPU c writes hand-overs to pipe a[c]; the peer on the other CPU reads them
    # and answers on pipe b[c].
    a = [os.pipe() for _ in range(2)]
    b = [os.pipe() for _ in range(2)]
    for c in (0, 1):
        pid = os.fork()
        if pid == 0:
            os._exit(peer(1 - c, a[c][0], b[c][1]) or 0)
        pids.append(pid)
    results = {}
    r_fds = []
    for c in (0, 1):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                seen = worker(c, a[c][1], b[c][0])
                os.write(w, json.dumps({"ok": True, "cpus": sorted(seen)}).encode())
                os._exit(0)
            except BaseException as e:
                os.write(w, json.dumps({"ok": False, "error": repr(e)}).encode())
                os._exit(1)
        os.close(w)
        pids.append(pid)
        r_fds.append((c, r))
    for c, r in r_fds:
        out = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        results[c] = json.loads(out or b'{"ok": false, "error": "no result"}')
    for pid in pids:
        os.waitpid(pid, 0)

    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\\n")
    for c in (0, 1):
        d = os.path.join(root, f"cpu{c}")
        with open(os.path.join(d, "log")) as f:
            lines = f.read().splitlines()
        want = [f"{c}:{i}" for i in range(rounds)]
        results[c]["log_in_order"] = lines == want
        names = sorted(os.listdir(d))
        results[c]["names_ok"] = names == sorted(["log"] + [f"f{i}.r" for i in range(0, rounds, 2)])
        results[c]["contents_ok"] = all(
            open(os.path.join(d, f"f{i}.r")).read() == f"{c}/{i}" for i in range(0, rounds, 2))
    print("MQ-RESULT " + json.dumps(results), flush=True)
''')


def _queue_counts(log: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for q, n in re.findall(r"queue (\d+) stopped after (\d+) requests", log):
        counts[int(q)] = counts.get(int(q), 0) + int(n)
    return counts


def test_two_request_queues_both_serve_in_order(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "mq"
    shared = tmp / "share"
    shared.mkdir(parents=True)
    sock = str(tmp / "s.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}"], sock, env=daemon_env()).start()
    script = (guestvm.embed_file("/tmp/mq.py", GUEST)
              + f"exec {shlex.quote(guestvm.guest_python())} /tmp/mq.py \"$PWD\" {ROUNDS}\n")
    try:
        res = guestvm.run_guest(script, [guestvm.Share("mq", socket=sock)], hostroot=True,
                                kernel="6.12", smp=2, num_request_queues=2, timeout=400,
                                daemons=[d])
        rc = d.wait(timeout=30)
    finally:
        d.stop()
    log = d.log
    assert res.status == 0, res.output[-3000:]
    m = re.search(r"^MQ-RESULT (.*)$", res.output, re.M)
    assert m, res.output[-3000:]
    results = {int(k): v for k, v in json.loads(m.group(1)).items()}
    for cpu in (0, 1):
        r = results[cpu]
        assert r["ok"], f"CPU {cpu}: {r.get('error')}"
        assert r["cpus"] == [cpu], f"the process pinned to CPU {cpu} ran on {r['cpus']}"
        assert r["log_in_order"], f"CPU {cpu}'s appended records are out of order or missing"
        assert r["names_ok"] and r["contents_ok"], f"CPU {cpu}'s create/rename/unlink chain: {r}"

    # The host sees the same, in the same order.
    for cpu in (0, 1):
        cd = shared / f"cpu{cpu}"
        assert (cd / "log").read_text().splitlines() == [f"{cpu}:{i}" for i in range(ROUNDS)]
        assert sorted(p.name for p in cd.iterdir()) == sorted(
            ["log"] + [f"f{i}.r" for i in range(0, ROUNDS, 2)])

    assert rc == 0 and "Traceback" not in log, log[-5000:]
    counts = _queue_counts(log)
    # Each round is at least 5 requests (WRITE; CREATE, WRITE, FLUSH/RELEASE; RENAME) from
    # the process pinned to that queue's CPU.
    for q in (1, 2):
        assert counts.get(q, 0) >= 5 * ROUNDS, (
            f"request queue {q} served {counts.get(q, 0)} requests, expected at least "
            f"{5 * ROUNDS}: {counts}\n{log[-3000:]}")
    print(f"\nrequests served per queue (0 = hiprio): {counts}")

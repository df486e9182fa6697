"""Locks hold across the host and across daemons: a lock taken in the guest excludes a host
process, a host lock excludes the guest, and two daemons serving the same directory (two VMs,
here two virtiofs devices of one guest) exclude each other."""

import fcntl
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

GUEST = r"""
cat > /tmp/lk.py <<'EOF2'
import fcntl, os, sys, time
def try_lock(path, kind):
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "posix":
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, "got"
    except OSError:
        os.close(fd)
        return None, "busy"
# 1. the host holds both locks on hostlocked
print("host-held posix:", try_lock("/mnt/a/hostlocked", "posix")[1])
print("host-held flock:", try_lock("/mnt/a/hostlocked", "flock")[1])
# 2. take locks through device a, check them through device b (another daemon)
fa, r = try_lock("/mnt/a/shared", "posix")
print("a posix:", r)
pid = os.fork()
if pid == 0:
    print("b posix while a holds:", try_lock("/mnt/b/shared", "posix")[1]); sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
fb, r = try_lock("/mnt/a/shared2", "flock")
print("a flock:", r)
print("b flock while a holds:", try_lock("/mnt/b/shared2", "flock")[1])
# 3. hold a lock for the host to see, then release it
open("/mnt/a/guest-holds", "w").close()
while not os.path.exists("/mnt/a/host-checked"):
    time.sleep(0.05)
os.close(fa); os.close(fb)
print("b posix after a closed:", try_lock("/mnt/b/shared", "posix")[1])
# 4. a blocking lock waits until the host lets go (the host releases after 1 s)
fd = os.open("/mnt/a/hostlocked", os.O_RDWR)
t0 = time.monotonic()
fcntl.lockf(fd, fcntl.LOCK_EX)
print("waited for host: %s" % (time.monotonic() - t0 > 0.5))
EOF2
exec PYTHON /tmp/lk.py
"""


def test_locks_hold_across_host_and_daemons(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "locks"
    shared = tmp / "share"
    shared.mkdir(parents=True)
    for n in ("hostlocked", "shared", "shared2"):
        (shared / n).write_bytes(b"0" * 64)
    host_fd = os.open(shared / "hostlocked", os.O_RDWR)
    fcntl.lockf(host_fd, fcntl.LOCK_EX)
    host_flock_fd = os.open(shared / "hostlocked", os.O_RDONLY)
    fcntl.flock(host_flock_fd, fcntl.LOCK_EX)
    seen = {}

    def host_side():
        deadline = time.monotonic() + 120
        while not (shared / "guest-holds").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        f = os.open(shared / "shared", os.O_RDWR)
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["host vs guest posix"] = "got"
        except OSError:
            seen["host vs guest posix"] = "busy"
        os.close(f)
        g = os.open(shared / "shared2", os.O_RDONLY)
        try:
            fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen["host vs guest flock"] = "got"
        except OSError:
            seen["host vs guest flock"] = "busy"
        os.close(g)
        (shared / "host-checked").write_text("")
        time.sleep(1.0)
        os.close(host_fd)
        os.close(host_flock_fd)

    daemons = []
    for tag in ("a", "b"):
        sock = str(tmp / f"{tag}.sock")
        daemons.append(guestvm.DaemonProcess(
            [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}", f"--shared-dir={shared}"],
            sock, env=daemon_env()).start())
    t = threading.Thread(target=host_side)
    t.start()
    try:
        res = guestvm.run_guest(GUEST.replace("PYTHON", guestvm.guest_python()),
                                [guestvm.Share("a", socket=daemons[0].socket_path),
                                 guestvm.Share("b", socket=daemons[1].socket_path)],
                                hostroot=True, daemons=daemons, timeout=300)
    finally:
        t.join()
        for d in daemons:
            d.stop()
    out = res.output
    assert res.status == 0, out
    for line in ("host-held posix: busy", "host-held flock: busy", "a posix: got",
                 "b posix while a holds: busy", "a flock: got", "b flock while a holds: busy",
                 "b posix after a closed: got", "waited for host: True"):
        assert line in out, out
    assert seen == {"host vs guest posix": "busy", "host vs guest flock": "busy"}

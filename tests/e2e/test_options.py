"""Daemon options a guest notices, in one boot: --no-xattr (extended attributes refused with
EOPNOTSUPP), --no-posix-lock and --no-flock (locks stay inside the guest: a lock a host
process holds no longer excludes the guest, while two guest processes still exclude each
other).  tests/e2e/test_locks_shared.py shows the default, where host locks do exclude it."""

import fcntl
import json
import os
import sys
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

GUEST = r'''
import errno, fcntl, json, os

def E(fn, *a):
    try:
        fn(*a)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]

def other_process(fn, *a):
    """fn in a child process (its own lock owner); its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, E(fn, *a).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    return os.read(r, 100).decode()

out = {"setxattr": E(os.setxattr, "f", "user.k", b"v"), "getxattr": E(os.getxattr, "f", "user.k"),
       "listxattr": E(os.listxattr, "f"), "removexattr": E(os.removexattr, "f", "user.k")}
fd = os.open("hostlocked", os.O_RDWR)
out["posix lock the host holds"] = E(fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
out["flock the host holds"] = E(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
out["posix lock another guest process holds"] = other_process(
    lambda: fcntl.lockf(os.open("hostlocked", os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB))
out["flock another guest process holds"] = other_process(
    lambda: fcntl.flock(os.open("hostlocked", os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB))
print("RESULT " + json.dumps(out))
'''


def test_no_xattr_no_posix_lock_no_flock(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "opts"
    shared = tmp / "share"
    shared.mkdir(parents=True)
    (shared / "f").write_text("")
    (shared / "hostlocked").write_bytes(b"0" * 64)
    host_posix = os.open(shared / "hostlocked", os.O_RDWR)
    fcntl.lockf(host_posix, fcntl.LOCK_EX)
    host_flock = os.open(shared / "hostlocked", os.O_RDONLY)
    fcntl.flock(host_flock, fcntl.LOCK_EX)
    sock = str(tmp / "s.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}", "--no-xattr", "--no-posix-lock",
                               "--no-flock"], sock, env=daemon_env())
    try:
        with d:
            res = guestvm.run_guest(guestvm.embed_file("/tmp/t.py", GUEST)
                                    + f"{guestvm.guest_python()} /tmp/t.py\n",
                                    [guestvm.Share("vfs", socket=sock)], hostroot=True,
                                    daemons=[d], timeout=300)
    finally:
        os.close(host_posix)
        os.close(host_flock)
    line = next((ln for ln in res.output.splitlines() if ln.startswith("RESULT ")), None)
    assert line, res.output
    assert json.loads(line[len("RESULT "):]) == {
        "setxattr": "ENOTSUP", "getxattr": "ENOTSUP", "listxattr": "ENOTSUP",
        "removexattr": "ENOTSUP",
        "posix lock the host holds": "ok", "flock the host holds": "ok",
        "posix lock another guest process holds": "EAGAIN",
        "flock another guest process holds": "EAGAIN"}, res.output
    assert os.listxattr(shared / "f") == []

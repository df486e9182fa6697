"""Rootless: pyvirtiofsd started by an ordinary user (nobody, with no capability) confines
itself with the default --sandbox=namespace inside a user namespace of its own, and the
files the guest creates belong to that user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.unit.daemon import Daemon, daemon_env

NOBODY = 65534
ROOT = 1


def rootless_daemon(shared: Path, *extra: str) -> Daemon:
    os.chown(shared, NOBODY, NOBODY)
    d = Daemon(shared, extra_args=extra)
    os.chown(d.sockdir, NOBODY, NOBODY)
    argv = [a for a in d.argv if a != "--sandbox=none"]
    d.argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
              "--inh-caps=-all", *argv]
    return d


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def daemon_children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids]


@pytest.fixture
def share():
    top = Path(tempfile.mkdtemp(prefix="pvr-", dir="/tmp"))  # reachable by nobody
    os.chmod(top, 0o755)
    d = top / "share"
    d.mkdir()
    (d / "from-host").write_text("host data\n")
    yield d
    shutil.rmtree(top, ignore_errors=True)


def test_rootless_daemon_sandboxes_itself_and_creates_files_as_its_user(share):
    d = rootless_daemon(share).start()
    try:
        c = d.client()  # served: the sandbox is in place
        assert status_field(d.pid, "Uid").split() == [str(NOBODY)] * 4
        (child,) = daemon_children(d.pid)  # the server, PID 1 of its own PID namespace
        # the supervisor and the server live in a user namespace of their own
        assert os.readlink(f"/proc/{d.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{child}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert os.readlink(f"/proc/{child}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        # the server's root is the shared directory (pivot_root), not the host's /
        assert os.stat(f"/proc/{child}/root").st_ino == share.stat().st_ino
        assert c.read_all(*_open(c, "from-host"), 0, 100) == b"host data\n"
        e, o = c.create(ROOT, "made-by-guest", mode=0o644)
        c.write(e.nodeid, o.fh, 0, b"guest data")
        c.release(e.nodeid, o.fh)
        m = c.mkdir(ROOT, "dir", 0o755)
        assert m.attr.uid == NOBODY
    finally:
        d.finish()
    assert "Traceback" not in d.log()
    for name in ("made-by-guest", "dir"):
        st = (share / name).stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert (share / "made-by-guest").read_bytes() == b"guest data"


def _open(c, name):
    e = c.lookup(ROOT, name)
    return e.nodeid, c.open(e.nodeid, os.O_RDONLY).fh


def test_rootless_daemon_cannot_reach_files_its_user_cannot(share):
    secret = share / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)  # owned by root
    d = rootless_daemon(share).start()
    try:
        c = d.client()
        e = c.lookup(ROOT, "secret")
        with pytest.raises(OSError) as err:
            c.open(e.nodeid, os.O_RDONLY)
        assert err.value.errno == 13  # EACCES: no capability over other users' files
    finally:
        d.finish()


def test_rootless_chroot_is_refused_with_one_line(share):
    d = rootless_daemon(share, "--sandbox=chroot")
    r = subprocess.run(d.argv, capture_output=True, text=True, timeout=30, env=daemon_env())
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "needs root" in r.stderr, r.stderr


def test_uid_and_gid_maps_as_root(share):
    """libvirt's <idmap>: --uid-map/--gid-map put the server in a user namespace whose root
    is host id 100000; what the guest's root creates belongs to 100000, what its user 1000
    creates to 101000, and the server has no power over host root's files."""
    base = 100000
    os.chown(share, base, base)
    os.chmod(share, 0o777)  # guest user 1000 may create in it
    secret = share / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    d = Daemon(share, extra_args=(f"--uid-map=:0:{base}:65536:", f"--gid-map=:0:{base}:65536:"))
    d.argv = [a for a in d.argv if a != "--sandbox=none"]
    d.start()
    try:
        c = d.client()
        (child,) = daemon_children(d.pid)
        assert status_field(child, "Uid").split() == [str(base)] * 4
        assert status_field(d.pid, "Uid").split() == ["0"] * 4  # the supervisor stays root
        e, o = c.create(ROOT, "by-guest-root", mode=0o644)
        c.release(e.nodeid, o.fh)
        c.uid = c.gid = 1000  # requests from the guest's user 1000
        c.mkdir(ROOT, "by-guest-user", 0o755)
        c.uid = c.gid = 0
        e2 = c.lookup(ROOT, "secret")
        with pytest.raises(OSError) as err:
            c.open(e2.nodeid, os.O_RDONLY)
        assert err.value.errno == 13
    finally:
        d.finish()
    st = (share / "by-guest-root").stat()
    assert (st.st_uid, st.st_gid) == (base, base)
    st = (share / "by-guest-user").stat()
    assert (st.st_uid, st.st_gid) == (base + 1000, base + 1000)
    assert not os.path.exists(d.socket_path)  # the supervisor cleaned up as root

"""Options of the running daemon seen from outside: --fd (the socket libvirt passes),
--syslog, --modcaps, --no-xattr, --no-posix-lock/--no-flock, --cache=always|metadata,
--version, --print-capabilities and --help, through the real pyvirtiofsd process."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.testing.frontend import FuseClient, FuseError, VirtioFsFrontend
from tests.unit.daemon import daemon_env

ROOT = 1
CAP_MKNOD = 27
CAP_SYS_ADMIN = 21


def pyvirtiofsd(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvirtiofs", *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=daemon_env(), timeout=60, **kw)


def test_version_capabilities_and_help():
    r = pyvirtiofsd("--version")
    assert r.returncode == 0 and re.fullmatch(r"pyvirtiofsd \S+\nrequest path: "
                                              r"(compiled with mypyc|pure Python).*\n", r.stdout), r
    r = pyvirtiofsd("-V")
    assert r.returncode == 0 and r.stdout.startswith("pyvirtiofsd "), r
    r = pyvirtiofsd("--print-capabilities")
    assert r.returncode == 0, r
    assert json.loads(r.stdout) == {"type": "fs", "features": []}
    r = pyvirtiofsd("--help")
    assert r.returncode == 0 and "--shared-dir" in r.stdout and "--translate-uid" in r.stdout


def test_fd_serves_on_an_inherited_listening_socket(tmp_path):
    """libvirt binds and listens itself, then runs the daemon with --fd=N."""
    shared = tmp_path / "share"
    shared.mkdir()
    (shared / "f").write_text("through the inherited socket")
    sockdir = tempfile.mkdtemp(prefix="pvfd-", dir="/tmp")
    path = os.path.join(sockdir, "libvirt.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtiofs", f"--fd={listener.fileno()}",
                             "-o", f"source={shared},cache=always,xattr,flock,posix_lock",
                             "--sandbox=none"], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=daemon_env(),
                            pass_fds=[listener.fileno()])
    listener.close()  # the daemon holds its own copy
    try:
        fe = VirtioFsFrontend(path, timeout=10.0)
        c = FuseClient(fe)
        c.init()
        e = c.lookup(ROOT, "f")
        fh = c.open(e.nodeid, os.O_RDONLY).fh
        assert c.read(e.nodeid, fh, 0, 100) == b"through the inherited socket"
        fe.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text, text
    assert not os.path.exists(path + ".pid")  # no pid file: the caller made the socket
    os.unlink(path)
    os.rmdir(sockdir)


def _run_with_dev_log(tmp_path: Path, dev_log: Path | None, ready, *args: str) -> str:
    """Run pyvirtiofsd in a mount namespace whose /dev holds only ``dev_log`` (bound to
    /dev/log) until ``ready(stderr)`` is true; returns its stderr."""
    shared = tmp_path / "share"
    shared.mkdir(exist_ok=True)
    sock = tempfile.mkdtemp(prefix="pvsl-", dir="/tmp") + "/s"
    bind = f'touch /dev/log && mount --bind "{dev_log}" /dev/log && ' if dev_log else ""
    script = (f'mount -t tmpfs tmpfs /dev && {bind}exec "$@"')
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script, "sh", sys.executable, "-m", "pyvirtiofs",
                             f"--socket-path={sock}", f"--shared-dir={shared}",
                             "--sandbox=none", *args],
                            stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                            env=daemon_env())
    try:
        deadline = time.monotonic() + 20
        while not ready((tmp_path / "stderr").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "stderr").read_text()
            time.sleep(0.02)
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.seek(0)
    return err.read()


def test_syslog_sends_the_log_to_dev_log(tmp_path):
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "log"))
    sink.setblocking(False)
    messages = []

    def logged_waiting(stderr):
        try:
            while True:
                messages.append(sink.recv(65536).decode())
        except BlockingIOError:
            pass
        return any("waiting for a vhost-user frontend" in m for m in messages)

    stderr = _run_with_dev_log(tmp_path, tmp_path / "log", logged_waiting, "--syslog")
    text = "\n".join(messages)
    assert re.search(r"pyvirtiofsd\[\d+\]: waiting for a vhost-user frontend", text), messages
    assert "waiting for a vhost-user frontend" not in stderr, stderr


def test_syslog_without_a_syslog_daemon_falls_back_to_stderr(tmp_path):
    stderr = _run_with_dev_log(tmp_path, None,
                               lambda err: "waiting for a vhost-user frontend" in err, "--syslog")
    assert "--syslog: cannot reach /dev/log" in stderr, stderr
    assert "waiting for a vhost-user frontend" in stderr, stderr
    assert "Traceback" not in stderr


def _cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)


def test_modcaps_changes_the_capabilities_kept(start_daemon):
    default = start_daemon(extra_args=["--sandbox=chroot"])
    changed = start_daemon(extra_args=["--sandbox=chroot", "--modcaps=-mknod:+sys_admin"])
    compat = start_daemon(extra_args=["--sandbox=chroot", "-o", "modcaps=-mknod:+sys_admin"])
    for d in (default, changed, compat):
        d.client()  # served: the capabilities are dropped by now
    assert _cap_eff(default.pid) & (1 << CAP_MKNOD)
    assert not _cap_eff(default.pid) & (1 << CAP_SYS_ADMIN)
    for d in (changed, compat):
        assert not _cap_eff(d.pid) & (1 << CAP_MKNOD)
        assert _cap_eff(d.pid) & (1 << CAP_SYS_ADMIN)


def test_no_xattr_answers_enosys(start_daemon):
    # off unless asked, as in virtiofsd
    for args, works in (((), False), (("--xattr",), True), (("-o", "xattr"), True),
                        (("--xattr", "--no-xattr"), False), (("-o", "xattr,no_xattr"), False)):
        d = start_daemon(extra_args=args)
        f = Path(d.shared_dir) / "f"
        f.write_text("x")
        os.setxattr(f, "user.k", b"v")
        c = d.client()
        e = c.lookup(ROOT, "f")
        if works:
            assert c.getxattr(e.nodeid, "user.k", 64) == b"v"
        else:
            with pytest.raises(FuseError) as err:
                c.getxattr(e.nodeid, "user.k", 64)
            assert err.value.errno == errno.ENOSYS


def test_no_posix_lock_and_no_flock_are_not_offered(start_daemon):
    def flags(*args):
        return start_daemon(extra_args=args).client(init=False).init().flags
    default = flags()
    assert default & abi.POSIX_LOCKS and default & abi.FLOCK_LOCKS
    assert not flags("--no-posix-lock") & abi.POSIX_LOCKS
    assert flags("--no-posix-lock") & abi.FLOCK_LOCKS
    assert not flags("--no-flock") & abi.FLOCK_LOCKS
    assert not flags("-o", "no_posix_lock,no_flock") & (abi.POSIX_LOCKS | abi.FLOCK_LOCKS)


@pytest.mark.parametrize("cache, timeout, direct_io, keep_cache", [
    ("never", 0, True, False), ("auto", 1, False, False),
    ("always", 86400, False, True), ("metadata", 86400, True, False)])
def test_cache_modes(start_daemon, cache, timeout, direct_io, keep_cache):
    d = start_daemon(extra_args=[f"--cache={cache}"])
    (Path(d.shared_dir) / "f").write_text("x")
    c = d.client()
    e = c.lookup(ROOT, "f")
    assert (e.entry_valid, e.attr_valid) == (timeout, timeout)
    o = c.open(e.nodeid, os.O_RDONLY)
    assert bool(o.open_flags & abi.FOPEN_DIRECT_IO) == direct_io
    assert bool(o.open_flags & abi.FOPEN_KEEP_CACHE) == keep_cache


def test_tag_is_told_through_the_config_space(start_daemon):
    from pyvirtiofs.testing.frontend import (DEFAULT_PROTOCOL_FEATURES, ProtoFeature, Req,
                                             VhostUserError, _bit)
    config = _bit(ProtoFeature.CONFIG)
    # without --tag: no CONFIG (QEMU 7.1-8.0 crash on it)
    plain = start_daemon().frontend(start=False)
    assert not plain.backend_protocol_features & config
    plain.close()
    d = start_daemon(extra_args=["--tag=my-fs.1"])
    fe = d.frontend(protocol_features=DEFAULT_PROTOCOL_FEATURES | config)
    assert fe.protocol_features & config
    head = struct.Struct("<III")
    reply = fe.conn.call(Req.GET_CONFIG, head.pack(0, 40, 0) + bytes(40))
    offset, size, _ = head.unpack_from(reply.payload)
    space = reply.payload[head.size:]
    assert (offset, size, len(space)) == (0, 40, 40)
    assert space[:36] == b"my-fs.1".ljust(36, b"\0")
    assert int.from_bytes(space[36:40], "little") >= 1  # request queues
    part = fe.conn.call(Req.GET_CONFIG, head.pack(0, 7, 0) + bytes(7)).payload[head.size:]
    assert part == b"my-fs.1"
    with pytest.raises(VhostUserError):  # read-only
        fe.conn.call(Req.SET_CONFIG, head.pack(0, 4, 0) + b"evil", need_reply=True)
    c = FuseClient(fe)
    c.init()  # and it serves as usual
    (Path(d.shared_dir) / "f").write_text("x")
    assert c.lookup(ROOT, "f").attr.size == 1

"""Options of the real pyvirtiofsd process that change what a guest (here the project's
frontend, playing the guest driver) notices: --modcaps, --seccomp=log|trap, --fd, --syslog."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from pyvirtiofs.testing.frontend import FUSE_ROOT_ID, FuseClient, FuseError

from .daemon import daemon_env

CAP_CHOWN, CAP_SYS_ADMIN = 0, 21


def _need_root():
    if os.geteuid() != 0:
        pytest.fail("needs root: capabilities are only dropped from a root daemon", pytrace=False)


def _caps(pid: int) -> tuple[int, int, int]:
    status = open(f"/proc/{pid}/status").read()
    return tuple(int(re.search(rf"{k}:\s*([0-9a-f]+)", status).group(1), 16)
                 for k in ("CapEff", "CapPrm", "CapInh"))


def test_nine_capabilities_kept_by_default(daemon, tmp_path):
    _need_root()
    daemon.wait_log("waiting for a vhost-user frontend")
    eff, prm, inh = _caps(daemon.pid)
    assert eff == prm and bin(eff).count("1") == 9 and inh == 0, (hex(eff), hex(prm), hex(inh))
    assert eff & (1 << CAP_CHOWN) and not eff & (1 << CAP_SYS_ADMIN)
    c = daemon.client()
    f = c.create(FUSE_ROOT_ID, "f")[0].nodeid
    c.setattr(f, uid=123)                                      # CAP_CHOWN kept: chown works
    assert (tmp_path / "shared" / "f").stat().st_uid == 123
    with pytest.raises(FuseError) as ei:                       # no CAP_SYS_ADMIN: EPERM
        c.setxattr(f, "trusted.t", b"v")
    assert ei.value.errno == errno.EPERM


def test_modcaps_takes_chown_away_and_gives_sys_admin(start_daemon, tmp_path):
    _need_root()
    d = start_daemon(extra_args=["--modcaps=-chown,+sys_admin"])
    d.wait_log("waiting for a vhost-user frontend")
    eff, _, _ = _caps(d.pid)
    assert not eff & (1 << CAP_CHOWN) and eff & (1 << CAP_SYS_ADMIN)
    c = d.client()
    f = c.create(FUSE_ROOT_ID, "f")[0].nodeid
    with pytest.raises(FuseError) as ei:
        c.setattr(f, uid=123)
    assert ei.value.errno == errno.EPERM
    assert (tmp_path / "shared" / "f").stat().st_uid == 0
    c.setxattr(f, "trusted.t", b"v")
    assert os.getxattr(tmp_path / "shared" / "f", "trusted.t") == b"v"


@pytest.mark.parametrize("mode", ["log", "trap"])
def test_seccomp_log_and_trap_filter_the_serving_daemon(start_daemon, tmp_path, mode):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "f").write_text("data")
    d = start_daemon(extra_args=[f"--seccomp={mode}"])
    d.wait_log(f"seccomp filter installed (")
    assert f"others: {mode}" in d.log()
    assert re.search(r"Seccomp:\s*2", open(f"/proc/{d.pid}/status").read())
    c = d.client()
    assert c.lookup(FUSE_ROOT_ID, "f").attr.size == 4       # and it serves


def test_fd_serves_on_a_socket_passed_by_the_caller(tmp_path):
    path = str(tmp_path / "vfs.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "f").write_text("via fd")
    fd = listener.fileno()
    log = open(tmp_path / "log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtiofs", f"--fd={fd}",
                             f"--shared-dir={tmp_path / 'share'}", "--sandbox=none"],
                            pass_fds=[fd], stdout=log, stderr=subprocess.STDOUT, env=daemon_env())
    listener.close()
    try:
        c = FuseClient.connect(path)
        e = c.lookup(FUSE_ROOT_ID, "f")
        opened = c.open(e.nodeid)
        assert c.read(e.nodeid, opened.fh, 0, 100) == b"via fd"
        c.close()
        assert proc.wait(15) == 0                  # the frontend left: the daemon ends
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "log").read_text()
    assert "waiting for a vhost-user frontend on fd" in text and "Traceback" not in text, text


def test_syslog_sends_the_log_to_dev_log(tmp_path):
    """The daemon runs in a private mount namespace whose /dev/log is a datagram socket of
    this test; what it logs arrives there (in syslog format), not on stderr."""
    _need_root()
    sock_path = str(tmp_path / "log.sock")
    collector = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    collector.bind(sock_path)
    collector.settimeout(20)
    (tmp_path / "share").mkdir()
    vfs = str(tmp_path / "vfs.sock")
    script = ("mount -t tmpfs none /dev && ln -s \"$1\" /dev/log && shift && exec \"$@\"")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", sock_path,
         sys.executable, "-m", "pyvirtiofs", f"--socket-path={vfs}",
         f"--shared-dir={tmp_path / 'share'}", "--sandbox=none", "--syslog"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=daemon_env())
    try:
        messages = []
        deadline = time.monotonic() + 20
        while not any(b"waiting for a vhost-user frontend" in m for m in messages):
            assert time.monotonic() < deadline, messages
            messages.append(collector.recv(4096))
        FuseClient.connect(vfs).close()            # one session; then the daemon ends
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode()
        collector.close()
    msg = next(m for m in messages if b"waiting for" in m).decode()
    assert re.match(r"<\d+>pyvirtiofsd\[\d+\]: waiting for a vhost-user frontend on ", msg), msg
    assert out == "", out                          # nothing on stderr

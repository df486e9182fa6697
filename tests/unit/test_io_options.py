"""The caching and I/O options do what virtiofsd's do, seen through the real pyvirtiofsd
process and the project's frontend: the INIT flags offered, the flags of the host file the
daemon opens (from /proc/PID/fdinfo), the timeouts replied, the log, the socket."""

from __future__ import annotations

import errno
import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.testing.frontend import LINUX_6_1_INIT_FLAGS, FuseError

ROOT = 1
# Linux 6.12 offers flags2 too; DIRECT_IO_ALLOW_MMAP is bit 36
LINUX_6_12_INIT_FLAGS = LINUX_6_1_INIT_FLAGS | abi.DIRECT_IO_ALLOW_MMAP


def host_open_flags(pid: int, path: Path) -> list[int]:
    """Flags of the daemon's fds open on ``path`` (O_PATH fds left out)."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) != str(path):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = int(next(line.split()[1] for line in info.splitlines()
                         if line.startswith("flags:")), 8)
        if not flags & os.O_PATH:
            out.append(flags)
    return out


def init_flags(start_daemon, *args, offer=LINUX_6_1_INIT_FLAGS) -> int:
    d = start_daemon(extra_args=args)
    c = d.client(init=False)
    return c.init(flags=offer).flags


def test_readdirplus_killpriv_writeback_allow_mmap_in_init(start_daemon):
    default = init_flags(start_daemon)
    assert default & abi.DO_READDIRPLUS and default & abi.READDIRPLUS_AUTO
    assert not default & abi.HANDLE_KILLPRIV_V2  # off by default, as in virtiofsd
    assert not default & abi.WRITEBACK_CACHE
    assert init_flags(start_daemon, "--killpriv-v2") & abi.HANDLE_KILLPRIV_V2
    assert init_flags(start_daemon, "-o", "killpriv_v2") & abi.HANDLE_KILLPRIV_V2
    no = init_flags(start_daemon, "--no-readdirplus", "--killpriv-v2", "--no-killpriv-v2")
    assert not no & (abi.DO_READDIRPLUS | abi.READDIRPLUS_AUTO | abi.HANDLE_KILLPRIV_V2)
    assert init_flags(start_daemon, "--writeback") & abi.WRITEBACK_CACHE
    assert init_flags(start_daemon, "-o", "writeback") & abi.WRITEBACK_CACHE
    # --allow-mmap: only a guest that knows the flag (7.39, Linux >= 6.6) gets it
    assert not init_flags(start_daemon, offer=LINUX_6_12_INIT_FLAGS) & abi.DIRECT_IO_ALLOW_MMAP
    assert init_flags(start_daemon, "--cache=never", "--allow-mmap",
                      offer=LINUX_6_12_INIT_FLAGS) & abi.DIRECT_IO_ALLOW_MMAP
    assert not init_flags(start_daemon, "--allow-mmap") & abi.DIRECT_IO_ALLOW_MMAP


def test_no_readdirplus_answers_readdirplus_with_enosys(start_daemon):
    d = start_daemon(extra_args=["--no-readdirplus"])
    (Path(d.shared_dir) / "f").write_text("x")
    c = d.client()
    fh = c.opendir(ROOT).fh
    assert b"f" in [e.name for e in c.readdir(ROOT, fh)]
    with pytest.raises(FuseError) as e:
        c.readdirplus(ROOT, fh)
    assert e.value.errno == errno.ENOSYS


@pytest.mark.parametrize("option, flag", [("--allow-direct-io", os.O_DIRECT),
                                          ("--preserve-noatime", os.O_NOATIME)])
def test_guest_open_flag_reaches_the_host_only_with_the_option(start_daemon, option, flag):
    for args, kept in (((), False), ((option,), True)):
        d = start_daemon(extra_args=args)
        f = Path(d.shared_dir) / "data"
        f.write_bytes(b"\0" * 8192)
        c = d.client()
        e = c.lookup(ROOT, "data")
        fh = c.open(e.nodeid, os.O_RDONLY | flag).fh
        flags = host_open_flags(d.pid, f)
        assert len(flags) == 1, flags
        assert bool(flags[0] & flag) == kept, (args, oct(flags[0]))
        c.release(e.nodeid, fh)
        # created files too
        fh2 = c.create(ROOT, f"new{len(args)}", flags=os.O_RDWR | os.O_CREAT | flag)[1].fh
        flags = host_open_flags(d.pid, Path(d.shared_dir) / f"new{len(args)}")
        assert len(flags) == 1 and bool(flags[0] & flag) == kept, (args, flags)
        c.release(ROOT, fh2)


def test_writeback_opens_write_only_files_readable_and_drops_o_append(start_daemon):
    for args in ((), ("--writeback",)):
        d = start_daemon(extra_args=args)
        f = Path(d.shared_dir) / "data"
        f.write_bytes(b"0123456789")
        c = d.client()
        e = c.lookup(ROOT, "data")
        fh = c.open(e.nodeid, os.O_WRONLY | os.O_APPEND).fh
        # the guest's page cache fills a partial page before writing it back
        if args:
            assert c.read(e.nodeid, fh, 0, 4) == b"0123"
        else:
            with pytest.raises(FuseError) as err:
                c.read(e.nodeid, fh, 0, 4)
            assert err.value.errno == errno.EBADF
        # with writeback the guest places appends itself: the offset it sends is used
        c.write(e.nodeid, fh, 2, b"ab")
        c.release(e.nodeid, fh)
        want = b"01ab456789" if args else b"0123456789ab"
        assert f.read_bytes() == want, args


def test_compat_timeout_sets_entry_and_attribute_timeouts(start_daemon):
    for args, want in (((), 1), (("-o", "timeout=7"), 7), (("--cache=never",), 0)):
        d = start_daemon(extra_args=args)
        (Path(d.shared_dir) / "f").write_text("x")
        e = d.client().lookup(ROOT, "f")
        assert (e.entry_valid, e.attr_valid) == (want, want), args


def test_log_level_trace_logs_every_request(start_daemon):
    for level, traced in (("debug", False), ("trace", True)):
        d = start_daemon(extra_args=[f"--log-level={level}"])
        c = d.client()
        with pytest.raises(FuseError):
            c.lookup(ROOT, "missing")
        d.finish()
        log = d.log()
        assert ("request LOOKUP" in log) == traced, log[-2000:]
        assert ("TRACE" in log) == traced


def test_socket_group_owns_the_socket_and_may_connect(start_daemon, tmp_path):
    group = "nogroup" if _has_group("nogroup") else "daemon"
    gid = grp.getgrnam(group).gr_gid
    d = start_daemon(extra_args=[f"--socket-group={group}"])
    st = os.stat(d.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_gid == gid
    assert st.st_mode & 0o060 == 0o060 and st.st_mode & 0o007 == 0
    # a process whose only group is that one can connect; an outsider cannot
    os.chmod(d.sockdir, 0o711)
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); print('connected')")

    def connect_as(group_id: int) -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", "--reuid=65534", f"--regid={group_id}",
                               "--clear-groups", sys.executable, "-c", probe, d.socket_path],
                              capture_output=True, text=True, timeout=30)

    outsider = connect_as(1 if gid != 1 else 2)  # first: the daemon serves one connection
    assert "PermissionError" in outsider.stderr, outsider
    member = connect_as(gid)
    assert member.stdout.strip() == "connected", member.stderr
    d.connected = True  # the member's connection ended the daemon's one session


def test_socket_without_group_is_private(daemon):
    assert os.stat(daemon.socket_path).st_mode & 0o077 == 0


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False

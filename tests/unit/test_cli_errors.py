"""Bad input on the command line, through the real ``pyvirtiofsd`` process: every option with
a wrong value gets a one-line error and exit status 2 (the command line is wrong) or 1 (the
environment does not allow it), never a traceback; and nothing already on disk is lost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pyvirtiofs import options
from tests.unit.daemon import Daemon, daemon_env

NOBODY = 65534


def run(argv, *, as_nobody=False, pass_fds=(), timeout=30) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pyvirtiofs", *argv]
    if as_nobody:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=daemon_env(),
                          pass_fds=pass_fds, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, status: int, *words: str) -> str:
    err = r.stderr
    assert "Traceback" not in err, err
    assert r.returncode == status, (r.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pyvirtiofsd: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def place(tmp_path_factory):
    """A short directory (sun_path is 108 bytes) with a share in it."""
    d = Path(tempfile.mkdtemp(prefix="pvc-", dir="/tmp"))
    (d / "share").mkdir()
    (d / "file").write_text("precious\n")
    yield d
    subprocess.run(["rm", "-rf", str(d)])


# -- the command line is wrong: exit 2 ---------------------------------------------------
USAGE = [
    (["--bogus"], "--bogus"),
    (["--shared-dir"], "--shared-dir"),
    (["--socket-path"], "--socket-path"),
    (["--fd=three"], "--fd"),
    (["--fd=-1"], "--fd"),
    (["--thread-pool-size=-1"], "--thread-pool-size"),
    (["--thread-pool-size=1.5"], "--thread-pool-size"),
    (["--rlimit-nofile=-5"], "--rlimit-nofile"),
    (["--rlimit-nofile=lots"], "--rlimit-nofile"),
    (["--cache=sometimes"], "--cache"),
    (["--sandbox=jail"], "--sandbox"),
    (["--seccomp=maybe"], "--seccomp"),
    (["--inode-file-handles=always"], "--inode-file-handles"),
    (["--log-level=loud"], "--log-level"),
    (["--modcaps=+frobnicate"], "--modcaps"),
    (["--modcaps=chown"], "--modcaps"),
    (["--xattrmap=:prefix:all:"], "--xattrmap"),
    (["--xattrmap=:prefix:nobody:::"], "--xattrmap"),
    (["--translate-uid=guest:0:1000"], "--translate-uid"),
    (["--translate-uid=map:0:x:1"], "--translate-uid"),
    (["--translate-gid=squash-guest:0:1000:0"], "--translate-gid"),
    (["--translate-gid=copy:0:1:1"], "--translate-gid"),
    (["--uid-map=:0:1000:"], "--uid-map"),
    (["--uid-map=:0:99999999999:1:"], "--uid-map"),
    (["--gid-map=0:1000:1"], "--gid-map"),
    (["--posix-acl", "--translate-uid=map:0:0:1"], "--posix-acl"),
    (["--no-xattr", "--posix-acl"], "--no-xattr"),
    (["--migration-mode=file-handles"], "migration is not implemented"),
    (["--migration-on-error=guest-error"], "migration is not implemented"),
    (["--migration-verify-handles"], "migration is not implemented"),
    (["--migration-confirm-paths"], "migration is not implemented"),
    (["-o", "cache=sometimes"], "cache"),
    (["-o", "bogus"], "-o bogus"),
    (["-o", "timeout=-1"], "timeout"),
    (["-o", "log_level=loud"], "log_level"),
    (["--tag=" + "x" * 37], "--tag"),
    (["--tag="], "--tag"),
    (["--dax-window=banana"], "--dax-window"),
    (["--dax-window=4097"], "--dax-window"),
    (["--dax=sometimes"], "--dax"),
    (["--version-table-slots=-4"], "--version-table-slots"),
]


@pytest.mark.parametrize("argv, says", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors(place, argv, says):
    base = [f"--shared-dir={place / 'share'}", f"--socket-path={place / 's'}"]
    r = run(base + argv)
    assert_one_line_error(r, 2, says)
    assert not (place / "s").exists()


def test_missing_required_options():
    assert_one_line_error(run([]), 2, "--shared-dir")
    assert_one_line_error(run(["--shared-dir=/"]), 2, "--socket-path or --fd")


def test_every_option_is_implemented():
    # main() refuses any option listed here with "not implemented yet"; none is left
    assert options.NOT_IMPLEMENTED == {}


def test_uid_map_needs_the_namespace_sandbox(place):
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 's'}",
             "--uid-map=:0:100000:65536:", "--sandbox=none"])
    assert_one_line_error(r, 2, "--uid-map", "--sandbox=namespace")


def test_uid_map_as_an_ordinary_user_without_subordinate_ids(place):
    # libvirt's unprivileged maps go through newuidmap/newgidmap (package uidmap): missing
    # here, or refusing ranges /etc/subuid does not give nobody
    os.chmod(place, 0o755)
    os.chmod(place / "share", 0o777)
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 'share' / 's'}",
             "--uid-map=:0:100000:10:", "--gid-map=:0:100000:10:"], as_nobody=True)
    assert_one_line_error(r, 1, "newuidmap")
    assert not (place / "share" / "s").exists()


# -- the environment does not allow it: exit 1 -------------------------------------------
def test_shared_dir_missing_or_not_a_directory(place):
    for bad in (place / "nothere", place / "file"):
        r = run([f"--shared-dir={bad}", f"--socket-path={place / 's'}"])
        assert_one_line_error(r, 1, str(bad))
        assert not (place / "s").exists()
    r = run([f"--socket-path={place / 's'}", "-o", f"source={place / 'nothere'}"])
    assert_one_line_error(r, 1, "nothere")


def test_inode_file_handles_mandatory_where_there_are_none(place):
    r = run(["--shared-dir=/proc/sys", f"--socket-path={place / 's'}",
             "--inode-file-handles=mandatory"])
    assert_one_line_error(r, 1, "file handles unsupported")
    assert not (place / "s").exists()


def test_version_table_in_a_missing_directory(place):
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 's'}",
             f"--version-table={place / 'no' / 'table'}"])
    assert_one_line_error(r, 1, "--version-table")


def test_shared_dir_without_permission(place):
    secret = place / "secret"
    secret.mkdir(mode=0o700)
    os.chmod(place, 0o755)
    os.chmod(place / "share", 0o777)
    r = run([f"--shared-dir={secret}", f"--socket-path={place / 'share' / 's'}"],
            as_nobody=True)
    assert_one_line_error(r, 1, str(secret), "Permission denied")


def test_socket_path_naming_a_regular_file_is_refused_and_kept(place):
    f = place / "file"
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={f}"])
    assert_one_line_error(r, 1, "not a socket")
    assert f.read_text() == "precious\n"
    assert not Path(f"{f}.pid").exists()


def test_socket_path_naming_a_directory_or_symlink_is_refused(place):
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 'share'}"])
    assert_one_line_error(r, 1, "not a socket")
    (place / "link").symlink_to(place / "file")
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 'link'}"])
    assert_one_line_error(r, 1, "not a socket")
    assert (place / "link").is_symlink() and (place / "file").read_text() == "precious\n"


def test_socket_path_in_a_missing_directory(place):
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 'no' / 'dir' / 's'}"])
    assert_one_line_error(r, 1, "--socket-path")


def test_socket_path_too_long(place):
    long_path = place / ("x" * 120)
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={long_path}"])
    assert_one_line_error(r, 1, "--socket-path")


def test_socket_path_in_a_directory_without_permission(place):
    locked = place / "locked"
    locked.mkdir(mode=0o755)
    os.chmod(place, 0o755)
    os.chmod(place / "share", 0o777)
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={locked / 's'}"],
            as_nobody=True)
    assert_one_line_error(r, 1, "--socket-path", "Permission denied")


def test_socket_in_use_is_refused_and_a_stale_one_replaced(place):
    sock = place / "s"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock))
    live.listen(1)
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={sock}"])
    assert_one_line_error(r, 1, "another process is listening")
    assert sock.exists()
    live.close()  # now stale: the file stays, nobody listens
    assert sock.exists()
    d = Daemon(place / "share")
    d.socket_path = str(sock)
    d.pid_path = f"{sock}.pid"
    d.argv = [a if not a.startswith("--socket-path=") else f"--socket-path={sock}"
              for a in d.argv]
    d.start()
    try:
        with d.frontend():
            pass
    finally:
        d.finish()


def test_fd_that_is_not_a_listening_socket(place):
    r = run([f"--shared-dir={place / 'share'}", "--fd=97"])
    assert_one_line_error(r, 1, "--fd 97", "not an open file descriptor")
    with open(place / "file") as f:
        r = run([f"--shared-dir={place / 'share'}", f"--fd={f.fileno()}"], pass_fds=[f.fileno()])
        assert_one_line_error(r, 1, f"--fd {f.fileno()}", "not a socket")
    a, b = socket.socketpair()
    with a, b:
        r = run([f"--shared-dir={place / 'share'}", f"--fd={a.fileno()}"], pass_fds=[a.fileno()])
        assert_one_line_error(r, 1, "not a listening Unix stream socket")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        r = run([f"--shared-dir={place / 'share'}", f"--fd={udp.fileno()}"],
                pass_fds=[udp.fileno()])
        assert_one_line_error(r, 1, "not a listening Unix stream socket")


def test_unknown_socket_group(place):
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 's'}",
             "--socket-group=no-such-group-here"])
    assert_one_line_error(r, 1, "--socket-group", "no-such-group-here")
    assert not (place / "s").exists()


def test_rlimit_nofile_beyond_the_system_maximum(place):
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 's'}",
             f"--rlimit-nofile={2 ** 40}"])
    assert_one_line_error(r, 1, "RLIMIT_NOFILE")
    assert not (place / "s").exists()


def test_sandbox_that_needs_root_as_an_ordinary_user(place):
    os.chmod(place, 0o755)
    os.chmod(place / "share", 0o777)
    r = run([f"--shared-dir={place / 'share'}", f"--socket-path={place / 'share' / 's'}",
             "--sandbox=chroot"], as_nobody=True)
    assert_one_line_error(r, 1, "chroot")
    assert not (place / "share" / "s").exists()


def test_syslog_without_a_syslog_daemon_logs_to_stderr_once(tmp_path, monkeypatch, capfd):
    """virtme-ng passes --syslog; in a container there is no /dev/log.  The daemon says so once
    and keeps logging to stderr, instead of a traceback for every message."""
    import logging

    from pyvirtiofs import cli
    monkeypatch.setattr(cli, "SYSLOG_SOCKET", str(tmp_path / "no-syslog-here"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli._setup_logging("info", True)
        logging.getLogger("pyvirtiofs.test").info("a message after the fallback")
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capfd.readouterr().err
    assert "--syslog: cannot reach" in err and "No such file or directory" in err, err
    assert "a message after the fallback" in err, err
    assert "Traceback" not in err and "Logging error" not in err, err

"""A real guest against pyvirtiofsd started by an ordinary user, as rootless podman runs
virtiofsd: no capability, the default --sandbox=namespace inside a user namespace of its
own, and what the guest creates belongs to that user on the host."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

NOBODY = 65534

GUEST = r"""
set -e
cat from-host
echo "guest data" > made-by-guest
mkdir dir
echo nested > dir/file
ln -s made-by-guest link
echo "owner=$(stat -c %u made-by-guest)"
echo "listing=$(ls | tr '\n' ' ')"
if chmod 000 from-host 2>/dev/null; then echo chmod=allowed; else echo chmod=refused; fi
sync
"""


def test_guest_against_a_daemon_run_by_an_ordinary_user(guest_ready):
    top = Path(tempfile.mkdtemp(prefix="pyvfs-rootless-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        shared, run = top / "share", top / "run"
        shared.mkdir()
        run.mkdir()
        (shared / "from-host").write_text("host data\n")  # owned by root
        os.chown(shared, NOBODY, NOBODY)
        os.chown(run, NOBODY, NOBODY)
        sock = str(run / "vfs.sock")
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "--inh-caps=-all", sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                f"--shared-dir={shared}", "--log-level=debug"]
        d = guestvm.DaemonProcess(argv, sock, env=daemon_env(), wait_pidfile=True,
                                  log_path=top / "daemon.log").start()
        try:
            res = guestvm.run_guest(GUEST, [guestvm.Share("vfs", socket=sock)], daemons=[d],
                                    timeout=300)
        finally:
            status = d.stop()
        log = d.log
        assert status == 0, guestvm._tail(log, 60)
        assert "Traceback" not in log and " ERROR " not in log, guestvm._tail(log, 80)
        assert "sandbox: user namespace" in log and "sandbox: namespace" in log, log[-3000:]
        assert res.status == 0, res.output
        assert "host data" in res.output
        out = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
        assert out["owner"] == str(NOBODY)
        assert out["listing"].split() == ["dir", "from-host", "link", "made-by-guest"]
        # the daemon holds no capability over the host's files: root's file stays as it was
        assert out["chmod"] == "refused"
        assert (shared / "from-host").stat().st_mode & 0o777 == 0o644
        for p in ("made-by-guest", "dir", "dir/file", "link"):
            st = os.lstat(shared / p)
            assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), p
        assert (shared / "made-by-guest").read_text() == "guest data\n"
        assert (shared / "dir" / "file").read_text() == "nested\n"
        assert os.readlink(shared / "link") == "made-by-guest"
    finally:
        shutil.rmtree(top, ignore_errors=True)

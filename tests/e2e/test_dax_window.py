"""--dax-window with the QEMU these machines have (7.2, no vhost-user SHMEM): QEMU leaves the
SHMEM protocol feature alone, so the guest gets no window (a ``dax=always`` mount is refused by
the guest kernel) and the share works as without the option, with the backend channel QEMU
sets up for BACKEND_REQ.  The window itself is tested through the project's frontend
(tests/unit/test_dax.py), since no QEMU here can map into a vhost-user device."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

SCRIPT = r"""
set -e
echo "before=$(md5sum big | cut -d' ' -f1)"
echo "written by the guest" > from-guest
cd /
umount /mnt/dax
mkdir -p /mnt/try
if mount -t virtiofs -o dax=always dax /mnt/try 2>/dev/null; then
  echo "dax-always=mounted"; umount /mnt/try
else
  echo "dax-always=refused"
fi
mount -t virtiofs dax /mnt/dax
echo "after=$(md5sum /mnt/dax/big | cut -d' ' -f1)"
cat /mnt/dax/from-guest
sync
"""


def test_dax_window_with_qemu_72(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "dax"
    shared = tmp / "share"
    shared.mkdir(parents=True)
    big = os.urandom(3 << 20)
    (shared / "big").write_bytes(big)
    sock = str(tmp / "dax.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}", "--log-level=debug",
                               "--dax-window=64M", "--dax=inode"],
                              sock, env=daemon_env()).start()
    try:
        res = guestvm.run_guest(SCRIPT, [guestvm.Share("dax", socket=d.socket_path)],
                                daemons=[d], timeout=300)
    finally:
        status = d.stop()
    log = d.log
    assert status == 0, guestvm._tail(log, 60)
    assert "Traceback" not in log and " ERROR " not in log, guestvm._tail(log, 80)
    assert res.status == 0, res.output
    out = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    want = hashlib.md5(big).hexdigest()
    assert out["before"] == want and out["after"] == want, res.output
    assert out["dax-always"] == "refused", res.output     # no window reached the guest
    assert "written by the guest" in res.output
    assert (shared / "from-guest").read_text() == "written by the guest\n"
    assert "no vhost-user SHMEM" in log                    # the daemon says why
    # and negotiates neither MAP_ALIGNMENT nor per-inode DAX with a guest that has no window
    m = re.search(r"negotiated (0x[0-9a-f]+)", log)
    assert m and not int(m.group(1), 16) & (abi.MAP_ALIGNMENT | abi.HAS_INODE_DAX), m
    assert "SETUPMAPPING" not in log

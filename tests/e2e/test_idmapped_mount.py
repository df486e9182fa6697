"""Idmapped mounts of a pyvirtiofsd share in a Linux 6.12 guest (FUSE_ALLOW_IDMAP, which
virtiofsd 1.13 also accepts).

The guest mounts the share at /mnt/im, then makes an idmapped mount of it at /mnt/mapped
(open_tree + mount_setattr(MOUNT_ATTR_IDMAP) + move_mount, through ctypes: Debian 12's mount
has no X-mount.idmap) with a user namespace that shows the file system's id 1000 as 2000:

- a file the host made as 1000:1000 shows as 2000:2000 under /mnt/mapped, 1000:1000 under
  /mnt/im;
- guest user 2000 reads a 0600 file of host user 1000 through /mnt/mapped (it is its owner
  there) and is refused through /mnt/im;
- what guest user 2000 creates through /mnt/mapped lands on the host as 1000:1000, what it
  creates through /mnt/im as 2000:2000.

Without FUSE_ALLOW_IDMAP the kernel refuses the idmapped mount (EINVAL), so the first line
of the guest's output already tells whether the daemon offered it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

IDMAP = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_open_tree, SYS_move_mount, SYS_mount_setattr = 428, 429, 442
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_IDMAP = 1, 4, 0x100000


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(ret, what):
    if ret < 0:
        e = ctypes.get_errno()
        print(f"idmap={what}:{os.strerror(e)}")
        sys.exit(0)
    return ret

# a user namespace in which the file system's id 1000 is 2000
ready_r, ready_w = os.pipe()
hold_r, hold_w = os.pipe()
pid = os.fork()
if pid == 0:
    # the test's guest runs scripts in a chroot, where CLONE_NEWUSER is refused: this child
    # only makes the namespace, so it may take init's root instead
    os.chroot("/proc/1/root")
    if libc.unshare(0x10000000) < 0:  # CLONE_NEWUSER
        print(f"idmap=unshare:{os.strerror(ctypes.get_errno())}", flush=True)
    os.write(ready_w, b"x")
    os.read(hold_r, 1)
    os._exit(0)
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("1000 2000 1\n")  # inside (the file system's id) 1000, seen as 2000
userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
tree = check(libc.syscall(SYS_open_tree, AT_FDCWD, b"/mnt/im",
                          OPEN_TREE_CLONE | os.O_CLOEXEC), "open_tree")
attr = MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns)
check(libc.syscall(SYS_mount_setattr, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                   ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")
os.makedirs("/mnt/mapped", exist_ok=True)
check(libc.syscall(SYS_move_mount, tree, b"", AT_FDCWD, b"/mnt/mapped",
                   MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
os.write(hold_w, b"x")
os.waitpid(pid, 0)
print("idmap=ok")
'''

GUEST = r"""
set -u
say() { echo "$1=$2"; }
as2000() { setpriv --reuid=2000 --regid=2000 --clear-groups -- "$@"; }
""" + guestvm.embed_file("/tmp/idmap.py", IDMAP) + r"""
python3 /tmp/idmap.py
say plain_owner "$(stat -c %u:%g /mnt/im/owned)"
say mapped_owner "$(stat -c %u:%g /mnt/mapped/owned)"
say mapped_read "$(as2000 cat /mnt/mapped/owned 2>&1)"
say plain_read "$(as2000 cat /mnt/im/owned 2>&1 || true)"
say mapped_create "$(as2000 sh -c 'echo m > /mnt/mapped/pub/via-mapped' 2>&1 && echo ok)"
say plain_create "$(as2000 sh -c 'echo p > /mnt/im/pub/via-plain' 2>&1 && echo ok)"
say mapped_new_owner "$(stat -c %u:%g /mnt/mapped/pub/via-mapped)"
umount /mnt/mapped
"""


def test_idmapped_mount_of_the_share(guest_ready, short_tmp):
    assert os.geteuid() == 0, "the daemon must be root to create files as the guest's users"
    tmp = Path(short_tmp) / "idmapped"
    shared = tmp / "share"
    shared.mkdir(parents=True)
    owned = shared / "owned"
    owned.write_text("secret of 1000\n")
    os.chown(owned, 1000, 1000)
    os.chmod(owned, 0o600)
    (shared / "pub").mkdir()
    os.chmod(shared / "pub", 0o777)
    os.chown(shared / "pub", 1000, 1000)  # Linux refuses writes to unmapped-owner inodes
    sock = str(tmp / "s.sock")
    d = guestvm.DaemonProcess([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                               f"--shared-dir={shared}"], sock, env=daemon_env()).start()
    try:
        res = guestvm.run_guest(GUEST, [guestvm.Share("im", socket=sock)], hostroot=True,
                                kernel="6.12", timeout=300, daemons=[d])
        rc = d.wait(timeout=30)
    finally:
        d.stop()
    assert res.status == 0, res.output[-3000:]
    assert rc == 0 and "Traceback" not in d.log, d.log[-5000:]
    out = dict(line.split("=", 1) for line in res.output.splitlines()
               if re.match(r"^[a-z_]+=", line))
    m = re.search(r"negotiated (0x[0-9a-f]+)", d.log)
    assert m and int(m.group(1), 16) & 1 << 40, "FUSE_ALLOW_IDMAP not negotiated"
    assert out.get("idmap") == "ok", out
    assert (out["plain_owner"], out["mapped_owner"]) == ("1000:1000", "2000:2000"), out
    assert out["mapped_read"] == "secret of 1000", out
    assert "Permission denied" in out["plain_read"], out
    assert (out["mapped_create"], out["plain_create"]) == ("ok", "ok"), out
    assert out["mapped_new_owner"] == "2000:2000", out
    via_mapped = os.stat(shared / "pub" / "via-mapped")
    via_plain = os.stat(shared / "pub" / "via-plain")
    assert (via_mapped.st_uid, via_mapped.st_gid) == (1000, 1000)
    assert (via_plain.st_uid, via_plain.st_gid) == (2000, 2000)

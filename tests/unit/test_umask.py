"""PassthroughFs in a library user's process: new files get exactly the mode the guest asked
for, whatever the process's umask, and the process's umask stays the user's."""

import os
import stat
import struct
import threading

import pytest

from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.passthrough import PassthroughFs

from .fuse_direct import DirectClient

USER_UMASK = 0o027  # a library user's own umask: bits a guest's modes must not lose


def process_umask() -> int:
    """The umask of the process's main thread, as the kernel reports it (no umask(2) call,
    which would change it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status (Linux >= 4.7 has one)")


@pytest.fixture
def user_umask():
    old = os.umask(USER_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def create_files(share, posix_acl, guest_umask):
    """What a guest does: a file (0666), a directory (0777) and a FIFO (0666) in the share."""
    c = DirectClient(FuseServer(PassthroughFs(str(share), posix_acl=posix_acl)))
    c.init()
    for opcode, body in ((Opcode.CREATE, struct.pack("<IIII", os.O_WRONLY, 0o100666,
                                                     guest_umask, 0) + b"file\0"),
                         (Opcode.MKDIR, struct.pack("<II", 0o777, guest_umask) + b"dir\0"),
                         (Opcode.MKNOD, struct.pack("<IIII", stat.S_IFIFO | 0o666, 0,
                                                    guest_umask, 0) + b"fifo\0")):
        r = c.call(opcode, 1, body)
        assert r.error == 0, (opcode, r.errno)
    return {name: stat.S_IMODE(os.lstat(share / name).st_mode) for name in ("file", "dir", "fifo")}


@pytest.mark.parametrize("where", ["main thread", "another thread"])
def test_modes_are_the_guests_and_the_process_umask_stays(tmp_path, user_umask, where):
    # Without --posix-acl the guest kernel applied its umask (here 022) to the modes already:
    # the file system creates with them as they are, not with the process's 027 on top.
    modes = {}
    if where == "main thread":
        modes = create_files(tmp_path, posix_acl=False, guest_umask=0o022)
    else:
        t = threading.Thread(target=lambda: modes.update(create_files(tmp_path, False, 0o022)))
        t.start()
        t.join()
    assert modes == {"file": 0o666, "dir": 0o777, "fifo": 0o666}
    assert process_umask() == USER_UMASK
    assert os.umask(USER_UMASK) == USER_UMASK  # this thread's own too


def test_with_posix_acl_the_guests_umask_applies_not_the_processs(tmp_path, user_umask):
    # FUSE_DONT_MASK: the guest sends modes unmasked and its umask beside them
    modes = create_files(tmp_path, posix_acl=True, guest_umask=0o002)
    assert modes == {"file": 0o664, "dir": 0o775, "fifo": 0o664}
    assert process_umask() == USER_UMASK


def test_constructing_a_passthrough_fs_leaves_the_umask_alone(tmp_path, user_umask):
    fs = PassthroughFs(str(tmp_path))
    try:
        assert process_umask() == USER_UMASK
    finally:
        fs.close()

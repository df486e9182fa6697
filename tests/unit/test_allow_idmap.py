"""FUSE_ALLOW_IDMAP at the daemon: offered to a guest that offers it (Linux 6.9+), as
virtiofsd does, and then every request that creates nothing comes with uid = gid = 2**32-1
(Linux maps creators' ids through the idmapped mount and sends those only on creations).
The daemon serves such requests as any other, and creates as the ids a creation carries.
(tests/e2e/test_idmapped_mount.py makes an idmapped mount in a real 6.12 guest.)"""

from __future__ import annotations

import os

from pyvirtiofs.filesystem import FileSystem
from pyvirtiofs.fuse import abi
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.testing.frontend import (FUSE_ALLOW_IDMAP, FUSE_INVALID_UIDGID, FUSE_ROOT_ID,
                                         LINUX_6_1_INIT_FLAGS)

from .fuse_direct import DirectClient

LINUX_6_12_OFFER = LINUX_6_1_INIT_FLAGS | FUSE_ALLOW_IDMAP


def test_offered_only_to_a_guest_that_offers_it(start_daemon):
    d = start_daemon()
    assert d.client(init=False).init(flags=LINUX_6_12_OFFER).flags & FUSE_ALLOW_IDMAP
    d2 = start_daemon()
    assert not d2.client(init=False).init(flags=LINUX_6_1_INIT_FLAGS).flags & FUSE_ALLOW_IDMAP


def test_requests_with_invalid_ids_are_served(start_daemon, tmp_path):
    d = start_daemon()
    (tmp_path / "shared" / "f").write_bytes(b"data")
    c = d.client(init=False)
    c.init(flags=LINUX_6_12_OFFER)
    c.uid = c.gid = FUSE_INVALID_UIDGID
    nid = c.lookup(FUSE_ROOT_ID, "f").nodeid
    assert c.getattr(nid).attr.size == 4
    fh = c.open(nid, os.O_RDWR).fh
    assert c.read(nid, fh, 0, 4) == b"data"
    c.write(nid, fh, 4, b"+more")
    c.release(nid, fh)
    assert (tmp_path / "shared" / "f").read_bytes() == b"data+more"
    # a creation carries the creator's ids, mapped through the guest's idmapped mount
    c.uid = c.gid = 1000
    c.mkdir(FUSE_ROOT_ID, "made")
    st = os.stat(tmp_path / "shared" / "made")
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_a_library_file_system_is_not_offered_it():
    """A FileSystem of the library may look at every request's ids: idmapped mounts stay off
    unless its capabilities say ids matter only to creations."""
    client = DirectClient(FuseServer(FileSystem()))
    r = client.init(flags=LINUX_6_1_INIT_FLAGS & 0xFFFFFFFF,
                    flags2=(LINUX_6_12_OFFER >> 32) & 0xFFFFFFFF)
    f = abi.INIT_OUT.unpack(r.body)
    assert not (f[3] | f[10] << 32) & FUSE_ALLOW_IDMAP

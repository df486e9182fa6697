"""FUSE_CREATE_SUPP_GROUP, served by the pyvirtiofsd process as virtiofsd serves it.

A guest user who may write to a directory only through a supplementary group (the directory's
group) creates files there: Linux 6.3+ sends that group with CREATE, MKDIR, MKNOD and SYMLINK
(the kernel's rule: the parent's group is one of the caller's groups but not its fsgid).  The
daemon creates as the guest user (fsuid/fsgid) with that group among the thread's groups, so
the host lets the creation through, and a setgid bit the user asks for inside a setgid
directory stays, as it would for that user on the host.  A guest that has the extension but
sends no group has none to write through: the host refuses (EACCES).  A guest without the
extension (Linux 6.1) cannot say, so, as virtiofsd, the daemon keeps CAP_DAC_OVERRIDE for
the creation and the guest's own permission check is the one that counts.  The group goes
through --translate-gid like every other id.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from pyvirtiofs.testing.frontend import (FUSE_CREATE_SUPP_GROUP, FUSE_ROOT_ID, FuseError,
                                         LINUX_6_1_INIT_FLAGS)

USER, GROUP, SHARED_GROUP = 1000, 1000, 2000
LINUX_6_12_OFFER = LINUX_6_1_INIT_FLAGS | FUSE_CREATE_SUPP_GROUP


def client_as_user(d, supp_groups=(), offer=LINUX_6_12_OFFER):
    c = d.client(init=False)
    c.init(flags=offer)
    c.uid, c.gid = USER, GROUP
    c.supp_groups = supp_groups
    return c


def group_dir(shared, name, gid=SHARED_GROUP, mode=0o775):
    p = shared / name
    p.mkdir()
    os.chown(p, 0, gid)
    os.chmod(p, mode)
    return p


def create_each_kind(c, parent: int) -> dict[str, int]:
    """CREATE, MKDIR, MKNOD and SYMLINK in ``parent``: name -> errno (0: made)."""
    out = {}
    for name, make in (("file", lambda: c.create(parent, "file", 0o644)),
                       ("dir", lambda: c.mkdir(parent, "dir", 0o755)),
                       ("fifo", lambda: c.mknod(parent, "fifo", stat.S_IFIFO | 0o644)),
                       ("link", lambda: c.symlink(parent, "link", "file"))):
        try:
            make()
            out[name] = 0
        except FuseError as e:
            out[name] = e.errno
    return out


def test_init_offers_create_supp_group(daemon):
    c = daemon.client(init=False)
    assert c.init(flags=LINUX_6_12_OFFER).flags & FUSE_CREATE_SUPP_GROUP


def test_group_member_creates_in_a_group_writable_directory(start_daemon, tmp_path):
    assert os.geteuid() == 0, "the daemon must be root to create files as a guest user"
    d = start_daemon()
    shared = tmp_path / "shared"
    g = group_dir(shared, "team")
    c = client_as_user(d)
    team = c.lookup(FUSE_ROOT_ID, "team").nodeid
    # no group sent: the caller has none to write through, and the host says no
    assert create_each_kind(c, team) == {k: errno.EACCES for k in ("file", "dir", "fifo", "link")}
    assert os.listdir(g) == []
    c.supp_groups = (SHARED_GROUP,)
    assert create_each_kind(c, team) == {"file": 0, "dir": 0, "fifo": 0, "link": 0}
    for name in ("file", "dir", "fifo", "link"):
        st = os.lstat(g / name)
        assert (st.st_uid, st.st_gid) == (USER, GROUP), name  # the user's, not root's
    # the daemon's own groups are back after each request: a later request without the
    # group is refused again
    c.supp_groups = ()
    with pytest.raises(FuseError) as e:
        c.mkdir(team, "again")
    assert e.value.errno == errno.EACCES


def test_a_guest_without_the_extension_relies_on_its_own_check(start_daemon, tmp_path):
    d = start_daemon()
    g = group_dir(tmp_path / "shared", "team", mode=0o770)
    c = client_as_user(d, offer=LINUX_6_1_INIT_FLAGS)  # Linux 6.1: no CREATE_SUPP_GROUP
    assert not c.negotiated & FUSE_CREATE_SUPP_GROUP
    team = c.lookup(FUSE_ROOT_ID, "team").nodeid
    assert create_each_kind(c, team) == {"file": 0, "dir": 0, "fifo": 0, "link": 0}
    assert os.stat(g / "file").st_uid == USER  # still created as the guest user


def test_setgid_directory_keeps_the_setgid_bit_the_member_asks_for(start_daemon, tmp_path):
    d = start_daemon()
    shared = tmp_path / "shared"
    g = group_dir(shared, "sgid", mode=0o2777)  # anyone may write; files get group 2000
    c = client_as_user(d)
    sgid = c.lookup(FUSE_ROOT_ID, "sgid").nodeid
    c.create(sgid, "not-member", 0o2755)  # a non-member's setgid bit is dropped
    c.supp_groups = (SHARED_GROUP,)
    c.create(sgid, "member", 0o2755)
    outside = os.stat(g / "not-member")
    member = os.stat(g / "member")
    assert (outside.st_gid, member.st_gid) == (SHARED_GROUP, SHARED_GROUP)
    assert not outside.st_mode & stat.S_ISGID, oct(outside.st_mode)
    assert member.st_mode & stat.S_ISGID, oct(member.st_mode)


def test_the_group_goes_through_translate_gid(start_daemon, tmp_path):
    # guest group 2000 is host group 3000; a directory of host group 3000
    d = start_daemon(extra_args=["--translate-gid=map:2000:3000:1"])
    shared = tmp_path / "shared"
    g = group_dir(shared, "mapped", gid=3000)
    c = client_as_user(d, supp_groups=(SHARED_GROUP,))
    mapped = c.lookup(FUSE_ROOT_ID, "mapped").nodeid
    assert c.getattr(mapped).attr.gid == SHARED_GROUP  # shown as the guest's group
    c.mkdir(mapped, "made")
    assert os.stat(g / "made").st_uid == USER
    # a guest group a forbid-guest rule names is refused, not passed through
    d2 = start_daemon(extra_args=["--translate-gid=forbid-guest:2000:1"])
    group_dir(tmp_path / "shared1", "team")
    c2 = client_as_user(d2, supp_groups=(SHARED_GROUP,))
    team = c2.lookup(FUSE_ROOT_ID, "team").nodeid
    with pytest.raises(FuseError) as e:
        c2.mkdir(team, "made")
    assert e.value.errno == errno.EPERM


def test_malformed_group_extensions_are_einval(start_daemon):
    import struct
    d = start_daemon()
    c = client_as_user(d)
    c.uid = c.gid = 0
    body = [struct.pack("<II", 0o40755, 0), b"d\0"]
    for ext in (struct.pack("<IIII", 16, 32, 5, 7),            # says 5 groups, carries 1
                struct.pack("<IIII", 16, 32, 0xFFFFFFFF, 0)):  # absurd count
        r = c.wait(c.submit(9, FUSE_ROOT_ID, body, [128], ext=ext))  # MKDIR
        assert r.error == errno.EINVAL, r.error
    assert c.mkdir(FUSE_ROOT_ID, "fine").nodeid  # and the daemon serves on

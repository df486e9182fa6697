"""--posix-acl and --security-label behind the FUSE server: what INIT negotiates, the umask
the guest leaves to the daemon, and the security context sent with new files."""

import errno
import os
import stat
import struct

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.passthrough import PassthroughFs

from .fuse_direct import IN, DirectClient, Reply

LINUX_6_1_FLAGS, LINUX_6_1_FLAGS2 = 0x7BFFFFFB, 0xB  # what a 6.1 guest offers


def init_flags(r):
    f = abi.INIT_OUT.unpack(r.body)
    return f[3] | f[10] << 32


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


def test_posix_acl_negotiates_acls_dont_mask_and_setxattr_ext(share):
    c = DirectClient(FuseServer(PassthroughFs(str(share), posix_acl=True)))
    flags = init_flags(c.init())
    for bit in (abi.POSIX_ACL, abi.DONT_MASK, abi.SETXATTR_EXT):
        assert flags & bit
    plain = init_flags(DirectClient(FuseServer(PassthroughFs(str(share)))).init())
    assert not plain & (abi.POSIX_ACL | abi.DONT_MASK)


def test_a_guest_without_acl_or_label_support_is_refused(share):
    for kw, missing in (({"posix_acl": True}, abi.POSIX_ACL), ({"security_label": True},
                                                              abi.SECURITY_CTX)):
        c = DirectClient(FuseServer(PassthroughFs(str(share), **kw)))
        flags = LINUX_6_1_FLAGS | LINUX_6_1_FLAGS2 << 32
        flags &= ~missing
        r = c.call(Opcode.INIT, 0, struct.pack("<IIII", 7, 38, 1 << 17, flags & 0xFFFFFFFF)
                   + struct.pack("<I", flags >> 32) + bytes(44))
        assert r.errno == errno.EPROTO


def test_acl_xattrs_do_not_exist_without_posix_acl(share):
    f = share / "f"
    f.write_text("x")
    os.setxattr(f, "system.posix_acl_access",
                _acl([(1, 0xFFFFFFFF, 6), (2, 4242, 4), (4, 0xFFFFFFFF, 4), (0x10, 0xFFFFFFFF, 4),
                      (0x20, 0xFFFFFFFF, 4)]))
    c = DirectClient(FuseServer(PassthroughFs(str(share))))
    c.init()
    nid = struct.unpack_from("<Q", c.call(Opcode.LOOKUP, 1, b"f\0").body)[0]
    r = c.call(Opcode.GETXATTR, nid, struct.pack("<II", 256, 0) + b"system.posix_acl_access\0")
    assert r.errno == errno.EOPNOTSUPP
    r = c.call(Opcode.LISTXATTR, nid, struct.pack("<II", 4096, 0))
    assert b"posix_acl" not in r.body


def _acl(entries):
    """The system.posix_acl_* xattr value: version 2, then (tag u16, perm u16, id u32)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, i, p in entries)


def test_umask_applies_unless_the_parent_has_a_default_acl(share):
    c = DirectClient(FuseServer(PassthroughFs(str(share), posix_acl=True)), uid=0)
    c.init()
    r = c.call(Opcode.MKDIR, 1, struct.pack("<II", 0o777, 0o027) + b"plain\0")
    assert r.error == 0
    assert stat.S_IMODE(os.stat(share / "plain").st_mode) == 0o750
    os.mkdir(share / "inherit")
    # default ACL: owner rwx, user 4242 rwx, group r-x, mask rwx, other ---
    os.setxattr(share / "inherit", "system.posix_acl_default",
                _acl([(1, 0xFFFFFFFF, 7), (2, 4242, 7), (4, 0xFFFFFFFF, 5), (0x10, 0xFFFFFFFF, 7),
                      (0x20, 0xFFFFFFFF, 0)]))
    nid = struct.unpack_from("<Q", c.call(Opcode.LOOKUP, 1, b"inherit\0").body)[0]
    r = c.call(Opcode.CREATE, nid, struct.pack("<IIII", os.O_WRONLY, 0o666, 0o077, 0) + b"f\0")
    assert r.error == 0
    st = os.stat(share / "inherit" / "f")
    # the umask (077) would leave 0600; the default ACL gives group (mask) rw
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    acl = os.getxattr(share / "inherit" / "f", "system.posix_acl_access")
    assert struct.pack("<HHI", 2, 7, 4242) in acl  # user 4242 inherited
    assert struct.pack("<HHI", 0x10, 6, 0xFFFFFFFF) in acl  # the mask: group bits of 0666


def call_ext(c, opcode, nodeid, body, ext):
    """A request with extensions after its arguments (fuse_in_header.total_extlen)."""
    assert len(ext) % 8 == 0
    c.unique += 1
    hdr = IN.pack(40 + len(body) + len(ext), opcode, c.unique, nodeid, c.uid, c.gid, 1,
                  len(ext) // 8, 0)
    return Reply(c.raw([hdr, body, ext], 1 << 16))


def secctx(name, value, nr=1):
    if nr == 0:
        return struct.pack("<II", 8, 0)
    body = struct.pack("<II", len(value), 0) + name + b"\0" + value
    body += bytes(-len(body) % 8)
    return struct.pack("<II", 8 + len(body), nr) + body


@pytest.fixture
def labelled(share):
    fs = PassthroughFs(str(share), security_label=True)
    c = DirectClient(FuseServer(fs))
    flags = init_flags(c.init())
    assert flags & abi.SECURITY_CTX
    yield c
    fs.close()


LABEL = b"system_u:object_r:test_t:s0\0"


def test_new_files_get_the_security_context_sent_with_them(share, labelled):
    c = labelled
    ext = secctx(b"security.selinux", LABEL)
    r = call_ext(c, Opcode.CREATE, 1, struct.pack("<IIII", os.O_WRONLY, 0o644, 0, 0) + b"f\0", ext)
    assert r.error == 0
    r = call_ext(c, Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0", ext)
    assert r.error == 0
    r = call_ext(c, Opcode.MKNOD, 1, struct.pack("<IIII", stat.S_IFIFO | 0o644, 0, 0, 0)
                 + b"p\0", ext)
    assert r.error == 0
    r = call_ext(c, Opcode.SYMLINK, 1, b"l\0target\0", ext)
    assert r.error == 0
    for name in ("f", "d", "p"):
        assert os.getxattr(share / name, "security.selinux") == LABEL, name
    assert os.getxattr(share / "l", "security.selinux", follow_symlinks=False) == LABEL
    # no security module in the guest: a header with no context, nothing set
    r = call_ext(c, Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"bare\0",
                 secctx(b"", b"", nr=0))
    assert r.error == 0 and "security.selinux" not in os.listxattr(share / "bare")


def test_a_context_that_cannot_be_set_leaves_no_file(share):
    fs = PassthroughFs(str(share), security_label=True,
                       xattrmap=":bad:all:security.:security.: :ok:all:::")
    c = DirectClient(FuseServer(fs))
    c.init()
    r = call_ext(c, Opcode.CREATE, 1, struct.pack("<IIII", os.O_WRONLY, 0o644, 0, 0) + b"f\0",
                 secctx(b"security.selinux", LABEL))
    assert r.errno == errno.EPERM
    r = call_ext(c, Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0",
                 secctx(b"security.selinux", LABEL))
    assert r.errno == errno.EPERM
    assert os.listdir(share) == []
    fs.close()


def test_malformed_extensions_are_einval(labelled):
    c = labelled
    body = struct.pack("<II", 0o755, 0) + b"d\0"
    assert call_ext(c, Opcode.MKDIR, 1, body, struct.pack("<II", 64, 1)).errno == errno.EINVAL
    bad_len = struct.pack("<II", 24, 1) + struct.pack("<II", 999, 0) + b"n\0\0\0\0\0\0\0"
    assert call_ext(c, Opcode.MKDIR, 1, body, bad_len).errno == errno.EINVAL
    c.unique += 1  # total_extlen beyond the request
    hdr = IN.pack(40 + len(body), Opcode.MKDIR, c.unique, 1, 0, 0, 1, 1000, 0)
    assert Reply(c.raw([hdr, body])).errno == errno.EINVAL

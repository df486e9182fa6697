"""The FUSE server against PassthroughFs, in-process: decoding, encoding, and malformed input."""

import errno
import os
import struct

import pytest

from pyvirtiofs.filesystem import FileSystem
from pyvirtiofs.fuse import abi
from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.passthrough import PassthroughFs

from .fuse_direct import DirectClient


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture
def client(share):
    fs = PassthroughFs(str(share), cache="auto")
    c = DirectClient(FuseServer(fs))
    c.init()
    yield c
    fs.close()


def lookup(c, name, parent=1):
    r = c.call(Opcode.LOOKUP, parent, name + b"\0")
    if r.error:
        return r.errno, None
    nodeid = struct.unpack_from("<Q", r.body)[0]
    attr = abi.ATTR.unpack_from(r.body, 40)
    return nodeid, attr


def test_init_negotiates_large_requests(share):
    c = DirectClient(FuseServer(PassthroughFs(str(share))))
    r = c.init()
    major, minor, readahead, flags, maxbg, cong, max_write, gran, max_pages, _, flags2 = \
        abi.INIT_OUT.unpack(r.body)
    assert (major, minor) == (7, abi.KERNEL_MINOR_VERSION) == (7, 41)
    assert max_write == 1 << 20 and max_pages == 256
    assert flags & abi.MAX_PAGES and flags & abi.INIT_EXT
    assert not flags & abi.WRITEBACK_CACHE  # not asked for
    assert flags & ~0x7BFFFFFB == 0  # never more than the guest offered


def test_requests_before_init_are_refused(share):
    c = DirectClient(FuseServer(PassthroughFs(str(share))))
    assert c.call(Opcode.GETATTR, 1, bytes(16)).errno == errno.EIO


def test_old_guest_protocol_is_refused(share):
    c = DirectClient(FuseServer(PassthroughFs(str(share))))
    r = c.call(Opcode.INIT, 0, struct.pack("<IIII", 7, 20, 0, 0))
    assert r.errno == errno.EPROTO


def test_lookup_create_write_read(client, share):
    body = struct.pack("<IIII", os.O_RDWR, 0o100644, 0o022, 0) + b"f\0"
    r = client.call(Opcode.CREATE, 1, body)
    assert r.error == 0
    nodeid = struct.unpack_from("<Q", r.body)[0]
    fh = struct.unpack_from("<Q", r.body, 128)[0]
    data = os.urandom(10000)
    w = client.call(Opcode.WRITE, nodeid, struct.pack("<QQIIQII", fh, 0, len(data), 0, 0, 0, 0) + data)
    assert w.error == 0 and struct.unpack_from("<I", w.body)[0] == len(data)
    assert (share / "f").read_bytes() == data
    rd = client.call(Opcode.READ, nodeid, struct.pack("<QQIIQII", fh, 100, 5000, 0, 0, 0, 0))
    assert rd.body == data[100:5100]
    n2, attr = lookup(client, b"f")
    assert n2 == nodeid and attr[1] == len(data)


def test_read_is_split_across_guest_buffers(client, share):
    (share / "g").write_bytes(bytes(range(256)) * 64)
    nodeid, _ = lookup(client, b"g")
    fh = struct.unpack_from("<Q", client.call(Opcode.OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0)).body)[0]
    hdr = struct.pack("<IIQQIIIHH", 80, Opcode.READ, 9, nodeid, 0, 0, 0, 0, 0)
    out = client.raw([hdr, struct.pack("<QQIIQII", fh, 0, 8192, 0, 0, 0, 0)],
                     writable_split=[16, 100, 4000, 4092])
    assert struct.unpack_from("<I", out)[0] == 16 + 8192
    assert out[16:] == (bytes(range(256)) * 64)[:8192]


def test_unknown_and_unimplemented_opcodes_get_enosys(client):
    assert client.call(999, 1).errno == errno.ENOSYS
    assert client.call(Opcode.BMAP, 1, bytes(16)).errno == errno.ENOSYS


def test_unimplemented_operations_of_a_custom_fs_get_enosys(share):
    c = DirectClient(FuseServer(FileSystem()))
    c.init()
    assert c.call(Opcode.LOOKUP, 1, b"x\0").errno == errno.ENOSYS


def test_an_oserror_without_errno_is_eio_and_logged(share, caplog):
    # e.g. a C library that cannot be loaded any more after the sandbox: not the guest's
    # doing, so it must be visible in the log, not only as the guest's EIO
    class Broken(FileSystem):
        def getattr(self, inode, fh, ctx):
            raise OSError("cannot load libfoo.so")

    c = DirectClient(FuseServer(Broken()))
    c.init()
    with caplog.at_level("ERROR"):
        assert c.call(Opcode.GETATTR, 1, bytes(16)).errno == errno.EIO
    assert "internal error serving GETATTR" in caplog.text and "libfoo" in caplog.text


@pytest.mark.parametrize("hdr_len", [0, 39, 40 + 3, 1 << 31])
def test_header_len_disagreeing_with_chain_is_einval(client, hdr_len):
    r = client.call(Opcode.LOOKUP, 1, b"x\0", hdr_len=hdr_len)
    if hdr_len == 40 + 3:  # shorter than the body: the name is cut, so not NUL-terminated
        assert r.errno == errno.EINVAL
    else:
        assert r.errno == errno.EINVAL


def test_short_header_gets_no_reply_and_no_crash(client):
    assert client.raw([b"\x01\x02\x03"]) == b""


@pytest.mark.parametrize("name", [b"a/b", b"", b"/", b"x" * 300])
def test_bad_names_are_refused(client, name):
    r = client.call(Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + name + b"\0")
    assert r.errno in (errno.EINVAL, errno.ENAMETOOLONG)


def test_name_without_nul_is_einval(client):
    assert client.call(Opcode.LOOKUP, 1, b"abc").errno == errno.EINVAL


def test_dotdot_at_root_stays_at_root(client):
    nodeid, _ = lookup(client, b"..")
    assert nodeid == 1


def test_unknown_nodeid_and_fh(client):
    assert client.call(Opcode.GETATTR, 12345, bytes(16)).errno == errno.EBADF
    assert client.call(Opcode.READ, 1, struct.pack("<QQIIQII", 777, 0, 10, 0, 0, 0, 0)).errno == errno.EBADF


def test_batch_forget_with_lying_count_is_harmless(client, share):
    (share / "x").write_text("x")
    nodeid, _ = lookup(client, b"x")
    body = struct.pack("<II", 1000, 0) + struct.pack("<QQ", nodeid, 1)
    assert client.call(Opcode.BATCH_FORGET, 0, body) is None  # no reply
    assert client.call(Opcode.GETATTR, nodeid, bytes(16)).errno == errno.EBADF


def test_huge_xattr_value_is_refused_without_allocating(client):
    body = struct.pack("<II", 1 << 30, 0) + b"user.x\0" + b"v"
    assert client.call(Opcode.SETXATTR, 1, body).errno == errno.E2BIG


def test_readdirplus_lists_everything_across_calls(client, share):
    names = {f"n{i:04d}".encode() for i in range(300)}
    for n in names:
        (share / n.decode()).write_bytes(b"")
    fh = struct.unpack_from("<Q", client.call(Opcode.OPENDIR, 1, struct.pack("<II", 0, 0)).body)[0]
    seen, offset = [], 0
    while True:
        r = client.call(Opcode.READDIRPLUS, 1, struct.pack("<QQIIQII", fh, offset, 4096, 0, 0, 0, 0))
        assert r.error == 0
        if not r.body:
            break
        pos = 0
        while pos < len(r.body):
            nodeid = struct.unpack_from("<Q", r.body, pos)[0]
            ino, off, namelen, typ = struct.unpack_from("<QQII", r.body, pos + 128)
            name = r.body[pos + 152:pos + 152 + namelen]
            if name in (b".", b".."):
                assert nodeid == 0  # the kernel takes no reference for these
            else:
                assert nodeid > 1
            seen.append(name)
            offset = off
            pos += 128 + ((24 + namelen + 7) & ~7)
    assert sorted(seen) == sorted(names | {b".", b".."})


def test_getxattr_size_probe_and_erange(client, share):
    f = share / "x"
    f.write_text("x")
    os.setxattr(f, "user.k", b"value")
    nodeid, _ = lookup(client, b"x")
    r = client.call(Opcode.GETXATTR, nodeid, struct.pack("<II", 0, 0) + b"user.k\0")
    assert struct.unpack_from("<I", r.body)[0] == 5
    assert client.call(Opcode.GETXATTR, nodeid, struct.pack("<II", 2, 0) + b"user.k\0").errno == errno.ERANGE
    assert client.call(Opcode.GETXATTR, nodeid, struct.pack("<II", 64, 0) + b"user.k\0").body == b"value"
    assert client.call(Opcode.GETXATTR, nodeid, struct.pack("<II", 64, 0) + b"user.no\0").errno == errno.ENODATA


def test_reply_that_does_not_fit_is_erange_not_overflow(client):
    # a LOOKUP reply (144 bytes) into a 20-byte writable buffer
    client.unique += 1
    hdr = struct.pack("<IIQQIIIHH", 42, Opcode.LOOKUP, 5, 1, 0, 0, 0, 0, 0)
    out = client.raw([hdr, b".\0"], reply_size=20)
    assert struct.unpack_from("<Ii", out) == (16, -errno.ERANGE)


def test_tmpfile_is_unnamed_until_linked(client, share):
    body = struct.pack("<IIII", os.O_RDWR, 0o100600, 0, 0) + b"/\0"
    r = client.call(Opcode.TMPFILE, 1, body)
    assert r.error == 0, r.errno
    nodeid = struct.unpack_from("<Q", r.body)[0]
    fh = struct.unpack_from("<Q", r.body, 128)[0]
    assert os.listdir(share) == []
    w = client.call(Opcode.WRITE, nodeid, struct.pack("<QQIIQII", fh, 0, 3, 0, 0, 0, 0) + b"tmp")
    assert w.error == 0
    assert client.call(Opcode.LINK, 1, struct.pack("<Q", nodeid) + b"named\0").error == 0
    assert (share / "named").read_bytes() == b"tmp"


def test_fsync_fdatasync_and_syncfs_reach_the_host_file(client, share, monkeypatch):
    """Data the guest has FSYNCed must be on the host's disk: the daemon must call the real
    fsync/fdatasync on the host file behind the handle, and syncfs for SYNCFS."""
    from pyvirtiofs import linux
    calls = []
    real_fsync, real_fdatasync, real_syncfs = os.fsync, os.fdatasync, linux.syncfs
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(("fdatasync", os.fstat(fd).st_ino)), real_fdatasync(fd))[1])
    monkeypatch.setattr(linux, "syncfs", lambda fd: (calls.append(("syncfs", 0)), real_syncfs(fd))[1])
    r = client.call(Opcode.CREATE, 1, struct.pack("<IIII", os.O_RDWR, 0o100644, 0, 0) + b"d\0")
    nodeid = struct.unpack_from("<Q", r.body)[0]
    fh = struct.unpack_from("<Q", r.body, 128)[0]
    ino = (share / "d").stat().st_ino
    assert client.call(Opcode.WRITE, nodeid, struct.pack("<QQIIQII", fh, 0, 4, 0, 0, 0, 0) + b"data").error == 0
    assert client.call(Opcode.FSYNC, nodeid, struct.pack("<QII", fh, 0, 0)).error == 0
    assert client.call(Opcode.FSYNC, nodeid, struct.pack("<QII", fh, 1, 0)).error == 0
    assert client.call(Opcode.SYNCFS, 1, bytes(8)).error == 0
    assert calls == [("fsync", ino), ("fdatasync", ino), ("syncfs", 0)]


def _statx(c, nodeid, fh=None):
    body = abi.STATX_IN.pack(abi.GETATTR_FH if fh is not None else 0, 0, fh or 0, 0,
                             abi.STATX_BASIC_STATS | abi.STATX_BTIME)
    return c.call(Opcode.STATX, nodeid, body)


def test_statx_gives_what_getattr_gives_plus_the_birth_time(client, share):
    """A Linux >= 6.6 guest asks STATX when a caller wants the birth time (coreutils stat)."""
    from pyvirtiofs import linux
    (share / "f").write_bytes(b"x" * 12345)
    os.chmod(share / "f", 0o640)
    os.utime(share / "f", ns=(1_111_111_111_222_333_444, 1_500_000_000_987_654_321))
    nodeid, _ = lookup(client, b"f")
    r = _statx(client, nodeid)
    assert r.error == 0, r.errno
    attr_valid, attr_valid_nsec, flags = abi.STATX_OUT_HEAD.unpack_from(r.body)
    (mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks, _amask, at, atn, bt, btn,
     ct, ctn, mt, mtn, rmaj, rmin, _dmaj, _dmin) = abi.STATX.unpack_from(r.body, abi.STATX_OUT_HEAD.size)
    st = os.stat(share / "f")
    host = linux.statx(os.open(share / "f", os.O_PATH))
    assert host.st_birthtime_ns is not None, "the test's host file system has no birth time"
    assert mask == abi.STATX_BASIC_STATS | abi.STATX_BTIME
    assert (mode, nlink, uid, gid, ino, size, blocks) == (
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_ino, 12345, st.st_blocks)
    assert at * 10**9 + atn == 1_111_111_111_222_333_444
    assert mt * 10**9 + mtn == 1_500_000_000_987_654_321
    assert ct * 10**9 + ctn == st.st_ctime_ns
    assert bt * 10**9 + btn == host.st_birthtime_ns
    assert (attr_valid, attr_valid_nsec) == (1, 0)  # cache=auto: 1 s, as GETATTR
    # Through an open file (GETATTR_FH) the same file answers.
    fh = struct.unpack_from("<Q", client.call(Opcode.OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0)).body)[0]
    r2 = _statx(client, nodeid, fh)
    assert r2.error == 0 and abi.STATX.unpack_from(r2.body, 32)[7] == ino


def test_statx_of_a_device_node_and_a_pre_1970_file(client, share):
    os.mknod(share / "null", 0o600 | 0o020000, os.makedev(1, 3))
    (share / "old").write_bytes(b"")
    os.utime(share / "old", ns=(-86400 * 10**9 + 5, -1))  # 1969
    r = _statx(client, lookup(client, b"null")[0])
    f = abi.STATX.unpack_from(r.body, 32)
    assert (f[19], f[20]) == (1, 3)  # rdev major, minor
    f = abi.STATX.unpack_from(_statx(client, lookup(client, b"old")[0]).body, 32)
    assert f[11] * 10**9 + f[12] == -86400 * 10**9 + 5
    assert f[17] * 10**9 + f[18] == -1


def test_statx_errors(client, share):
    assert _statx(client, 987654).errno == errno.EBADF  # unknown node id
    assert client.call(Opcode.STATX, 1, bytes(8)).errno == errno.EINVAL  # short request
    c = DirectClient(FuseServer(FileSystem()))  # a file system without statx: the guest
    c.init(flags2=0x1FF)                         # falls back to GETATTR
    assert _statx(c, 1).errno == errno.ENOSYS


def test_a_6_12_guest_gets_7_41_and_only_the_flags_we_serve(share):
    """What Linux 6.12 offers (seen in a real guest): INIT 7.41, flags 0x1ff7bfffffb."""
    c = DirectClient(FuseServer(PassthroughFs(str(share))))
    r = c.call(Opcode.INIT, 0, struct.pack("<IIII", 7, 41, 128 << 10, 0x7BFFFFFB)
               + struct.pack("<I", 0x1FF) + bytes(44))
    major, minor, _, flags, *_rest, flags2 = abi.INIT_OUT.unpack(r.body)
    assert (major, minor) == (7, 41)
    # Of 7.38-7.41's INIT flags: CREATE_SUPP_GROUP and ALLOW_IDMAP, as virtiofsd; HAS_RESEND,
    # PASSTHROUGH, NO_EXPORT_SUPPORT never; DIRECT_IO_ALLOW_MMAP only with --allow-mmap.
    assert flags2 & 0x1F4 == 0x104, hex(flags2)

"""--translate-uid/--translate-gid: the rule parser, and a request's credentials and the
owners it sees translated by PassthroughFs behind the FUSE server."""

import errno
import os
import struct

import pytest

from pyvirtiofs.filesystem import FsError
from pyvirtiofs.fuse import abi
from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.idmap import IdMap, IdMapError
from pyvirtiofs.passthrough import PassthroughFs

from .fuse_direct import DirectClient


def test_rules_translate_each_direction_on_its_own():
    m = IdMap.parse(["guest:1000:101000:10", "host:5000:50:2", "squash-guest:2000:65534:100",
               "squash-host:7000:7:3", "forbid-guest:3000:1"])
    assert [m.to_host(i) for i in (999, 1000, 1009, 1010)] == [999, 101000, 101009, 1010]
    assert m.to_guest(101000) == 101000  # guest: is one way only
    assert [m.to_guest(i) for i in (4999, 5000, 5001, 5002)] == [4999, 50, 51, 5002]
    assert m.to_host(50) == 50
    assert {m.to_host(i) for i in range(2000, 2100)} == {65534} and m.to_host(2100) == 2100
    assert [m.to_guest(i) for i in (7000, 7002, 7003)] == [7, 7, 7003]
    with pytest.raises(FsError) as e:
        m.to_host(3000)
    assert e.value.errno == errno.EPERM
    assert m.to_host(3001) == 3001 and m.to_guest(3000) == 3000


def test_map_rule_goes_both_ways_and_other_separators_work():
    m = IdMap.parse(["map/1000/101000/65536"])
    assert m.to_host(1000) == 101000 and m.to_guest(101000) == 1000
    assert m.to_host(66535) == 166535 and m.to_host(66536) == 66536
    assert m.to_guest(0) == 0 and not m.is_identity
    assert IdMap.parse([]).is_identity


@pytest.mark.parametrize("spec, why", [
    ("map:1:2", "expected map:"), ("forbid-guest:1:2:3", "expected forbid-guest:"),
    ("swap:1:2:3", "unknown type"), ("map:1:x:3", "not a number"),
    ("map:1:2:0", "at least 1"), ("map:4294967295:0:2", "goes past"),
    ("map", "expected map:"), ("guest:1:2:3|4", "not a number"),
])
def test_bad_rules_are_refused_with_the_reason(spec, why):
    with pytest.raises(ValueError, match=why):
        IdMap.parse([spec])


def test_overlapping_rules_of_one_direction_are_refused():
    with pytest.raises(IdMapError, match="overlaps"):
        IdMap.parse(["guest:1000:5000:10", "squash-guest:1009:0:1"])
    with pytest.raises(IdMapError, match="overlaps"):
        IdMap.parse(["map:0:100000:1000", "host:100999:1:1"])
    IdMap.parse(["guest:1000:5000:10", "host:1000:7:10"])  # other direction: fine


# -- behind the server -------------------------------------------------------------------

def entry_ids(r):
    assert r.error == 0, os.strerror(r.errno)
    nodeid = struct.unpack_from("<Q", r.body)[0]
    attr = abi.ATTR.unpack_from(r.body, 40)
    return nodeid, attr[11], attr[12]  # uid, gid


@pytest.fixture
def mapped(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    os.chmod(share, 0o777)
    fs = PassthroughFs(str(share), uid_map=IdMap.parse(["map:1000:101000:10", "forbid-guest:3000:1"]),
                       gid_map=IdMap.parse(["map:1000:201000:10", "squash-host:0:1005:1"]))
    srv = FuseServer(fs)
    DirectClient(srv).init()
    yield share, srv
    fs.close()


def test_files_created_by_a_guest_user_belong_to_the_mapped_host_ids(mapped):
    share, srv = mapped
    c = DirectClient(srv, uid=1001, gid=1002)
    r = c.call(Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0")
    _, uid, gid = entry_ids(r)
    assert (uid, gid) == (1001, 1002)  # what the guest sees
    st = os.stat(share / "d")
    assert (st.st_uid, st.st_gid) == (101001, 201002)  # what the host holds
    r = c.call(Opcode.CREATE, 1, struct.pack("<IIII", os.O_WRONLY, 0o644, 0, 0) + b"f\0")
    _, uid, gid = entry_ids(r)
    st = os.stat(share / "f")
    assert (uid, gid, st.st_uid, st.st_gid) == (1001, 1002, 101001, 201002)


def test_owners_sent_back_are_guest_ids_in_lookup_getattr_and_readdirplus(mapped):
    share, srv = mapped
    (share / "h").write_text("x")
    os.chown(share / "h", 101009, 0)  # gid 0 is squashed to guest gid 1005
    (share / "u").write_text("y")
    os.chown(share / "u", 4242, 201000)
    c = DirectClient(srv)
    nid, uid, gid = entry_ids(c.call(Opcode.LOOKUP, 1, b"h\0"))
    assert (uid, gid) == (1009, 1005)
    r = c.call(Opcode.GETATTR, nid, bytes(16))
    attr = abi.ATTR.unpack_from(r.body, 16)
    assert (attr[11], attr[12]) == (1009, 1005)
    _, uid, gid = entry_ids(c.call(Opcode.LOOKUP, 1, b"u\0"))
    assert (uid, gid) == (4242, 1000)  # unmapped uid: as is
    fh = struct.unpack_from("<Q", c.call(Opcode.OPENDIR, 1, bytes(8)).body)[0]
    r = c.call(Opcode.READDIRPLUS, 1, struct.pack("<QQIIQII", fh, 0, 4096, 0, 0, 0, 0))
    owners = {}
    pos = 0
    while pos < len(r.body):
        attr = abi.ATTR.unpack_from(r.body, pos + 40)
        ino, off, namelen, _ = abi.DIRENT_HEAD.unpack_from(r.body, pos + 128)
        name = r.body[pos + 128 + 24:pos + 128 + 24 + namelen]
        owners[name] = (attr[11], attr[12])
        pos += 128 + ((24 + namelen + 7) & ~7)
    assert owners[b"h"] == (1009, 1005) and owners[b"u"] == (4242, 1000)


def test_statx_owners_are_guest_ids_too(mapped):
    """STATX (Linux >= 6.6) carries owners like GETATTR does, and keeps the birth time."""
    share, srv = mapped
    (share / "h").write_text("x")
    os.chown(share / "h", 101009, 0)
    c = DirectClient(srv)
    nid, _, _ = entry_ids(c.call(Opcode.LOOKUP, 1, b"h\0"))
    r = c.call(Opcode.STATX, nid, abi.STATX_IN.pack(0, 0, 0, 0, abi.STATX_BASIC_STATS | abi.STATX_BTIME))
    assert r.error == 0, os.strerror(r.errno)
    f = abi.STATX.unpack_from(r.body, abi.STATX_OUT_HEAD.size)
    assert (f[4], f[5]) == (1009, 1005)  # uid, gid
    assert f[0] & abi.STATX_BTIME and f[13] > 0  # mask, btime seconds


def setattr_owner(c, nodeid, uid=None, gid=None):
    valid = (abi.FATTR_UID if uid is not None else 0) | (abi.FATTR_GID if gid is not None else 0)
    body = abi.SETATTR_IN.pack(valid, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, uid or 0, gid or 0, 0)
    return c.call(Opcode.SETATTR, nodeid, body)


def test_chown_translates_and_forbidden_ids_are_refused(mapped):
    share, srv = mapped
    (share / "f").write_text("x")
    c = DirectClient(srv)
    nid, _, _ = entry_ids(c.call(Opcode.LOOKUP, 1, b"f\0"))
    r = setattr_owner(c, nid, 1003, 1004)
    assert r.error == 0
    attr = abi.ATTR.unpack_from(r.body, 16)
    assert (attr[11], attr[12]) == (1003, 1004)
    st = os.stat(share / "f")
    assert (st.st_uid, st.st_gid) == (101003, 201004)
    assert setattr_owner(c, nid, uid=3000).errno == errno.EPERM
    assert os.stat(share / "f").st_uid == 101003
    forbidden = DirectClient(srv, uid=3000, gid=0)
    r = forbidden.call(Opcode.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"no\0")
    assert r.errno == errno.EPERM and not (share / "no").exists()
    assert forbidden.call(Opcode.LOOKUP, 1, b"f\0").error == 0  # only creating is refused


def test_acl_and_translation_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="posix-acl"):
        PassthroughFs(str(tmp_path), uid_map=IdMap.parse(["map:0:1:1"]), posix_acl=True)


def test_command_line_refuses_overlapping_rules_in_one_line():
    from pyvirtiofs import options
    with pytest.raises(options.UsageError, match="--translate-gid: .*overlaps"):
        options.parse(["--shared-dir=/", "--socket-path=/tmp/s", "--translate-gid=map:0:5:10",
                       "--translate-gid=guest:3:0:1"])
    c = options.parse(["--shared-dir=/", "--socket-path=/tmp/s",
                       "--translate-uid=squash-host/0/1000/1"])  # any separator
    assert IdMap(c.translate_uid).to_guest(0) == 1000


def test_statx_owners_are_guest_ids_too(mapped):
    share, srv = mapped
    (share / "s").write_text("x")
    os.chown(share / "s", 101002, 201003)
    c = DirectClient(srv)
    nid, _, _ = entry_ids(c.call(Opcode.LOOKUP, 1, b"s\0"))
    r = c.call(Opcode.STATX, nid, struct.pack("<IIQII", 0, 0, 0, 0, 0xFFF))
    assert r.error == 0, os.strerror(r.errno)
    # fuse_statx (after fuse_statx_out's head): uid and gid follow mask, blksize,
    # attributes and nlink
    uid, gid = struct.unpack_from("<II", r.body, abi.STATX_OUT_HEAD.size + 20)
    assert (uid, gid) == (1002, 1003)
    fields = abi.STATX.unpack_from(r.body, abi.STATX_OUT_HEAD.size)
    mask, btime = fields[0], fields[13]
    # the birth time survives the translation (the host's ext4 or tmpfs keeps one)
    assert mask & abi.STATX_BTIME and btime > 0, (hex(mask), btime)

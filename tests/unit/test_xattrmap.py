"""--xattrmap: the rule grammar of virtiofsd's xattr-mapping document, and the names
get/set/list/removexattr use on the host behind the FUSE server."""

import errno
import os
import struct

import pytest

from pyvirtiofs.filesystem import FsError
from pyvirtiofs.fuse.abi import Opcode
from pyvirtiofs.fuse.server import FuseServer
from pyvirtiofs.passthrough import PassthroughFs
from pyvirtiofs.xattrmap import CLIENT, SERVER, Rule, XattrMap

from .fuse_direct import DirectClient

BOTH = CLIENT | SERVER


def parse(text):
    return XattrMap.parse(text).rules


def test_rules_with_any_separator_and_blanks_between_them():
    rules = parse("""
        /prefix/all/trusted./user.virtiofs./
        /bad/server//trusted./
        /bad/client/user.virtiofs.//
        /ok/all///
    """)
    assert rules == [Rule("prefix", BOTH, b"trusted.", b"user.virtiofs."),
                     Rule("bad", SERVER, b"", b"trusted."),
                     Rule("bad", CLIENT, b"user.virtiofs.", b""),
                     Rule("ok", BOTH, b"", b"")]
    assert parse(":prefix:all::user.virtiofs.::bad:all:::") == [
        Rule("prefix", BOTH, b"", b"user.virtiofs."), Rule("bad", BOTH, b"", b"")]
    assert parse("|unsupported|client|security.||") == [
        Rule("unsupported", CLIENT, b"security.", b"")]


def test_map_expands_as_the_document_says():
    # ":map::user.virtiofs.:" == ":prefix:all::user.virtiofs.::bad:all:::"
    assert parse(":map::user.virtiofs.:") == parse(":prefix:all::user.virtiofs.::bad:all:::")
    # "/map/trusted./user.virtiofs./" hides host trusted.*, refuses user.virtiofs.* from the
    # guest and lets the rest through
    m = XattrMap.parse("/map/trusted./user.virtiofs./")
    assert m.to_host(b"trusted.x") == b"user.virtiofs.trusted.x"
    assert m.to_host(b"user.y") == b"user.y"
    with pytest.raises(FsError) as e:
        m.to_host(b"user.virtiofs.trusted.x")
    assert e.value.errno == errno.EPERM
    assert m.to_guest([b"user.virtiofs.trusted.x", b"trusted.host", b"user.y"]) == [
        b"trusted.x", b"user.y"]


@pytest.mark.parametrize("text, why", [
    ("", "no rules"), ("   \n ", "no rules"),
    (":prefix:all:trusted.:user.vm.", "unterminated"),
    (":frobnicate:all:::", "unknown type"),
    (":ok:everywhere:::", "unknown scope"),
    ("ok:all:::", "separator 'o' must not be a letter"),
    (":map::user.x.: :ok:all:::", "must be the last"),
    ("/map//a./ /map//b./", "must be the last"),
])
def test_bad_mappings_are_refused_naming_the_rule(text, why):
    with pytest.raises(ValueError, match=why):
        XattrMap.parse(text)


def test_client_and_server_scopes_and_the_first_match_wins():
    m = XattrMap.parse(":ok:client:user.:: :bad:server::user.secret: :prefix:server::user.g.:"
                 " :unsupported:all:security.:security.: :bad:all:::")
    assert m.to_host(b"user.a") == b"user.a"
    with pytest.raises(FsError) as e:
        m.to_host(b"security.selinux")
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(FsError) as e:
        m.to_host(b"trusted.a")
    assert e.value.errno == errno.EPERM
    with pytest.raises(FsError) as e:
        m.to_host(b"trusted.a", getting=True)  # getxattr: a refused name reads as absent
    assert e.value.errno == errno.ENODATA
    assert m.to_guest([b"user.secret.x", b"user.g.name", b"security.x", b"other"]) == [
        b"name"]


def test_no_matching_rule_refuses_and_hides():
    m = XattrMap.parse(":ok:client:user.::")
    with pytest.raises(FsError):
        m.to_host(b"trusted.a")
    assert m.to_guest([b"user.a"]) == []  # no server rule at all


def test_renamed_security_capability_is_known():
    assert XattrMap.parse(":map::user.virtiofs.:").capability_name == b"user.virtiofs.security.capability"
    assert XattrMap.parse(":map:trusted.:user.virtiofs.:").capability_name is None
    assert XattrMap.parse(":bad:all:security.:security.: :ok:all:::").capability_name is None


# -- behind the server -------------------------------------------------------------------

@pytest.fixture
def mapped(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("data")
    fs = PassthroughFs(str(share), xattrmap="/map/trusted./user.virtiofs./")
    c = DirectClient(FuseServer(fs))
    c.init()
    nid = struct.unpack_from("<Q", c.call(Opcode.LOOKUP, 1, b"f\0").body)[0]
    yield share / "f", c, nid
    fs.close()


def setxattr(c, nid, name, value):
    # fuse_setxattr_in without FUSE_SETXATTR_EXT (not negotiated without --posix-acl)
    return c.call(Opcode.SETXATTR, nid, struct.pack("<II", len(value), 0) + name + b"\0" + value)


def test_get_set_list_remove_use_the_host_names(mapped):
    f, c, nid = mapped
    assert setxattr(c, nid, b"trusted.t", b"guest-trusted").error == 0
    assert os.getxattr(f, "user.virtiofs.trusted.t") == b"guest-trusted"
    os.setxattr(f, "trusted.host", b"host only")
    os.setxattr(f, "user.plain", b"p")
    r = c.call(Opcode.GETXATTR, nid, struct.pack("<II", 256, 0) + b"trusted.t\0")
    assert r.body == b"guest-trusted"
    r = c.call(Opcode.LISTXATTR, nid, struct.pack("<II", 4096, 0))
    assert sorted(r.body.split(b"\0")[:-1]) == [b"trusted.t", b"user.plain"]
    # the host's own trusted.* is hidden and unreachable: the guest's name leads elsewhere
    r = c.call(Opcode.GETXATTR, nid, struct.pack("<II", 256, 0) + b"trusted.host\0")
    assert r.errno == errno.ENODATA
    # the prefixed form may not be named directly
    assert setxattr(c, nid, b"user.virtiofs.trusted.t", b"x").errno == errno.EPERM
    r = c.call(Opcode.GETXATTR, nid, struct.pack("<II", 256, 0) + b"user.virtiofs.trusted.t\0")
    assert r.errno == errno.ENODATA
    assert c.call(Opcode.REMOVEXATTR, nid, b"trusted.t\0").error == 0
    assert "user.virtiofs.trusted.t" not in os.listxattr(f)
    assert os.getxattr(f, "trusted.host") == b"host only"


def test_renamed_capability_is_dropped_on_write_and_chown(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    f = share / "f"
    f.write_text("data")
    fs = PassthroughFs(str(share), xattrmap=":map::user.virtiofs.:")
    c = DirectClient(FuseServer(fs))
    c.init()
    nid = struct.unpack_from("<Q", c.call(Opcode.LOOKUP, 1, b"f\0").body)[0]
    cap = b"\x01\x00\x00\x02" + bytes(16)
    assert setxattr(c, nid, b"security.capability", cap).error == 0
    assert os.getxattr(f, "user.virtiofs.security.capability") == cap
    fh = struct.unpack_from("<Q", c.call(Opcode.OPEN, nid, struct.pack("<II", os.O_RDWR, 0)).body)[0]
    r = c.call(Opcode.WRITE, nid, struct.pack("<QQIIQII", fh, 0, 1, 4, 0, 0, 0) + b"X")  # KILL_SUIDGID
    assert r.error == 0
    assert "user.virtiofs.security.capability" not in os.listxattr(f)
    assert setxattr(c, nid, b"security.capability", cap).error == 0
    body = struct.pack("<IIQQQQQQIIIIIIII", 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0)
    assert c.call(Opcode.SETATTR, nid, body).error == 0  # chown to uid 7
    assert "user.virtiofs.security.capability" not in os.listxattr(f)
    fs.close()

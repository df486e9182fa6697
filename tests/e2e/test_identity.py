"""Identity, extended attributes, ACLs and submounts seen by a real guest, in one boot.

Four daemons serve four shares:

* ``ids``: ``--translate-uid/--translate-gid map:1000:...`` and ``forbid-guest``: a guest user
  creates files that land under the mapped host ids, sees host owners in guest ids, and a
  forbidden uid cannot create;
* ``xmap``: ``--xattrmap /map/trusted./user.virtiofs./``: the guest's ``trusted.*`` live as
  ``user.virtiofs.trusted.*`` on the host (a daemon without CAP_SYS_ADMIN could not store
  them otherwise), the host's own ``trusted.*`` stay hidden;
* ``acl``: ``--posix-acl``: ``setfacl``/``getfacl`` in the guest, ACLs honoured for other
  users, default ACLs inherited (and the umask ignored under them);
* ``sub``: the daemon runs in a private mount namespace with a tmpfs mounted below the share;
  the guest sees that directory as a mount of its own, with its own st_dev;
* ``label``: ``--security-label`` (with ``--modcaps=+sys_admin``: ``security.*`` needs it on
  the host): the guest boots with SELinux as its security module (no policy loaded, so it
  labels new files ``unlabeled``) and every file it creates carries that context as its
  ``security.selinux`` on the host.

The guest runs the host's setpriv, setfacl, getfacl, setfattr and getfattr (scripts/setup.sh
installs Debian's ``acl`` and ``attr``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest

GUEST = r"""
set -u
as() { u=$1; shift; setpriv --reuid=$u --regid=$u --clear-groups -- "$@"; }
say() { echo "$1=$2"; }

cd /mnt/ids
say ids.hostfile "$(stat -c %u:%g hostfile)"
as 1000 sh -c 'echo from-1000 > mine && mkdir mydir'
say ids.mine "$(stat -c %u:%g mine)"
say ids.mydir "$(stat -c %u:%g mydir)"
say ids.forbidden "$(as 3000 touch forbidden 2>&1 || true)"
chown 1007:1008 chowned
say ids.chowned "$(stat -c %u:%g chowned)"
say ids.ls "$(ls -ln | awk '$9=="hostfile"{print $3":"$4}')"
say ids.readable_as_owner "$(as 1005 cat hostfile 2>&1)"

cd /mnt/xmap
setfattr -n trusted.color -v blue f
say xmap.get "$(getfattr --only-values -n trusted.color f)"
say xmap.list "$(getfattr -d -m - --absolute-names f | grep = | sort | tr '\n' ' ')"
say xmap.direct "$(setfattr -n user.virtiofs.trusted.sneak -v x f 2>&1 || true)"
say xmap.hostname "$(getfattr --only-values -n trusted.host f 2>&1 || true)"

cd /mnt/acl
echo secret > secret && chmod 600 secret
setfacl -m u:1000:r secret
say acl.getfacl "$(getfacl -cpn secret | grep '^user:1000' )"
say acl.as1000 "$(as 1000 cat secret 2>&1)"
say acl.as1001 "$(as 1001 cat secret 2>&1 || true)"
say acl.hostset "$(as 1001 cat hostacl 2>&1)"
mkdir inherit && setfacl -d -m u:1000:rwx inherit
(umask 077; echo made > inherit/new)
say acl.inherited "$(getfacl -cpn inherit/new | grep -e '^user:1000' -e '^mask' | tr '\n' ' ')"
as 1000 sh -c 'echo appended >> inherit/new' && say acl.write1000 ok
(umask 027; mkdir plain)
say acl.umask "$(stat -c %a plain)"

cd /mnt/sub
say sub.inside "$(cat mnt/inside)"
say sub.dev_differs "$([ "$(stat -c %d .)" != "$(stat -c %d mnt/.)" ] && echo yes || echo no)"
say sub.mounted "$(grep -c ' /mnt/sub/mnt virtiofs ' /proc/mounts)"
echo from-guest > mnt/written && say sub.readback "$(cat mnt/written)"
say sub.dev_plain_dir "$([ "$(stat -c %d .)" = "$(stat -c %d plaindir/.)" ] && echo same || echo differs)"

cd /mnt/label
touch file && mkdir dir && ln -s file link && mkfifo fifo && echo label.created=yes
echo done
"""


def _daemon(argv: list[str], sock: str) -> guestvm.DaemonProcess:
    return guestvm.DaemonProcess(argv, sock, env=daemon_env()).start()


def _pyvirtiofsd(sock: str, shared: Path, *opts: str) -> list[str]:
    return [sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
            f"--shared-dir={shared}", *opts]


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def run(request, guest_ready, short_tmp):
    """One boot per guest kernel (6.12's FUSE handles ACLs and submounts with newer code)."""
    kernel = request.param
    tmp = Path(short_tmp) / f"identity-{kernel}"
    shares = {n: tmp / n for n in ("ids", "xmap", "acl", "sub", "label")}
    for d in shares.values():
        d.mkdir(parents=True)
        os.chmod(d, 0o777)
    ids, xmap, acl, sub, label = shares.values()
    (ids / "hostfile").write_text("host\n")
    os.chown(ids / "hostfile", 101005, 201005)
    os.chmod(ids / "hostfile", 0o600)
    (ids / "chowned").write_text("c\n")
    (xmap / "f").write_text("x\n")
    os.setxattr(xmap / "f", "trusted.host", b"host-only")
    os.setxattr(xmap / "f", "user.virtiofs.trusted.pre", b"pre")
    os.setxattr(xmap / "f", "user.plain", b"plain")
    (acl / "hostacl").write_text("host acl\n")
    os.chmod(acl / "hostacl", 0o600)
    subprocess.run(["setfacl", "-m", "u:1001:r", str(acl / "hostacl")], check=True)
    (sub / "mnt").mkdir()
    (sub / "plaindir").mkdir()
    socks = {n: str(tmp / f"{n}.sock") for n in shares}
    daemons = [
        _daemon(_pyvirtiofsd(socks["ids"], ids, "--translate-uid=map:1000:101000:100",
                             "--translate-uid=forbid-guest:3000:1",
                             "--translate-gid=map:1000:201000:100"), socks["ids"]),
        _daemon(_pyvirtiofsd(socks["xmap"], xmap, "--xattrmap=/map/trusted./user.virtiofs./"),
                socks["xmap"]),
        _daemon(_pyvirtiofsd(socks["acl"], acl, "--posix-acl"), socks["acl"]),
        # a tmpfs below the share, mounted only in the daemon's own mount namespace
        _daemon(["unshare", "-m", "--propagation", "private", "sh", "-c",
                 f"mount -t tmpfs -o size=1m none {shlex.quote(str(sub / 'mnt'))} && "
                 f"echo inner > {shlex.quote(str(sub / 'mnt' / 'inside'))} && exec "
                 + shlex.join(_pyvirtiofsd(socks["sub"], sub, "--announce-submounts"))],
                socks["sub"]),
        _daemon(_pyvirtiofsd(socks["label"], label, "--security-label", "--modcaps=+sys_admin"),
                socks["label"]),
    ]
    try:
        res = guestvm.run_guest(textwrap.dedent(GUEST),
                                [guestvm.Share(n, socket=socks[n]) for n in shares],
                                hostroot=True, daemons=daemons, timeout=600, kernel=kernel,
                                # a security module that hands FUSE a context for new files
                                extra_append="security=selinux")
        codes = []
        for d in daemons:
            try:
                codes.append(d.wait(timeout=30))
            except subprocess.TimeoutExpired:
                codes.append("still running")
    finally:
        for d in daemons:
            d.stop()
    out = dict(line.split("=", 1) for line in res.output.splitlines() if "=" in line)
    return {"res": res, "out": out, "shares": shares, "daemons": daemons, "codes": codes}


def test_guest_ran_and_daemons_exited_cleanly(run):
    res = run["res"]
    assert res.status == 0 and res.output.rstrip().endswith("done"), res.output
    for d, code in zip(run["daemons"], run["codes"]):
        assert code == 0, f"{d.argv}: exit {code}\n{d.log[-3000:]}"
        assert "Traceback" not in d.log, d.log[-3000:]


def test_translated_ids(run):
    out, ids = run["out"], run["shares"]["ids"]
    assert out["ids.hostfile"] == "1005:1005"  # host 101005:201005 in guest ids
    assert out["ids.ls"] == "1005:1005"        # the same through readdirplus
    assert out["ids.readable_as_owner"] == "host"  # guest 1005 is the owner of a 0600 file
    assert out["ids.mine"] == out["ids.mydir"] == "1000:1000"
    for name in ("mine", "mydir"):
        st = os.stat(ids / name)
        assert (st.st_uid, st.st_gid) == (101000, 201000), name
    assert "Operation not permitted" in out["ids.forbidden"], out["ids.forbidden"]
    assert not (ids / "forbidden").exists()
    assert out["ids.chowned"] == "1007:1008"
    st = os.stat(ids / "chowned")
    assert (st.st_uid, st.st_gid) == (101007, 201008)


def test_xattr_map(run):
    out, f = run["out"], run["shares"]["xmap"] / "f"
    assert out["xmap.get"] == "blue"
    assert os.getxattr(f, "user.virtiofs.trusted.color") == b"blue"
    assert "trusted.color" not in os.listxattr(f)
    listed = out["xmap.list"]
    for want in ('trusted.color="blue"', 'trusted.pre="pre"', 'user.plain="plain"'):
        assert want in listed, listed
    assert "host-only" not in listed and "virtiofs" not in listed, listed
    assert "Operation not permitted" in out["xmap.direct"], out["xmap.direct"]
    assert "user.virtiofs.trusted.sneak" not in os.listxattr(f)
    assert "No such attribute" in out["xmap.hostname"], out["xmap.hostname"]


def test_posix_acls(run):
    out, acl = run["out"], run["shares"]["acl"]
    assert out["acl.getfacl"] == "user:1000:r--"
    assert out["acl.as1000"] == "secret"
    assert "Permission denied" in out["acl.as1001"], out["acl.as1001"]
    assert out["acl.hostset"] == "host acl"  # an ACL set on the host holds in the guest
    inherited = out["acl.inherited"]
    assert "user:1000:rwx" in inherited and "mask::rw-" in inherited, inherited
    assert out.get("acl.write1000") == "ok"
    assert (acl / "inherit" / "new").read_text() == "made\nappended\n"
    host_acl = subprocess.run(["getfacl", "-cpn", str(acl / "inherit" / "new")],
                              capture_output=True, text=True, check=True).stdout
    assert "user:1000:rwx" in host_acl, host_acl
    assert out["acl.umask"] == "750"  # no default ACL: the umask the guest sent applies
    assert oct(os.stat(acl / "plain").st_mode & 0o777) == "0o750"


def test_submount_has_its_own_st_dev(run):
    out = run["out"]
    assert out["sub.dev_differs"] == "yes"
    assert out["sub.mounted"] == "1"
    assert out["sub.inside"] == "inner"
    assert out["sub.readback"] == "from-guest"
    assert out["sub.dev_plain_dir"] == "same"


def test_new_files_carry_the_guests_security_context(run):
    label = run["shares"]["label"]
    assert run["out"].get("label.created") == "yes", run["res"].output
    for name in ("file", "dir", "link", "fifo"):
        value = os.getxattr(label / name, "security.selinux", follow_symlinks=False)
        assert value.rstrip(b"\0") == b"unlabeled", (name, value)

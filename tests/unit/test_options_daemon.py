"""Options of the real pyvirtiofsd process as a guest (here the project's frontend, playing the
guest driver) notices them: the capabilities kept and --modcaps (chown refused, trusted.*
xattrs allowed), --seccomp=log|trap on the serving daemon.  (test_daemon_options.py checks
the same options' wire-level effects, --fd and --syslog.)"""

from __future__ import annotations

import errno
import os
import re

import pytest

from pyvirtiofs.testing.frontend import FUSE_ROOT_ID, FuseError


CAP_CHOWN, CAP_SYS_ADMIN = 0, 21


def _need_root():
    if os.geteuid() != 0:
        pytest.fail("needs root: capabilities are only dropped from a root daemon", pytrace=False)


def _caps(pid: int) -> tuple[int, int, int]:
    status = open(f"/proc/{pid}/status").read()
    return tuple(int(re.search(rf"{k}:\s*([0-9a-f]+)", status).group(1), 16)
                 for k in ("CapEff", "CapPrm", "CapInh"))


def test_nine_capabilities_kept_by_default(start_daemon, tmp_path):
    _need_root()
    daemon = start_daemon(extra_args=["--xattr"])
    daemon.wait_log("waiting for a vhost-user frontend")
    eff, prm, inh = _caps(daemon.pid)
    assert eff == prm and bin(eff).count("1") == 9 and inh == 0, (hex(eff), hex(prm), hex(inh))
    assert eff & (1 << CAP_CHOWN) and not eff & (1 << CAP_SYS_ADMIN)
    c = daemon.client()
    f = c.create(FUSE_ROOT_ID, "f")[0].nodeid
    c.setattr(f, uid=123)                                      # CAP_CHOWN kept: chown works
    assert (tmp_path / "shared" / "f").stat().st_uid == 123
    with pytest.raises(FuseError) as ei:                       # no CAP_SYS_ADMIN: EPERM
        c.setxattr(f, "trusted.t", b"v")
    assert ei.value.errno == errno.EPERM


def test_modcaps_takes_chown_away_and_gives_sys_admin(start_daemon, tmp_path):
    _need_root()
    d = start_daemon(extra_args=["--modcaps=-chown,+sys_admin", "--xattr"])
    d.wait_log("waiting for a vhost-user frontend")
    eff, _, _ = _caps(d.pid)
    assert not eff & (1 << CAP_CHOWN) and eff & (1 << CAP_SYS_ADMIN)
    c = d.client()
    f = c.create(FUSE_ROOT_ID, "f")[0].nodeid
    with pytest.raises(FuseError) as ei:
        c.setattr(f, uid=123)
    assert ei.value.errno == errno.EPERM
    assert (tmp_path / "shared" / "f").stat().st_uid == 0
    c.setxattr(f, "trusted.t", b"v")
    assert os.getxattr(tmp_path / "shared" / "f", "trusted.t") == b"v"


@pytest.mark.parametrize("mode", ["log", "trap"])
def test_seccomp_log_and_trap_filter_the_serving_daemon(start_daemon, tmp_path, mode):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "f").write_text("data")
    d = start_daemon(extra_args=[f"--seccomp={mode}"])
    d.wait_log(f"seccomp filter installed (")
    assert f"others: {mode}" in d.log()
    assert re.search(r"Seccomp:\s*2", open(f"/proc/{d.pid}/status").read())
    c = d.client()
    assert c.lookup(FUSE_ROOT_ID, "f").attr.size == 4       # and it serves

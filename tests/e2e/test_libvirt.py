"""libvirt as a real client: a TCG domain whose virtiofs share libvirt serves with pyvirtiofsd.

Debian's libvirt 9.0 (``libvirt-daemon-system``, ``libvirt-clients``; scripts/setup.sh installs
them) runs the ``<binary path=...>`` of a ``<filesystem type='mount'>`` with ``<driver
type='virtiofs' queue='1024'/>``, ``xattr='on'``, ``<cache mode='always'/>`` and ``<lock
posix='on' flock='on'/>`` as ``BINARY --fd=N -o source=DIR,cache=always,xattr,flock,posix_lock``.
There is no systemd here: libvirtd and virtlogd are started by the test when they are not
running, and stopped again.  The domain boots the project's kernel and initramfs directly, with
guest RAM in a shared memfd; the guest mounts the tag, reads, writes and renames; its
output comes back through a serial console file.  ``virsh destroy`` must leave no daemon behind.
Anything missing fails the test, it never skips.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import sys
import time
from pathlib import Path

import pytest

from pyvirtiofs.fuse import abi
from pyvirtiofs.testing import guestvm
from .libvirtd import Libvirtd, virsh, virtiofs_domain_xml

from .conftest import SRC

pytestmark = pytest.mark.guest

TAG = "lvshare"
GUEST = f"""\
mkdir -p /mnt/lv && mount -t virtiofs {TAG} /mnt/lv || echo MOUNT-FAILED
cat /mnt/lv/from-host.txt
echo "written by the guest" > /mnt/lv/from-guest.txt
mkdir /mnt/lv/dir && mv /mnt/lv/from-guest.txt /mnt/lv/dir/ && echo moved
ls /mnt/lv | tr '\\n' ' '; echo
echo LV-DONE
sleep 600
"""


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and pid != str(os.getpid()):
            found.append(f"{pid}: {cmd}")
    return found


def test_libvirt_domain_with_a_pyvirtiofsd_share(guest_ready, short_tmp):
    tmp = Path(short_tmp) / "libvirt"
    share = tmp / "share"
    share.mkdir(parents=True)
    secret = secrets.token_hex(8)
    (share / "from-host.txt").write_text(f"host says {secret}\n")
    args_log = tmp / "args.log"
    binary = tmp / "pyvirtiofsd"
    binary.write_text(
        "#!/bin/sh\n"
        f"echo \"$$ $*\" >> {shlex.quote(str(args_log))}\n"
        f"export PYTHONPATH={shlex.quote(str(SRC))}\n"
        f"exec {shlex.quote(sys.executable)} -m pyvirtiofs \"$@\"\n")
    binary.chmod(0o755)

    kernel = guestvm.prepare_kernel()
    initrd = tmp / "initrd.img"
    marker = guestvm.write_initrd(initrd, guestvm.base_initramfs(kernel), GUEST)
    console, out = tmp / "console.log", tmp / "out.log"
    name = f"pyvfs-test-{secrets.token_hex(4)}"
    xml = virtiofs_domain_xml(name, kernel.image, initrd, "console=ttyS0 quiet panic=-1",
                              [console, out], binary, share, TAG)
    (tmp / "domain.xml").write_text(xml)
    daemon_log = Path(f"/var/log/libvirt/qemu/{name}-fs0-virtiofsd.log")

    with Libvirtd(tmp) as lv:
        created = False
        try:
            virsh("create", str(tmp / "domain.xml"))
            created = True
            deadline = time.monotonic() + 300
            text = ""
            while "LV-DONE" not in text:
                text = out.read_text(errors="replace") if out.exists() else ""
                state = virsh("domstate", name, check=False).stdout.strip()
                if state not in ("running", "") or time.monotonic() > deadline or marker in text:
                    pytest.fail(f"the guest did not finish its script (domain {state!r})\n"
                                f"--- output ---\n{text[-2000:]}\n--- console ---\n"
                                f"{console.read_text(errors='replace')[-3000:] if console.exists() else ''}"
                                f"\n--- libvirtd ---\n{lv.log('libvirtd')[-2000:]}", pytrace=False)
                time.sleep(0.5)
            daemons = _processes_mentioning(f"source={share}")
            assert daemons, "no pyvirtiofsd process while the domain runs"
            virsh("destroy", name)
            created = False
        finally:
            if created:
                virsh("destroy", name, check=False)
        # No daemon left once the domain is gone.
        deadline = time.monotonic() + 20
        while _processes_mentioning(f"source={share}") and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_mentioning(f"source={share}")
        assert not left, f"daemon processes left after virsh destroy: {left}"

    # libvirt ran our binary the way libvirt 9.0 runs virtiofsd.
    calls = args_log.read_text().splitlines()
    assert len(calls) == 1, calls
    argv = calls[0].split(" ", 1)[1].split()
    assert argv[0].startswith("--fd=") and argv[1] == "-o", argv
    opts = argv[2].split(",")
    assert opts[0] == f"source={share}" and {"cache=always", "xattr", "flock", "posix_lock"} <= set(opts), argv

    lines = text.split("LV-DONE")[0].splitlines()
    assert "MOUNT-FAILED" not in lines, text
    assert f"host says {secret}" in lines and "moved" in lines, text
    assert (share / "dir" / "from-guest.txt").read_text() == "written by the guest\n"
    dlog = daemon_log.read_text(errors="replace")
    assert "cache=always" in dlog, dlog[-3000:]
    m = re.search(r"FUSE session: .* negotiated (0x[0-9a-f]+)", dlog)
    assert m, dlog[-3000:]
    # <lock posix='on' flock='on'/> became posix_lock,flock: both lock kinds are negotiated.
    negotiated = int(m.group(1), 16)
    assert negotiated & abi.POSIX_LOCKS and negotiated & abi.FLOCK_LOCKS, hex(negotiated)
    assert "Traceback" not in dlog, dlog[-5000:]

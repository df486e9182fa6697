"""virtme-ng (PyPI ``virtme-ng``, pinned in requirements-test.txt) as a real client.

With pyvirtiofsd on PATH as ``virtiofsd`` (a two-line wrapper script in a temporary
directory), ``vng --run KERNEL --disable-kvm --exec CMD`` finds it (it probes ``--version`` and
``--help``), starts it as ``virtiofsd --syslog --no-announce-submounts --readonly --socket-path X
--shared-dir / --sandbox none --cache always``, waits for ``X.pid`` and boots the guest with the
host's root file system served by it.  CMD's output comes back on vng's stdout.

The guest kernel is Debian 13's Linux 6.12 (virtiofs built in; virtme-ng's initramfs loads no
modules of ours).  virtme-ng needs Debian's ``kmod`` and ``udev`` (scripts/setup.sh installs
them).  vng waits about 3 s for the pid file and otherwise falls back to 9p; the test then fails
saying so, it does not pass on 9p.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest


def test_vng_boots_on_a_root_served_by_pyvirtiofsd(guest_ready, short_tmp):
    vng = Path(sys.executable).with_name("vng")
    assert vng.exists(), f"{vng} missing: virtme-ng is pinned in requirements-test.txt"
    for tool in ("depmod", "udevadm"):
        assert shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"), (
            f"{tool} missing: scripts/setup.sh installs kmod and udev, which virtme-ng needs")
    kernel = guestvm.prepare_kernel(kernel="6.12")

    tmp = Path(short_tmp) / "vng"
    bindir = tmp / "bin"
    bindir.mkdir(parents=True)
    args_log, daemon_log = tmp / "args.log", tmp / "daemon.log"
    wrapper = bindir / "virtiofsd"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo \"$$ $*\" >> {shlex.quote(str(args_log))}\n"
        f"exec {shlex.quote(sys.executable)} -m pyvirtiofs \"$@\" 2>>{shlex.quote(str(daemon_log))}\n")
    wrapper.chmod(0o755)
    secret = secrets.token_hex(16)
    (tmp / "marker").write_text(secret + "\n")

    cmd = (f"grep ' / ' /proc/mounts; uname -r; cat {tmp}/marker; "
           f"touch {tmp}/from-guest 2>&1 || true; echo VNG-DONE")
    env = dict(daemon_env())
    env["PATH"] = os.pathsep.join([str(bindir), str(Path(sys.executable).parent),
                                   env.get("PATH", "/usr/bin:/bin"), "/usr/sbin", "/sbin"])
    t0 = time.monotonic()
    r = subprocess.run([str(vng), "--run", str(kernel.bzimage), "--disable-kvm", "--exec", cmd],
                       cwd=tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=600)
    wall = time.monotonic() - t0
    dlog = daemon_log.read_text() if daemon_log.exists() else ""
    detail = (f"vng exit {r.returncode} after {wall:.0f} s\n--- stdout ---\n{r.stdout[-3000:]}\n"
              f"--- stderr ---\n{r.stderr[-3000:]}\n--- daemon log ---\n{dlog[-3000:]}")
    assert "fallback to 9p" not in r.stderr, "vng gave up on pyvirtiofsd and used 9p:\n" + detail
    assert r.returncode == 0 and "VNG-DONE" in r.stdout, detail

    # vng ran our daemon with its usual command line (--version / --help probes first).
    calls = [line.split(" ", 1) for line in args_log.read_text().splitlines()]
    serving = [(pid, a) for pid, a in calls if "--socket-path" in a]
    assert len(serving) == 1, calls
    pid, argv = int(serving[0][0]), serving[0][1].split()
    for opt in ("--syslog", "--no-announce-submounts", "--readonly", "--sandbox", "--cache"):
        assert opt in argv, argv
    assert argv[argv.index("--shared-dir") + 1] == "/", argv

    out = r.stdout.splitlines()
    # The guest's root is virtiofs (virtme-ng's tag is ROOTFS), served by that daemon...
    assert any(line.split()[1:3] == ["/", "virtiofs"] for line in out if len(line.split()) > 2), detail
    assert kernel.release in out, detail
    # ...which read a host file for it, and refused a write (vng passes --readonly).
    assert secret in out, detail
    assert any("Read-only file system" in line for line in out), detail
    assert not (tmp / "from-guest").exists()
    assert "FUSE session: guest 7.41" in dlog and "Traceback" not in dlog, dlog[-5000:]

    # vng stops the daemon when it exits: none is left behind.
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    if os.path.exists(f"/proc/{pid}"):
        state = Path(f"/proc/{pid}/status").read_text().split("\n")[2]
        if "zombie" not in state:
            os.kill(pid, 9)
            pytest.fail(f"pyvirtiofsd (pid {pid}) still runs after vng exited ({state})\n{dlog[-3000:]}")

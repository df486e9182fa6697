"""See pyvirtiofsd serve a real Linux guest: ``python -m pyvirtiofs.demo``.

The demo makes a temporary shared directory with a file written by the host,
starts pyvirtiofsd on it, boots a small Linux guest under QEMU that mounts the
share with ``mount -t virtiofs``, reads the host's file, writes its own, lists
the directory and shows ``df`` and ``stat``; then the host prints the file the
guest wrote.  It exits non-zero if any step fails.

``--daemon-cmd`` runs another daemon instead, e.g.
``--daemon-cmd '/usr/libexec/virtiofsd --sandbox none'`` (``--socket-path=``
and ``--shared-dir=`` are appended).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Sequence

from pyvirtiofs.testing import guestvm
from pyvirtiofs.testing.guestvm import DaemonError, DaemonProcess, GuestError, Share

TAG = "demo"
HOST_FILE = "hello-from-host.txt"
GUEST_FILE = "hello-from-guest.txt"

GUEST_SCRIPT = f"""\
set -e
echo "# mounted: $(grep ' /mnt/{TAG} ' /proc/mounts)"
echo "# the host's file, read through virtiofs:"
cat {HOST_FILE}
echo "# writing a file of our own"
echo "hello from the guest (Linux $(uname -r))" > {GUEST_FILE}
mkdir -p made-by-guest
echo nested > made-by-guest/nested.txt
echo "# the shared directory:"
ls -la
echo "# df:"
df -h .
echo "# stat {GUEST_FILE}:"
stat {GUEST_FILE}
"""


def say(msg: str = "") -> None:
    print(msg, flush=True)


def indent(text: str, prefix: str = "   | ") -> str:
    return textwrap.indent(text.rstrip("\n"), prefix, lambda _: True)


def run_demo(daemon_cmd: Sequence[str], *, accel: str | None, timeout: float, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="pyvfs-demo-"))
    shared = work / "shared"
    shared.mkdir()
    sock = work / "vfs.sock"
    ok = False
    try:
        say("pyvirtiofs demo: a Linux guest mounts a directory served by a virtiofs daemon")
        say()
        host_text = f"hello from the host, written at {time.strftime('%H:%M:%S')}\n"
        (shared / HOST_FILE).write_text(host_text)
        say(f"1. Shared directory {shared}")
        say(f"   the host wrote {HOST_FILE}: {host_text.strip()!r}")

        say("2. Checking for QEMU and busybox, preparing the guest kernel "
            f"(cached in {guestvm.cache_dir()}; the first run downloads it)")
        t = time.monotonic()
        guestvm.ensure_host_tools()
        kernel = guestvm.prepare_kernel()
        guestvm.base_initramfs(kernel)
        say(f"   kernel {kernel.release} from {kernel.package} ready in {time.monotonic() - t:.1f} s")

        argv = [*daemon_cmd, f"--socket-path={sock}", f"--shared-dir={shared}"]
        say(f"3. Starting the daemon: {shlex.join(argv)}")
        daemon = DaemonProcess(argv, sock, log_path=work / "daemon.log")
        try:
            daemon.start()
        except DaemonError as e:
            say(f"   FAILED: {e}")
            return 1
        with daemon:
            say(f"   listening on {sock} (pid {daemon.pid})")
            say(f"4. Booting a guest ({accel or os.environ.get('PYVIRTIOFS_ACCEL', 'tcg')}) with a vhost-user-fs device "
                f"tagged {TAG!r}; it runs `mount -t virtiofs {TAG} /mnt/{TAG}` and then:")
            say(indent(GUEST_SCRIPT, "   $ "))
            try:
                res = guestvm.run_guest(GUEST_SCRIPT, [Share(TAG, socket=str(sock))],
                                        accel=accel, timeout=timeout, daemons=[daemon])
            except GuestError as e:
                say(f"   FAILED: {e}")
                say("--- daemon log ---")
                say(daemon.log)
                return 1
            say("   --- guest output ---")
            say(indent(res.output))
            say(f"   --- guest powered off: script exit status {res.status}, {res.wall:.1f} s in QEMU "
                f"(script started {res.ready} s after boot) ---")
            if res.status != 0:
                say("   FAILED: the guest script did not succeed")
                say("--- daemon log ---")
                say(daemon.log)
                return 1

            say("5. Back on the host:")
            guest_file = shared / GUEST_FILE
            if not guest_file.exists():
                say(f"   FAILED: {guest_file} does not exist on the host")
                return 1
            say(f"   {GUEST_FILE}: {guest_file.read_text().strip()!r}")
            nested = shared / "made-by-guest" / "nested.txt"
            if not nested.exists() or nested.read_text() != "nested\n":
                say(f"   FAILED: {nested} is missing or wrong")
                return 1
            say(f"   the directory now holds: {', '.join(sorted(p.name for p in shared.iterdir()))}")

            try:
                rc = daemon.wait(timeout=10)
                say(f"6. The daemon exited by itself after the guest went away (status {rc})")
                if rc != 0:
                    say("   FAILED: non-zero exit status")
                    say(daemon.log)
                    return 1
            except subprocess.TimeoutExpired:
                say("6. The daemon is still running after the guest went away; stopping it")
        ok = True
        say()
        say("OK: the guest read the host's file and the host reads the guest's file.")
        return 0
    except GuestError as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        if keep or not ok:
            say(f"(files kept in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyvirtiofs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--daemon-cmd", default=None,
                   help="daemon command line without --socket-path/--shared-dir "
                        "(default: the Python running this demo with -m pyvirtiofs)")
    p.add_argument("--accel", default=None, help="tcg or kvm (default: $PYVIRTIOFS_ACCEL or tcg)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    cmd = shlex.split(a.daemon_cmd) if a.daemon_cmd else [sys.executable, "-m", "pyvirtiofs"]
    return run_demo(cmd, accel=a.accel, timeout=a.timeout, keep=a.keep)


if __name__ == "__main__":
    sys.exit(main())

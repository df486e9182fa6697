"""libvirt as a client of a virtiofs daemon: run libvirtd by hand and describe a TCG domain.

On a machine without systemd (a container, CI), Debian's ``libvirt-daemon-system`` installs
libvirtd and virtlogd but nothing starts them.  :class:`Libvirtd` starts both in the
foreground as child processes when they are not already running, and stops exactly the ones
it started.  :func:`virtiofs_domain_xml` writes a domain that boots a kernel and initrd
directly (the :mod:`pyvirtiofs.testing.guestvm` ones), keeps guest RAM in a shared memfd (as
vhost-user needs) and has one virtiofs ``<filesystem>`` whose daemon libvirt starts itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import quoteattr

__all__ = ["LibvirtError", "Libvirtd", "virsh", "virtiofs_domain_xml"]

URI = "qemu:///system"
SOCKET = "/run/libvirt/libvirt-sock"
PACKAGES = ("libvirt-daemon-system", "libvirt-clients")


class LibvirtError(RuntimeError):
    pass


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    if check and r.returncode != 0:
        raise LibvirtError(f"virsh {' '.join(args)} failed (exit {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
    return r


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0


class Libvirtd:
    """``with Libvirtd(logdir):`` -- virtlogd and libvirtd are up inside the block."""

    def __init__(self, logdir: Path, start_timeout: float = 60) -> None:
        self.logdir = Path(logdir)
        self.start_timeout = start_timeout
        self.started: list[subprocess.Popen] = []

    def __enter__(self) -> "Libvirtd":
        missing = [p for p in ("libvirtd", "virtlogd", "virsh") if not self._which(p)]
        if missing:
            raise LibvirtError(f"{', '.join(missing)} not found: apt-get install "
                               f"--no-install-recommends {' '.join(PACKAGES)} (scripts/setup.sh does)")
        try:
            for name in ("virtlogd", "libvirtd"):
                if not _running(name):
                    log = open(self.logdir / f"{name}.log", "wb")
                    self.started.append(subprocess.Popen(
                        [self._which(name)], stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True))
                    log.close()
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _which(name: str) -> str | None:
        return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for p in self.started:
                if p.poll() is not None:
                    raise LibvirtError(f"{p.args[0]} exited with status {p.returncode}: "
                                       f"{self.log(Path(p.args[0]).name)[-2000:]}")
            if os.path.exists(SOCKET) and virsh("version", check=False, timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not answer within {self.start_timeout:g} s: "
                                   f"{self.log('libvirtd')[-2000:]}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.logdir / f"{name}.log").read_text(errors="replace")
        return ""

    def __exit__(self, *exc: object) -> None:
        # Only what we started, libvirtd first (it holds virtlogd's socket).
        for p in reversed(self.started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.started.clear()


def virtiofs_domain_xml(name: str, kernel: Path, initrd: Path, cmdline: str, serial_logs: Sequence[Path],
                        binary: Path, source: Path, tag: str, memory_mib: int = 512) -> str:
    """A TCG domain booting ``kernel``/``initrd`` with one virtiofs share served by ``binary``
    (which libvirt starts as ``binary --fd=N -o source=DIR,cache=always,xattr,flock,posix_lock``).
    QEMU runs as root without relabelling, so files under /tmp are usable as they are."""
    q = quoteattr
    serials = "\n".join(
        f"    <serial type='file'><source path={q(str(p))}/><target port='{i}'/></serial>"
        for i, p in enumerate(serial_logs))
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <binary path={q(str(binary))} xattr='on'>
        <cache mode='always'/>
        <lock posix='on' flock='on'/>
      </binary>
      <source dir={q(str(source))}/>
      <target dir={q(tag)}/>
    </filesystem>
{serials}
    <memballoon model='none'/>
  </devices>
</domain>
"""

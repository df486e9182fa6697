"""Boot a real Linux guest under QEMU and run a shell script in it.

This is pyvirtiofs's own end-to-end harness.  It only needs the standard
library, QEMU (``qemu-system-x86``), a static busybox (``busybox-static``) and
a Debian kernel package, which is downloaded with ``apt-get download`` and
unpacked (never installed) into a cache directory.

How a run works:

* Two guest kernels can be chosen (:data:`KERNELS`, ``kernel=`` or
  ``$PYVIRTIOFS_GUEST_KERNEL``): ``6.1``, Debian 12's kernel from the host's
  own apt sources (the default), and ``6.12``, Debian 13's kernel, fetched from
  the ``trixie`` suite through a private apt configuration in the cache (the
  host's apt set-up is not touched).  The kernel package named by ``apt-cache
  depends linux-image-amd64`` is unpacked once into the cache.  The
  uncompressed ELF ``vmlinux`` is pulled out of the bzImage (an XZ stream in
  6.1, a zstd frame in 6.12) so that QEMU can start it through its PVH entry
  point, which roughly halves the boot time under TCG.
* A base initramfs (static busybox, the kernel's own virtio/fuse/virtiofs/9p
  modules, the ones it does not have built in, and a generic ``/init``) is
  written as a newc cpio archive and cached.  Each run
  appends a second, small cpio archive holding the script and a generated
  setup file that mounts the shares.
* Guest RAM lives in a shared memfd (``memory-backend-memfd,share=on``) as
  vhost-user requires.  Each :class:`Share` becomes either a
  ``vhost-user-fs-pci`` device connected to a daemon's socket, or a QEMU
  ``virtio-9p-pci`` export of a host directory.
* The kernel console goes to the first serial port, the script's
  stdout+stderr to the second one, followed by a marker line carrying the exit
  status.  A missing marker means the guest never ran the script (boot
  failure, mount failure, timeout) and raises :class:`GuestError` with the
  console log.
* With ``hostroot=True`` the guest's root file system is the host's ``/``,
  read-only, over virtio-9p (tmpfs on ``/tmp``, ``/run``, ``/var/tmp`` and
  ``/mnt``), so host programs such as ``python3`` run inside the guest.

Environment knobs: ``PYVIRTIOFS_CACHE`` (cache directory, default
``~/.cache/pyvirtiofs/guest``), ``PYVIRTIOFS_ACCEL`` (``tcg`` or ``kvm``),
``PYVIRTIOFS_GUEST_KERNEL`` (``6.1`` or ``6.12``), ``PYVIRTIOFS_KERNEL_PKG``
(kernel package to download instead of the one the suite names),
``PYVIRTIOFS_KERNEL`` (boot this kernel image instead; its modules still come
from the package).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import lzma
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

__all__ = [
    "GuestError",
    "DaemonError",
    "Share",
    "GuestResult",
    "KernelInfo",
    "KERNELS",
    "DaemonProcess",
    "ensure_host_tools",
    "cache_dir",
    "prepare_kernel",
    "base_initramfs",
    "run_guest",
    "main",
]

QEMU_BINARY = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """A Debian guest kernel the harness knows how to fetch and boot."""

    name: str                 #: what ``kernel=`` / ``$PYVIRTIOFS_GUEST_KERNEL`` say
    suite: str | None         #: Debian suite to fetch from; None: the host's own apt sources
    fallback_package: str     #: used when apt cannot name the current package
    #: Modules loaded in the guest, in load order (path below kernel/); those the kernel
    #: has built in are skipped.  Each kernel's own modules: a module of another release
    #: does not load ("section size must match").
    modules: tuple[str, ...]


_VIRTIO_FUSE_MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "fs/fuse/fuse",
    "fs/fuse/virtiofs",
)

KERNELS = {
    # Debian 12: everything is a module.
    "6.1": GuestKernel("6.1", None, "linux-image-6.1.0-56-amd64", _VIRTIO_FUSE_MODULES + (
        "fs/netfs/netfs", "fs/fscache/fscache", "net/9p/9pnet", "net/9p/9pnet_virtio", "fs/9p/9p")),
    # Debian 13: virtio, fuse and virtiofs are built in; fscache became part of netfs (6.8).
    "6.12": GuestKernel("6.12", "trixie", "linux-image-6.12.117+deb13-amd64", _VIRTIO_FUSE_MODULES + (
        "fs/netfs/netfs", "net/9p/9pnet", "net/9p/9pnet_virtio", "fs/9p/9p")),
}
DEFAULT_KERNEL = "6.1"


def guest_kernel(name: str | None = None) -> GuestKernel:
    """The kernel named ``name``, else ``$PYVIRTIOFS_GUEST_KERNEL``, else 6.1."""
    name = name or os.environ.get("PYVIRTIOFS_GUEST_KERNEL") or DEFAULT_KERNEL
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown guest kernel {name!r}; known: {', '.join(KERNELS)}") from None

HOSTROOT_TAG = "hostroot"
NINEP_DEFAULT_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,36}$")
# Bump when the base initramfs layout or /init changes.
_INITRAMFS_FORMAT = 3


class GuestError(RuntimeError):
    """The guest did not report an exit status (or the harness could not start it)."""


class DaemonError(RuntimeError):
    """A daemon started by :class:`DaemonProcess` failed to come up."""


# --------------------------------------------------------------------------
# Host tools
# --------------------------------------------------------------------------

def _is_static_elf(path: str) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP (static)."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
                return False
            e_phoff, = struct.unpack_from("<Q", ident, 32)
            e_phentsize, e_phnum = struct.unpack_from("<HH", ident, 54)
            f.seek(e_phoff)
            ph = f.read(e_phentsize * e_phnum)
    except OSError:
        return False
    for i in range(e_phnum):
        p_type, = struct.unpack_from("<I", ph, i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def ensure_host_programs(programs: dict[str, str]) -> None:
    """Install {program: apt package} when missing (host-root guests run host programs)."""
    missing = sorted({pkg for prog, pkg in programs.items() if shutil.which(prog) is None})
    if missing:
        _apt_install(missing)


def _apt_install(packages: Sequence[str]) -> None:
    if shutil.which("apt-get") is None:
        raise GuestError(
            f"missing host tools and no apt-get to install them: please install {' '.join(packages)}")
    if os.geteuid() != 0:
        raise GuestError(
            f"missing host tools; run as root or install them yourself: "
            f"apt-get install -y --no-install-recommends {' '.join(packages)}")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends",
           "-o", "DPkg::Lock::Timeout=600", *packages]
    r = subprocess.run(cmd, env=_apt_env(), capture_output=True, text=True)
    if r.returncode != 0:
        # Package lists may be missing or stale (fresh containers): update once, retry.
        subprocess.run(["apt-get", "update", "-o", "DPkg::Lock::Timeout=600"],
                       env=_apt_env(), capture_output=True, text=True)
        r = subprocess.run(cmd, env=_apt_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise GuestError(
            f"could not install {' '.join(packages)} with apt-get (exit {r.returncode}):\n"
            f"{(r.stdout + r.stderr)[-3000:]}")


def ensure_host_tools() -> None:
    """Make sure QEMU and a static busybox are present; apt-get install them if not.

    Raises :class:`GuestError` with the reason when they cannot be installed.
    """
    missing = []
    if shutil.which(QEMU_BINARY) is None:
        missing.append("qemu-system-x86")
    if not _is_static_elf(BUSYBOX):
        missing.append("busybox-static")
    if shutil.which("zstd") is None:
        missing.append("zstd")  # the 6.12 bzImage is zstd-compressed
    if missing:
        _apt_install(missing)
    if shutil.which(QEMU_BINARY) is None:
        raise GuestError(f"{QEMU_BINARY} still not found after installing qemu-system-x86")
    if not _is_static_elf(BUSYBOX):
        raise GuestError(f"{BUSYBOX} is not a static executable even after installing busybox-static")
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise GuestError(f"{tool} is needed to fetch the guest kernel (Debian/Ubuntu host expected)")


# --------------------------------------------------------------------------
# Cache, kernel
# --------------------------------------------------------------------------

def cache_dir() -> Path:
    """The cache directory: ``$PYVIRTIOFS_CACHE`` or ``~/.cache/pyvirtiofs/guest``."""
    env = os.environ.get("PYVIRTIOFS_CACHE")
    d = Path(env) if env else Path.home() / ".cache" / "pyvirtiofs" / "guest"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Exclusive lock on the cache directory (across processes)."""
    with open(cache / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """A prepared guest kernel in the cache."""

    package: str
    release: str            #: ``uname -r`` of the guest
    image: Path             #: what QEMU boots (ELF vmlinux if PVH-capable, else bzImage)
    bzimage: Path
    modules_dir: Path       #: holds ``<module path>.ko`` for the kernel's modules (fewer if built in)
    modules: tuple[str, ...]  #: the modules to insmod, in order


# -- apt: the host's sources, or a private configuration for another Debian suite ----------

def _debian_mirror() -> str:
    """The Debian mirror the host's apt already uses (so a suite of the same archive works)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            m = re.search(r"^URIs:\s*(\S+)", src.read_text(), re.M)
            if m and "security" not in m.group(1):
                return m.group(1)
    with contextlib.suppress(OSError):
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s", Path("/etc/apt/sources.list").read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def _apt_options(spec: GuestKernel, cache: Path) -> list[str]:
    """apt options for ``spec``'s suite: none for the host's own sources, else a private
    configuration under the cache (lists refreshed at most once a day)."""
    if spec.suite is None:
        return []
    root = cache / f"apt-{spec.suite}"
    opts = ["-o", f"Dir::Etc={root}/etc", "-o", f"Dir::State={root}/state",
            "-o", f"Dir::Cache={root}/cache", "-o", "Dir::State::status=/var/lib/dpkg/status",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]
    stamp = root / "updated"
    with contextlib.suppress(OSError):
        if time.time() - stamp.stat().st_mtime < 86400:
            return opts
    for d in ("etc/sources.list.d", "etc/preferences.d", "state/lists/partial", "cache/archives/partial"):
        (root / d).mkdir(parents=True, exist_ok=True)
    with _locked(root):
        with contextlib.suppress(OSError):
            if time.time() - stamp.stat().st_mtime < 86400:
                return opts  # another process refreshed the lists meanwhile
        (root / "etc/sources.list").write_text("")
        (root / "etc/sources.list.d" / f"{spec.suite}.sources").write_text(
            f"Types: deb\nURIs: {_debian_mirror()}\nSuites: {spec.suite}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        _run_checked(["apt-get", *opts, "update"], f"apt-get update for the {spec.suite} suite",
                     timeout=600)
        stamp.touch()
    return opts


def _kernel_package(spec: GuestKernel, cache: Path) -> str:
    """The kernel package to use; apt is asked at most once a day (it takes 0.5 s)."""
    pkg = os.environ.get("PYVIRTIOFS_KERNEL_PKG")
    if pkg:
        return pkg
    memo = cache / ("kernel-package" if spec.suite is None else f"kernel-package-{spec.suite}")
    with contextlib.suppress(OSError):
        if time.time() - memo.stat().st_mtime < 86400:
            name = memo.read_text().strip()
            if name:
                return name
    name = _ask_apt_for_kernel_package(spec, cache)
    with contextlib.suppress(OSError):
        _atomic_write(memo, name.encode() + b"\n")
    return name


def _ask_apt_for_kernel_package(spec: GuestKernel, cache: Path) -> str:
    try:
        r = subprocess.run(["apt-cache", *_apt_options(spec, cache), "depends", "linux-image-amd64"],
                           capture_output=True, text=True, timeout=60)
        for line in r.stdout.splitlines():
            m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
            if m:
                return m.group(1)
    except (OSError, subprocess.SubprocessError, GuestError):
        pass
    return spec.fallback_package


def _has_pvh_note(elf: bytes) -> bool:
    """True if the ELF image carries XEN_ELFNOTE_PHYS32_ENTRY (QEMU's PVH entry)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    e_phoff, = struct.unpack_from("<Q", elf, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, = struct.unpack_from("<I", elf, off)
        if p_type != 4:  # PT_NOTE
            continue
        p_offset, = struct.unpack_from("<Q", elf, off + 8)
        p_filesz, = struct.unpack_from("<Q", elf, off + 32)
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _bzimage_payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol 2.08+: payload_offset/length)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return b""
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start:start + length]


def _extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, if it can be PVH-booted.

    6.1 is XZ-compressed (Python's lzma), 6.12 zstd-compressed (the ``zstd`` tool; the
    kernel build appends the uncompressed size as 4 bytes after the zstd frame)."""
    payload = _bzimage_payload(bzimage)
    out = None
    if payload.startswith(b"\xfd7zXZ\x00"):
        with contextlib.suppress(lzma.LZMAError):
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        r = subprocess.run(["zstd", "-dcq"], input=payload[:-4], capture_output=True)
        out = r.stdout if r.returncode == 0 else None
    if not out or out[:4] != b"\x7fELF" or not _has_pvh_note(out):
        return None
    return out


def _run_checked(cmd: Sequence[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_apt_env(), **kw)
    if r.returncode != 0:
        raise GuestError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    return r


def _download_kernel(pkg: str, work: Path, spec: GuestKernel, cache: Path) -> Path:
    opts = _apt_options(spec, cache)
    cmd = ["apt-get", *opts, "download", pkg]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_apt_env())
    if r.returncode != 0 and os.geteuid() == 0 and spec.suite is None:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=_apt_env())
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_apt_env())
    debs = sorted(work.glob(f"{pkg}_*.deb"))
    if r.returncode != 0 or not debs:
        raise GuestError(f"could not download the guest kernel with `apt-get download {pkg}`"
                         f"{' from ' + spec.suite if spec.suite else ''} "
                         f"(exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return debs[0]


def _load_kernel_info(kdir: Path) -> KernelInfo:
    pkg = (kdir / "package").read_text().strip()
    release = (kdir / "release").read_text().strip()
    mods = tuple(l for l in (kdir / "modules.list").read_text().split() if l)
    vmlinux = kdir / "vmlinux"
    bz = kdir / "vmlinuz"
    return KernelInfo(package=pkg, release=release,
                      image=vmlinux if vmlinux.exists() else bz,
                      bzimage=bz, modules_dir=kdir / "modules", modules=mods)


def prepare_kernel(cache: Path | None = None, kernel: str | None = None) -> KernelInfo:
    """Download and unpack the guest kernel ``kernel`` (see :func:`guest_kernel`) into the
    cache (once; safe to call concurrently)."""
    cache = cache or cache_dir()
    spec = guest_kernel(kernel)
    pkg = _kernel_package(spec, cache)
    modkey = hashlib.sha256("\n".join(spec.modules).encode()).hexdigest()[:8]
    kdir = cache / f"kernel-{pkg}-{modkey}"
    if (kdir / "modules.list").exists():
        return _load_kernel_info(kdir)
    with _locked(cache):
        if (kdir / "modules.list").exists():
            return _load_kernel_info(kdir)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=".kernel-work-"))
        try:
            try:
                deb = _download_kernel(pkg, work, spec, cache)
            except GuestError:
                # Offline, or the archive moved on: fall back to a kernel of the same
                # series cached earlier.
                older = sorted((p for p in cache.glob(f"kernel-linux-image-{spec.name}.*-{modkey}")
                                if (p / "modules.list").exists()), key=lambda p: p.stat().st_mtime)
                if not older:
                    raise
                info = _load_kernel_info(older[-1])
                print(f"guestvm: cannot download {pkg}; using the cached {info.package}", file=sys.stderr)
                return info
            root = work / "root"
            _run_checked(["dpkg", "-x", str(deb), str(root)], f"unpacking {deb.name}")
            # Debian 13 ships modules under usr/lib (merged /usr), Debian 12 under lib.
            moddir = next((d for d in (root / "lib/modules", root / "usr/lib/modules") if d.is_dir()), None)
            releases = sorted(p.name for p in moddir.iterdir()) if moddir else []
            if not releases:
                raise GuestError(f"{deb.name} holds no lib/modules/<release>")
            release = releases[0]
            mroot = moddir / release
            out = work / "out"
            (out / "modules").mkdir(parents=True)
            bz = root / "boot" / f"vmlinuz-{release}"
            if not bz.exists():
                raise GuestError(f"{deb.name} holds no boot/vmlinuz-{release}")
            shutil.copyfile(bz, out / "vmlinuz")
            vmlinux = _extract_vmlinux(bz.read_bytes())
            if vmlinux is not None:
                (out / "vmlinux").write_bytes(vmlinux)
            builtin = set()
            if (mroot / "modules.builtin").exists():
                builtin = {l.strip()[len("kernel/"):].rsplit(".ko", 1)[0]
                           for l in (mroot / "modules.builtin").read_text().splitlines()}
            wanted = []
            for m in spec.modules:
                src = mroot / "kernel" / (m + ".ko")
                dst = out / "modules" / (m.replace("/", "__") + ".ko")
                if src.exists():
                    shutil.copyfile(src, dst)
                elif src.with_suffix(".ko.xz").exists():
                    dst.write_bytes(lzma.decompress(src.with_suffix(".ko.xz").read_bytes()))
                elif src.with_suffix(".ko.zst").exists():
                    _run_checked(["zstd", "-dq", str(src.with_suffix(".ko.zst")), "-o", str(dst)],
                                 f"decompressing {m}.ko.zst")
                elif m in builtin:
                    continue
                else:
                    raise GuestError(f"kernel module {m} is neither in {deb.name} nor built in")
                wanted.append(m.replace("/", "__"))
            (out / "package").write_text(pkg + "\n")
            (out / "release").write_text(release + "\n")
            (out / "modules.list").write_text("\n".join(wanted) + "\n")
            if kdir.exists():  # leftover of an interrupted run without modules.list
                shutil.rmtree(kdir)
            os.rename(out, kdir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _load_kernel_info(kdir)


# --------------------------------------------------------------------------
# Initramfs (newc cpio, written here)
# --------------------------------------------------------------------------

class _Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.ino += 1
        b = self.buf
        b.write(hdr.encode() + nameb)
        b.write(b"\0" * (-b.tell() % 4))
        b.write(data)
        b.write(b"\0" * (-b.tell() % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.dirs:
                self.dirs.add(p)
                self._entry(p, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


# The generic /init of the base initramfs.  Everything that depends on the run
# (which shares, where, what to execute) is in /pyvfs/setup.sh, generated per
# run and shipped in the appended second archive.
_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
OUT=/dev/ttyS1
stty -F $OUT raw -echo 2>/dev/null
for m in $(cat /pyvfs/modules.list); do
  insmod /pyvfs/modules/$m.ko 2>>/pyvfs/insmod.log
done
say() { echo "pyvfs: $*" >/dev/console; }
fail() {
  # No exit-status marker: the host raises GuestError with this message.
  echo "PYVFS-SETUP-FAILED: $*" >/dev/console
  echo "PYVFS-SETUP-FAILED: $*" >$OUT
  [ -s /pyvfs/insmod.log ] && sed 's/^/pyvfs: insmod: /' /pyvfs/insmod.log >/dev/console
  sync
  poweroff -f
  sleep 60
}
if [ ! -f /pyvfs/setup.sh ]; then
  fail "no /pyvfs/setup.sh in the initramfs (the per-run archive was not appended)"
fi
. /pyvfs/setup.sh
fail "setup.sh returned"
"""


def base_initramfs(kernel: KernelInfo, cache: Path | None = None) -> Path:
    """The cached base initramfs (busybox, modules, /init) for ``kernel``."""
    cache = cache or cache_dir()
    st = os.stat(BUSYBOX)
    key = hashlib.sha256(repr((
        _INITRAMFS_FORMAT, _INIT, kernel.package, kernel.release, kernel.modules,
        st.st_size, st.st_mtime_ns, st.st_ino)).encode()).hexdigest()[:16]
    path = cache / f"initramfs-{key}.cpio"
    if path.exists():
        return path
    with _locked(cache):
        if path.exists():
            return path
        c = _Cpio()
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "mnt", "newroot", "pyvfs/modules"):
            c.dir(d)
        c.chardev("dev/console", 5, 1)
        c.chardev("dev/null", 1, 3, 0o666)
        c.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        c.file("init", _INIT.encode(), 0o755)
        c.file("pyvfs/modules.list", ("\n".join(kernel.modules) + "\n").encode())
        for m in kernel.modules:
            c.file(f"pyvfs/modules/{m}.ko", (kernel.modules_dir / f"{m}.ko").read_bytes())
        # Uncompressed: QEMU loads it instantly and the guest skips inflating
        # it under TCG.  Appended archives must start 4-byte aligned (they do).
        _atomic_write(path, c.finish())
    return path


# --------------------------------------------------------------------------
# Shares and the per-run setup script
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Share:
    """A file system the guest mounts before running the script.

    Exactly one of ``socket`` (a vhost-user-fs daemon's socket: the guest
    mounts it with ``-t virtiofs``) and ``ninep_dir`` (a host directory QEMU
    exports itself over virtio-9p) must be set.  ``mountpoint`` defaults to
    ``/mnt/<tag>``; ``mount_opts`` is a comma-separated option list added to
    the mount command.
    """

    tag: str
    socket: str | None = None
    ninep_dir: str | None = None
    mountpoint: str = ""
    mount_opts: str = ""

    def __post_init__(self) -> None:
        if not _TAG_RE.match(self.tag):
            raise ValueError(f"bad share tag {self.tag!r}: 1-36 characters of [A-Za-z0-9_.-]")
        if self.tag == HOSTROOT_TAG:
            raise ValueError(f"tag {HOSTROOT_TAG!r} is reserved for the guest root")
        if (self.socket is None) == (self.ninep_dir is None):
            raise ValueError("a Share needs exactly one of socket= and ninep_dir=")
        if not self.mountpoint:
            self.mountpoint = f"/mnt/{self.tag}"
        if not self.mountpoint.startswith("/"):
            raise ValueError(f"mountpoint must be absolute: {self.mountpoint!r}")

    @property
    def fstype(self) -> str:
        return "virtiofs" if self.socket is not None else "9p"


_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def guest_python() -> str:
    """A Python interpreter a host-root guest can run.  The guest sees the host's / except
    /tmp, /run, /var/tmp and /mnt (tmpfs there), so a virtualenv in a checkout under /tmp
    is invisible; the system interpreter, or the real file behind ours, is not."""
    for cand in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        hidden = any(cand == d or cand.startswith(d + "/")
                     for d in ("/tmp", "/run", "/var/tmp", "/mnt"))
        if os.access(cand, os.X_OK) and not hidden:
            return cand
    raise GuestError("no Python interpreter outside /tmp, /run, /var/tmp and /mnt for the guest")


def embed_file(path: str, data: str, marker: str = "PYVFS_EOF") -> str:
    """Shell lines that recreate a text file inside the guest."""
    if marker in data:
        raise ValueError(f"{marker} occurs in the file")
    return f"cat > {shlex.quote(path)} <<'{marker}'\n{data}\n{marker}\n"


def _setup_script(shares: Sequence[Share], hostroot: bool, marker: str) -> str:
    """The per-run part of /init: mount everything, run the script, report its status."""
    q = shlex.quote
    R = "/newroot" if hostroot else ""
    lines = ["# generated by pyvirtiofs.testing.guestvm"]
    if hostroot:
        lines += [
            f"mount -t 9p -o {NINEP_DEFAULT_OPTS},ro,cache=loose {HOSTROOT_TAG} {R} 2>/tmp/err"
            " || fail \"9p mount of the host root failed: $(cat /tmp/err)\"",
            f"mount -t proc proc {R}/proc || fail 'mounting /proc in the host root failed'",
            f"mount -t sysfs sys {R}/sys || fail 'mounting /sys in the host root failed'",
            f"mount -t devtmpfs dev {R}/dev || fail 'mounting /dev in the host root failed'",
        ]
        for d in ("tmp", "run", "var/tmp", "mnt"):
            mode = "1777" if d in ("tmp", "var/tmp") else "755"
            lines.append(f"if [ -d {R}/{d} ]; then mount -t tmpfs -o mode={mode} tmpfs {R}/{d}"
                         f" || fail 'tmpfs on /{d} failed'; fi")
    for s in shares:
        mp = q(R + s.mountpoint)
        if s.fstype == "virtiofs":
            opts = s.mount_opts
        else:
            opts = NINEP_DEFAULT_OPTS + ("," + s.mount_opts if s.mount_opts else "")
        optarg = f"-o {q(opts)} " if opts else ""
        what = f"{s.fstype} mount of tag {s.tag} at {s.mountpoint}"
        in_mounts = " " + (R + s.mountpoint).replace(" ", "\\040") + " " + s.fstype + " "
        lines += [
            f"mkdir -p {mp} 2>/tmp/err || fail {q('cannot create mountpoint ' + s.mountpoint)}"
            "\": $(cat /tmp/err) (with hostroot, use a path under /mnt or /tmp)\"",
            f"mount -t {s.fstype} {optarg}{q(s.tag)} {mp} 2>/tmp/err"
            f" || fail {q(what + ' failed')}\": $(cat /tmp/err)\"",
            f"grep -qF -- {q(in_mounts)} /proc/mounts || fail {q(what + ' is not in /proc/mounts')}",
            f"say {q('mounted ' + s.tag + ' (' + s.fstype + ') at ' + s.mountpoint)}",
        ]
    cwd = shares[0].mountpoint if shares else "/"
    env = f"env -i PATH={_GUEST_PATH} HOME=/root LANG=C.UTF-8 TERM=dumb PYVIRTIOFS_GUEST=1"
    lines += [
        f"mkdir -p {R}/tmp && cp /pyvfs/cmd.sh {R}/tmp/.pyvfs-cmd.sh || fail 'cannot copy the script'",
        'say "READY uptime=$(cut -d" " -f1 /proc/uptime)"',
        f"chroot {R or '/'} {env} /bin/sh -c 'cd \"$1\" && exec /bin/sh /tmp/.pyvfs-cmd.sh' sh {q(cwd)}"
        " >$OUT 2>&1 </dev/null",
        "rc=$?",
        "sync",
    ]
    for s in reversed(shares):
        mp = q(R + s.mountpoint)
        lines.append(f"umount {mp} 2>/dev/null || umount -l {mp} 2>/dev/null")
    lines += [
        f"printf '{marker}=%d\\n' $rc >$OUT",
        'say "EXIT rc=$rc uptime=$(cut -d" " -f1 /proc/uptime)"',
        "poweroff -f",
        "sleep 60",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Running the guest
# --------------------------------------------------------------------------

@dataclasses.dataclass
class GuestResult:
    status: int | None   #: the script's exit status
    output: str          #: the script's stdout+stderr (second serial port)
    console: str         #: kernel console (first serial port)
    wall: float          #: seconds from QEMU start to its exit
    ready: float | None = None   #: guest uptime (s) when the script started
    qemu_log: str = ""   #: QEMU's own stdout+stderr

    def check(self) -> "GuestResult":
        """Raise :class:`GuestError` unless the script exited 0."""
        if self.status != 0:
            raise GuestError(f"guest script exited with status {self.status}\n"
                             f"--- output ---\n{_tail(self.output, 80)}")
        return self


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _qarg(value: str) -> str:
    """Escape a value inside a QEMU option list (commas are doubled)."""
    return value.replace(",", ",,")


def _wait_for_sockets(shares: Sequence[Share], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for s in shares:
        if s.socket is None:
            continue
        while True:
            try:
                if stat.S_ISSOCK(os.stat(s.socket).st_mode):
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise GuestError(f"no vhost-user socket at {s.socket} (is the daemon running?)")
            time.sleep(0.05)


def write_initrd(path: Path, base: Path, script: str, shares: Sequence[Share] = (),
                 hostroot: bool = False) -> str:
    """Write the initrd of one run to ``path``: the cached ``base`` archive plus the run's
    own (setup.sh mounting ``shares``, the script).  Returns the exit-status marker the guest
    prints on the second serial port (see :func:`split_exit_status`).  Used by
    :func:`run_guest`, and by tests whose guest another program (libvirt) starts."""
    marker = "PYVFS-EXIT-" + secrets.token_hex(8)
    frag = _Cpio()
    frag.dir("pyvfs")
    frag.file("pyvfs/setup.sh", _setup_script(shares, hostroot, marker).encode(), 0o755)
    frag.file("pyvfs/cmd.sh", script.encode() + (b"" if script.endswith("\n") else b"\n"), 0o755)
    with open(path, "wb") as f, open(base, "rb") as b:
        shutil.copyfileobj(b, f)
        f.write(frag.finish())
    return marker


def split_exit_status(raw_out: str, marker: str) -> tuple[int | None, str]:
    """The script's exit status (None if the guest never reported it) and its output."""
    idx = raw_out.rfind(marker + "=")
    if idx >= 0:
        m = re.match(r"=(\d+)", raw_out[idx + len(marker):])
        if m:
            return int(m.group(1)), raw_out[:idx]
    return None, raw_out


def run_guest(
    script: str,
    shares: Sequence[Share] = (),
    *,
    hostroot: bool = False,
    kernel: str | None = None,
    mem: str = "1G",
    smp: int = 1,
    timeout: float = 600,
    accel: str | None = None,
    num_request_queues: int | None = None,
    queue_size: int = 1024,
    extra_qemu_args: Iterable[str] = (),
    extra_append: str = "",
    keep_dir: str | None = None,
    daemons: Sequence["DaemonProcess | subprocess.Popen"] = (),
    daemon_grace: float = 5.0,
) -> GuestResult:
    """Boot a guest, mount ``shares``, run ``script`` with ``sh`` and power off.

    The script's working directory is the first share's mountpoint (``/``
    without shares).  With ``hostroot`` the guest root is the host's ``/``,
    read-only, so host programs are available.  Returns a
    :class:`GuestResult`; raises :class:`GuestError` when the guest never
    reported the script's exit status (boot failure, a mount failed,
    timeout).  ``kernel``: which guest kernel (:data:`KERNELS`; default
    ``$PYVIRTIOFS_GUEST_KERNEL`` or 6.1).  ``keep_dir``: write the run files (initrd, logs) there instead
    of a temporary directory that is removed afterwards.

    ``daemons``: the daemon processes behind the shares (:class:`DaemonProcess`
    or :class:`subprocess.Popen`).  A guest whose daemon died hangs on its next
    FUSE request, so if one of them exits while QEMU still runs, QEMU is
    given ``daemon_grace`` seconds to finish and is then killed, and
    :class:`GuestError` names the daemon instead of waiting for ``timeout``.
    """
    shares = list(shares)
    tags = [s.tag for s in shares]
    if len(set(tags)) != len(tags):
        raise ValueError(f"duplicate share tags: {tags}")
    accel = accel or os.environ.get("PYVIRTIOFS_ACCEL", "tcg")
    ensure_host_tools()
    cache = cache_dir()
    kernel_info = prepare_kernel(cache, kernel)
    base = base_initramfs(kernel_info, cache)
    for s in shares:
        if s.ninep_dir is not None and not os.path.isdir(s.ninep_dir):
            raise GuestError(f"9p share {s.tag!r}: {s.ninep_dir} is not a directory")
    _wait_for_sockets(shares)

    work_ctx = (contextlib.nullcontext(keep_dir) if keep_dir
                else tempfile.TemporaryDirectory(prefix="pyvfs-guest-"))
    with work_ctx as wd:
        work = Path(wd)
        work.mkdir(parents=True, exist_ok=True)
        initrd = work / "initrd.img"
        marker = write_initrd(initrd, base, script, shares, hostroot)
        console_log, out_log, qemu_log = work / "console.log", work / "out.log", work / "qemu.log"

        if accel == "kvm":
            acc = ["-accel", "kvm", "-cpu", "host"]
        elif accel == "tcg":
            acc = ["-accel", "tcg"]
        else:
            acc = ["-accel", accel]
        cmd = [
            QEMU_BINARY, *acc, "-m", mem, "-smp", str(smp),
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
            "-chardev", f"file,id=con0,path={_qarg(str(console_log))}", "-serial", "chardev:con0",
            "-chardev", f"file,id=out0,path={_qarg(str(out_log))}", "-serial", "chardev:out0",
            "-kernel", os.environ.get("PYVIRTIOFS_KERNEL") or str(kernel_info.image),
            "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {extra_append}".strip(),
        ]
        if hostroot:
            cmd += ["-fsdev", "local,id=fsdroot,path=/,security_model=none,readonly=on,multidevs=remap",
                    "-device", f"virtio-9p-pci,fsdev=fsdroot,mount_tag={HOSTROOT_TAG}"]
        for i, s in enumerate(shares):
            if s.socket is not None:
                # queue-size=1024 lets Linux send 1 MiB requests (it caps a request at the
                # queue size minus 4 pages; QEMU's default of 128 gives 496 KiB).
                dev = f"vhost-user-fs-pci,chardev=vfs{i},tag={s.tag},queue-size={queue_size}"
                if num_request_queues is not None:
                    dev += f",num-request-queues={num_request_queues}"
                cmd += ["-chardev", f"socket,id=vfs{i},path={_qarg(s.socket)}", "-device", dev]
            else:
                cmd += ["-fsdev", f"local,id=fsd{i},path={_qarg(s.ninep_dir)},security_model=none,"
                                  f"multidevs=remap",
                        "-device", f"virtio-9p-pci,fsdev=fsd{i},mount_tag={s.tag}"]
        cmd += list(extra_qemu_args)

        timed_out = False
        dead_daemon: str | None = None
        t0 = time.monotonic()
        with open(qemu_log, "wb") as ql:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=ql, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                deadline = t0 + timeout
                died_at: float | None = None
                while proc.poll() is None:
                    now = time.monotonic()
                    if now >= deadline:
                        timed_out = True
                        break
                    if died_at is None:
                        for d in daemons:
                            rc = d.returncode if isinstance(d, DaemonProcess) else d.poll()
                            if rc is not None:
                                died_at = now
                                args = d.argv if isinstance(d, DaemonProcess) else d.args
                                dead_daemon = f"exit status {rc}: {shlex.join(map(str, args))}"
                                if isinstance(d, DaemonProcess):
                                    dead_daemon += f"\n--- daemon log (tail) ---\n{_tail(d.log, 30)}"
                                break
                    elif now - died_at > daemon_grace:
                        break
                    time.sleep(0.05)
            finally:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        wall = time.monotonic() - t0

        def read(p: Path) -> str:
            try:
                return p.read_bytes().decode("utf-8", "replace")
            except FileNotFoundError:
                return ""

        console, raw_out, qlog = read(console_log), read(out_log), read(qemu_log)

    status, output = split_exit_status(raw_out, marker)
    ready = None
    m = re.search(r"pyvfs: READY uptime=([\d.]+)", console)
    if m:
        ready = float(m.group(1))
    if status is None:
        if dead_daemon is not None:
            why = f"a daemon exited while the guest was running ({dead_daemon})"
        elif timed_out:
            why = f"the guest did not finish within {timeout:g} s (QEMU killed)"
        else:
            why = f"the guest did not report an exit status (QEMU exit code {proc.returncode})"
        setup = re.findall(r"PYVFS-SETUP-FAILED: (.*)", raw_out + console)
        if setup:
            why += f": {setup[-1]}"
        raise GuestError(
            f"{why}\n--- QEMU log ---\n{_tail(qlog, 30)}\n--- guest console (tail) ---\n"
            f"{_tail(console, 60)}\n--- script output (tail) ---\n{_tail(output, 30)}")
    return GuestResult(status=status, output=output, console=console, wall=wall,
                       ready=ready, qemu_log=qlog)


# --------------------------------------------------------------------------
# Daemon process helper
# --------------------------------------------------------------------------

# pyvirtiofsd's "[time ERROR thread] ..." and the Rust virtiofsd's "[time ERROR virtiofsd] ..."
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b")


class DaemonProcess:
    """Run a vhost-user-fs daemon for the length of a ``with`` block.

    ``argv`` is the full command line; ``socket_path`` is where it listens.
    Entering waits until the socket exists (and ``<socket>.pid`` if
    ``wait_pidfile``); it raises :class:`DaemonError` with the daemon's log if
    the daemon exits first or ``start_timeout`` passes.  Leaving the block
    terminates the daemon if it still runs (SIGTERM, then SIGKILL).  stdout and
    stderr go to ``log_path`` (default ``<socket>.log``).

    Every started daemon is remembered in :attr:`started`, so that a test harness can judge
    each one once it has stopped (:meth:`problems`).
    """

    started: "list[DaemonProcess]" = []  # class-wide, oldest first

    def __init__(self, argv: Sequence[str], socket_path: str | os.PathLike, *,
                 wait_pidfile: bool = False, log_path: str | os.PathLike | None = None,
                 start_timeout: float = 30.0, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.socket_path = str(socket_path)
        self.pidfile = self.socket_path + ".pid"
        self.wait_pidfile = wait_pidfile
        self.log_path = str(log_path) if log_path is not None else self.socket_path + ".log"
        self.start_timeout = start_timeout
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "DaemonProcess":
        if self.proc is not None:
            raise RuntimeError("DaemonProcess already started")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)  # stale socket of an earlier run
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self._close_log()
                raise DaemonError(f"daemon exited with status {self.proc.returncode} before listening "
                                  f"on {self.socket_path}: {shlex.join(self.argv)}\n"
                                  f"--- daemon log ---\n{_tail(self.log, 60)}")
            if self._ready():
                DaemonProcess.started.append(self)  # one that failed to start raised already
                return self
            if time.monotonic() > deadline:
                self.stop()
                want = self.socket_path + (" and " + self.pidfile if self.wait_pidfile else "")
                raise DaemonError(f"daemon did not create {want} within {self.start_timeout:g} s: "
                                  f"{shlex.join(self.argv)}\n--- daemon log ---\n{_tail(self.log, 60)}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            if not stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                return False
        except FileNotFoundError:
            return False
        return not self.wait_pidfile or os.path.exists(self.pidfile)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the daemon to exit by itself; returns its exit status.

        Raises :class:`subprocess.TimeoutExpired` if it is still running.
        """
        assert self.proc is not None, "daemon not started"
        rc = self.proc.wait(timeout=timeout)
        self._close_log()
        return rc

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the daemon if still running; returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "DaemonProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once the daemon has exited (negative: killed by that signal)."""
        return self.proc.poll() if self.proc else None

    def problems(self) -> list[str]:
        """What a user would call a failure of the daemon so far: a non-zero exit status
        (or death by a signal), a Python traceback or an ERROR line in its log."""
        found = []
        rc = self.returncode
        if rc not in (None, 0):
            found.append(f"exit status {rc}" if rc > 0 else f"killed by signal {-rc}")
        log = self.log
        if "Traceback (most recent call last)" in log:
            found.append("a Python traceback in its log")
        errors = [ln for ln in log.splitlines() if _ERROR_LINE.search(ln)]
        if errors:
            found.append(f"{len(errors)} ERROR line(s) in its log, the first: {errors[0]}")
        return found

    @property
    def log(self) -> str:
        """The daemon's stdout+stderr so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def _parse_share(spec: str, kind: str, index: int) -> Share:
    path, _, tag = spec.partition("=") if "=" in spec else (spec, "", "")
    tag = tag or f"fs{index}"
    if kind == "socket":
        return Share(tag=tag, socket=path)
    return Share(tag=tag, ninep_dir=path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pyvirtiofs.testing.guestvm",
        description="Boot a throw-away Linux guest under QEMU, mount virtiofs (vhost-user-fs) "
                    "and 9p shares at /mnt/<tag>, run a shell command (cwd: the first share) "
                    "and exit with its status (125: the guest failed).")
    p.add_argument("--socket", action="append", default=[], metavar="PATH[=TAG]",
                   help="vhost-user-fs socket of a running daemon (repeatable; tags default to fs0, fs1, ...)")
    p.add_argument("--9p", dest="ninep", action="append", default=[], metavar="DIR[=TAG]",
                   help="export a host directory over QEMU's virtio-9p (repeatable)")
    p.add_argument("--hostroot", action="store_true",
                   help="guest root = host / read-only over 9p (host programs usable)")
    p.add_argument("--kernel", choices=sorted(KERNELS), default=None,
                   help="guest kernel (default $PYVIRTIOFS_GUEST_KERNEL or 6.1)")
    p.add_argument("--mem", default="1G")
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--accel", default=None, help="tcg (default, or $PYVIRTIOFS_ACCEL) or kvm")
    p.add_argument("--num-request-queues", type=int, default=None)
    p.add_argument("--opts", default="", help="extra mount options for the virtiofs shares")
    p.add_argument("-v", "--verbose", action="store_true", help="print the guest console and timings")
    p.add_argument("command", help="shell command run in the guest with sh")
    a = p.parse_args(argv)
    shares = []
    for spec in a.socket:
        s = _parse_share(spec, "socket", len(shares))
        s.mount_opts = a.opts
        shares.append(s)
    for spec in a.ninep:
        shares.append(_parse_share(spec, "9p", len(shares)))
    try:
        r = run_guest(a.command, shares, hostroot=a.hostroot, kernel=a.kernel, mem=a.mem, smp=a.smp,
                      timeout=a.timeout, accel=a.accel, num_request_queues=a.num_request_queues)
    except (GuestError, ValueError) as e:
        print(f"guestvm: {e}", file=sys.stderr)
        return 125
    if a.verbose:
        sys.stderr.write(r.console)
        print(f"guestvm: wall {r.wall:.2f} s, script started at guest uptime {r.ready} s, "
              f"status {r.status}", file=sys.stderr)
    sys.stdout.write(r.output)
    sys.stdout.flush()
    return r.status if r.status is not None else 125


if __name__ == "__main__":
    sys.exit(main())

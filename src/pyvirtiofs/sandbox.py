"""Confining the daemon after it has opened what it needs (like virtiofsd's --sandbox).

* ``chroot``: chroot(2) into the shared directory.  The daemon reaches files only through the
  root fd and the /proc/self/fd directory fd it opened before, so nothing else is needed.
* ``namespace``: run as an ordinary user, first a new user namespace (the user's own uid and
  gid mapped to themselves, as rootless podman runs virtiofsd: files are created as that
  user, no capability is needed outside); then a new PID namespace (the daemon forks: a small supervisor keeps the pid file's
  pid and forwards signals, the child serving the guest sees no other process), then new mount,
  network, IPC and UTS namespaces and pivot_root(2) into the shared directory with the old
  root detached, so not even a bug of ours can name a host path outside the share; no network
  exists for the process.
* ``none``: nothing (tests, or when an outer sandbox does the job).

Capabilities are reduced to what a passthrough file server uses (``--modcaps`` adjusts).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource

from .linux import _CAP_VERSION_3, SYS_capget, SYS_capset, _CapData, _CapHeader, check, libc

log = logging.getLogger(__name__)


CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_pivot_root = 155

CAPS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4, "kill": 5,
    "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9, "net_bind_service": 10,
    "net_broadcast": 11, "net_admin": 12, "net_raw": 13, "ipc_lock": 14, "ipc_owner": 15,
    "sys_module": 16, "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20,
    "sys_admin": 21, "sys_boot": 22, "sys_nice": 23, "sys_resource": 24, "sys_time": 25,
    "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29, "audit_control": 30,
    "setfcap": 31, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
    "block_suspend": 36, "audit_read": 37, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
# What a passthrough server needs (the same set virtiofsd keeps by default).
DEFAULT_CAPS = {"chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod",
                "setfcap", "dac_read_search"}


class SandboxError(Exception):
    pass


def _mount(src, target, fstype, flags, what):
    check(libc.mount(src, target, fstype, ctypes.c_ulong(flags), None), what)


CLONE_NEWUSER = 0x10000000
_in_user_namespace = False


def enter_user_namespace(uid_map=(), gid_map=()) -> None:
    """A new user namespace in which the process holds the capabilities the namespace
    sandbox needs (mount, pivot_root, a PID namespace) over nothing but what its ids own.

    Without maps (an ordinary user): its uid and gid are mapped to themselves, so files keep
    being created as the user.  With ``uid_map``/``gid_map`` (:class:`NamespaceIdRange`
    lists, libvirt's ``--uid-map``/``--gid-map``) those ranges are mapped, by writing the maps
    as root or through newuidmap/newgidmap (package uidmap, /etc/subuid) as an ordinary user,
    and the process becomes the namespace's root when 0 is mapped: files are then created as
    the host id mapped to 0, and as the mapped ids of the guest's users.  Call while
    single-threaded."""
    global _in_user_namespace
    uid, gid = os.geteuid(), os.getegid()
    uid_lines = [(r.inside, r.outside, r.count) for r in uid_map] or [(uid, uid, 1)]
    gid_lines = [(r.inside, r.outside, r.count) for r in gid_map] or [(gid, gid, 1)]
    # Only a process outside the new namespace may map ids other than its own: a helper
    # forked before unshare does it (root writes the maps, others run newuidmap/newgidmap).
    helper = _IdMapHelper(uid_lines, gid_lines) if uid_map or gid_map else None
    try:
        check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    except BaseException:
        if helper is not None:
            helper.cancel()
        raise
    if helper is not None:
        helper.run()
    else:  # its own ids: the process may write that itself
        for name, text in (("setgroups", "deny"), ("uid_map", _map_text(uid_lines)),
                           ("gid_map", _map_text(gid_lines))):
            with open(f"/proc/self/{name}", "w") as f:  # setgroups first: gid_map needs it
                f.write(text)
    if any(inside == 0 for inside, _, _ in uid_lines) and \
            any(inside == 0 for inside, _, _ in gid_lines):
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    _in_user_namespace = True
    log.info("sandbox: user namespace, uid map %s, gid map %s", _map_text(uid_lines, ", "),
             _map_text(gid_lines, ", "))


def _map_text(lines, sep="\n") -> str:
    return sep.join(f"{a} {b} {c}" for a, b, c in lines)


class _IdMapHelper:
    """A child forked before unshare(CLONE_NEWUSER) that, once told, maps ids for its parent
    from outside the new namespace: as root by writing /proc/PID/uid_map and gid_map, as an
    ordinary user with newuidmap and newgidmap (which check /etc/subuid and /etc/subgid)."""

    def __init__(self, uid_lines, gid_lines):
        privileged = os.geteuid() == 0
        if not privileged:
            import shutil
            missing = [p for p in ("newuidmap", "newgidmap") if shutil.which(p) is None]
            if missing:
                raise SandboxError(f"--uid-map/--gid-map need {' and '.join(missing)} "
                                   "(package uidmap) when not run as root")
        # /proc/self as the host's procfs numbers it (this may be a PID namespace already)
        proc = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        host_pid = os.readlink("/proc/self")
        r, self._go = os.pipe()
        self._why, why_w = os.pipe()  # what newuidmap/newgidmap said, for the error
        self.pid = os.fork()
        if self.pid == 0:  # the helper
            code = 1
            try:
                os.close(self._go)
                os.close(self._why)
                if os.read(r, 1) == b"x":
                    if privileged:
                        for name, lines in (("uid_map", uid_lines), ("gid_map", gid_lines)):
                            fd = os.open(name, os.O_WRONLY, dir_fd=proc)
                            try:
                                os.write(fd, _map_text(lines).encode())
                            finally:
                                os.close(fd)
                        code = 0
                    else:
                        code = 0
                        for prog, lines in (("newuidmap", uid_lines),
                                            ("newgidmap", gid_lines)):
                            argv = [prog, host_pid] + [str(v) for ln in lines for v in ln]
                            child = os.posix_spawnp(
                                prog, argv, dict(os.environ),
                                file_actions=[(os.POSIX_SPAWN_DUP2, why_w, 2)])
                            _, st = os.waitpid(child, 0)
                            if os.waitstatus_to_exitcode(st) != 0:
                                code = 1
                                break
            finally:
                os._exit(code)
        os.close(r)
        os.close(why_w)
        os.close(proc)

    def run(self) -> None:
        os.write(self._go, b"x")
        os.close(self._go)
        _, st = os.waitpid(self.pid, 0)
        why = os.read(self._why, 4096).decode(errors="replace").strip().replace("\n", "; ")
        os.close(self._why)
        if os.waitstatus_to_exitcode(st) != 0:
            raise SandboxError("--uid-map/--gid-map refused" + (f" ({why})" if why else "")
                               + "; as an ordinary user the ranges must be in /etc/subuid and "
                               "/etc/subgid")

    def cancel(self) -> None:
        os.close(self._go)  # the helper reads EOF and exits
        os.close(self._why)
        os.waitpid(self.pid, 0)


def enter(mode: str, shared_dir: str) -> None:
    """Confine the calling process (call before any worker thread starts)."""
    if mode == "none":
        return
    if os.geteuid() != 0 and not (mode == "namespace" and _in_user_namespace):
        raise SandboxError(f"--sandbox={mode} needs root (use --sandbox=namespace or none)")
    shared = os.path.realpath(shared_dir).encode()
    if mode == "chroot":
        os.chroot(shared)
        os.chdir("/")
    elif mode == "namespace":
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        # Our mounts must not propagate back to the host.
        _mount(None, b"/", None, MS_REC | MS_PRIVATE, "make / private")
        _mount(shared, shared, None, MS_BIND | MS_REC, "bind the shared directory")
        os.chdir(shared)
        # pivot_root(".", "."): the old root ends up stacked on "/", then detached.
        check(libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
        check(libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.chdir("/")
    else:
        raise SandboxError(f"unknown sandbox mode {mode!r}")
    log.info("sandbox: %s into %s", mode, shared_dir)


CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1


def fork_into_pid_namespace() -> int:
    """unshare(CLONE_NEWPID) and fork: the child is PID 1 of a new PID namespace, where it
    sees no other process.  Returns the child's pid in the parent and 0 in the child, which
    dies with the parent.  Call before any thread starts."""
    check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, 15, 0, 0, 0)  # SIGTERM when the supervisor goes
    return pid


def parse_modcaps(spec: str | None) -> set[str]:
    """'+sys_admin:-mknod' (virtiofsd's form) or '+sys_admin,-mknod' adjusts the default
    set."""
    caps = set(DEFAULT_CAPS)
    for item in filter(None, (spec or "").replace(":", ",").split(",")):
        sign, name = item[0], item[1:].lower().removeprefix("cap_")
        if sign not in "+-" or name not in CAPS:
            raise SandboxError(f"bad --modcaps entry {item!r}")
        (caps.add if sign == "+" else caps.discard)(name)
    return caps


def drop_capabilities(keep: set[str]) -> None:
    """Keep only ``keep`` in the effective and permitted sets (process-wide: call before
    threads start, as capset only affects the calling thread)."""
    if os.geteuid() != 0 and not _in_user_namespace:
        return
    mask = 0
    for name in keep:
        mask |= 1 << CAPS[name]
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    check(libc.syscall(SYS_capset, ctypes.byref(hdr), data), "capset")
    log.info("capabilities kept: %s", ", ".join(sorted(keep)))


def effective_capabilities() -> int:
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc.syscall(SYS_capget, ctypes.byref(hdr), data), "capget")
    return data[0].effective | (data[1].effective << 32)


DEFAULT_NOFILE = 1_000_000  # virtiofsd's target when --rlimit-nofile is not given


def set_rlimit_nofile(n: int | None) -> None:
    """Raise (or set) the open-file limit: every looked-up inode holds an fd.  Without a
    value, as virtiofsd: min(1000000, /proc/sys/fs/nr_open) unless the soft limit is already
    that high, and the hard limit when the target cannot be set (an ordinary user)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n is None:
        if soft >= DEFAULT_NOFILE:
            return
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = min(DEFAULT_NOFILE, int(f.read()))
        except (OSError, ValueError):
            want = hard
    else:
        want = n
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError) as e:
        if n is not None:
            raise SandboxError(f"cannot set RLIMIT_NOFILE to {n}: {e}") from None
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e2:
            log.debug("RLIMIT_NOFILE stays %d: %s", soft, e2)


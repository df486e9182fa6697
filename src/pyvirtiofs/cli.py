"""pyvirtiofsd: the command line daemon, a drop-in for virtiofsd.

Accepts the reference daemon's common options (and the few virtme-ng and libvirt pass), listens
on the socket, serves one frontend connection and exits when it disconnects.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys

from . import __version__, compiled, options, sandbox, seccomp, serving, version_table
from .config import Config
from .device import VirtioFsDevice
from .fuse.server import TRACE
from .idmap import IdMap
from .xattrmap import XattrMap
from .passthrough import PassthroughFs
from .pathfs import PathAdapter
from .vhost_user.shmem import SharedMemory
from .virtqueue import ORDERING_IS_SAFE
from .vhost_user.backend import VhostUserSession

log = logging.getLogger("pyvirtiofsd")
SYSLOG_SOCKET = "/dev/log"



def _setup_logging(level: str, use_syslog: bool) -> None:
    if level == "off":
        logging.disable(logging.CRITICAL)
        return
    logging.addLevelName(TRACE, "TRACE")
    lvl = {"warn": logging.WARNING, "trace": TRACE}.get(level) or level.upper()
    handler: logging.Handler | None = None
    syslog_error = None
    if use_syslog:
        try:
            handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
            handler.setFormatter(logging.Formatter("pyvirtiofsd[%(process)d]: %(message)s"))
            if handler.socket is None or handler.socket.fileno() < 0:
                # Python >= 3.11 swallows the failed connect here and then prints a
                # traceback for every message: treat it as the failure it is.
                handler.close()
                handler = None
                err = errno.ENOENT if not os.path.exists(SYSLOG_SOCKET) else errno.ECONNREFUSED
                raise OSError(err, os.strerror(err))
        except OSError as e:  # no syslog daemon (a container): keep the messages
            syslog_error = e
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s %(levelname)s %(threadName)s] %(message)s"))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
    if syslog_error is not None:
        log.warning("--syslog: cannot reach %s (%s); logging to stderr", SYSLOG_SOCKET,
                    syslog_error.strerror or syslog_error)


def _listen(path: str, group: str | None) -> socket.socket:
    """Bind the vhost-user socket at ``path`` (:func:`serving.listen`: only a stale socket
    is replaced; any other file there is left alone and refused)."""
    try:
        return serving.listen(path, group=_group_id(group) if group else None)
    except FileExistsError:
        raise StartupError(f"--socket-path {path}: exists and is not a socket; not "
                           "replacing it") from None
    except serving.SocketInUse:
        raise StartupError(f"--socket-path {path}: another process is listening on it") \
            from None


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise StartupError(f"--socket-group {group}: no such group") from None


def _inherited_listener(fd: int) -> socket.socket:
    """The socket passed with --fd: it must be an open, listening Unix stream socket."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise StartupError(f"--fd {fd}: not an open file descriptor ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"--fd {fd}: not a socket")
    s = socket.socket(fileno=fd)
    if (s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM
            or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
        s.detach()
        raise StartupError(f"--fd {fd}: not a listening Unix stream socket")
    return s


def _check_shared_dir(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise StartupError(f"--shared-dir {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"--shared-dir {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK, effective_ids=True):
        # An O_PATH open would still succeed, and every guest request would then fail.
        raise StartupError(f"--shared-dir {path}: Permission denied (cannot read and "
                           "search it)")


class StartupError(Exception):
    """The environment does not allow what the command line asks (exit status 1)."""


def _refused(config: Config) -> list[str]:
    """Options that are set but not implemented (yet): refused rather than ignored."""
    out = [opt for name, opt in options.NOT_IMPLEMENTED.items() if getattr(config, name)]
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        config = options.parse(argv)
    except options.UsageError as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        return 2
    if config.version:
        print(f"pyvirtiofsd {__version__}\nrequest path: {compiled.STATE}")
        return 0
    if config.print_capabilities:
        print(options.capabilities_json())
        return 0
    refused = _refused(config)
    if refused:
        print(f"pyvirtiofsd: {refused[0]}: not implemented yet", file=sys.stderr)
        return 2
    try:
        return _run(config)
    except StartupError as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        return 1


def _passthrough_fs(config: Config) -> tuple[PassthroughFs, version_table.VersionTable | None]:
    """The host directory --shared-dir names, and the --version-table if one is asked for."""
    _check_shared_dir(config.shared_dir)
    table = None
    if config.version_table:
        try:
            table = version_table.VersionTable(config.version_table, config.version_table_slots)
        except version_table.VersionTableError as e:
            raise StartupError(f"--version-table: {e}") from None
    try:
        fs = PassthroughFs(config.shared_dir, cache=config.cache, readonly=config.readonly,
                           xattr=config.xattr, posix_locks=config.posix_lock,
                           flock=config.flock, inode_file_handles=config.inode_file_handles,
                           writeback=config.writeback, allow_direct_io=config.allow_direct_io,
                           preserve_noatime=config.preserve_noatime,
                           allow_mmap=config.allow_mmap, readdirplus=config.readdirplus,
                           killpriv_v2=config.killpriv_v2, timeout=config.timeout,
                                                      version_table=table,
                           uid_map=IdMap(config.translate_uid, "uid"),
                           gid_map=IdMap(config.translate_gid, "gid"),
                           xattrmap=XattrMap(config.xattrmap) if config.xattrmap else None,
                           posix_acl=config.posix_acl, security_label=config.security_label,
                           announce_submounts=config.announce_submounts)
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot share {config.shared_dir!r}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    return fs, table


def _source_fs(config: Config):
    """The fsspec store --source names, served at the path level (src/pyvirtiofs/fsspec_fs.py)."""
    from .fsspec_fs import FsspecFs
    opts = {}
    for key, value in config.source_options:
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    try:
        fs = FsspecFs.from_url(config.source, opts)
        fs.check()
    except ImportError as e:
        raise StartupError(str(e)) from None
    except Exception as e:  # the store's client refused the URL or its options
        raise StartupError(f"--source {config.source}: {e}") from None
    return PathAdapter(fs)


def _run(config: Config) -> int:
    _setup_logging(config.log_level, config.syslog)
    if not ORDERING_IS_SAFE:
        log.error("this CPU's memory model needs fences Python cannot issue; refusing to run")
        return 1
    try:
        keep_caps = sandbox.parse_modcaps(config.modcaps)
        if config.rlimit_nofile != 0:  # 0: leave the limit as it is (virtiofsd)
            sandbox.set_rlimit_nofile(config.rlimit_nofile)
    except sandbox.SandboxError as e:
        raise StartupError(str(e)) from None
    table = None
    if config.source is not None:
        fs = _source_fs(config)
    else:
        fs, table = _passthrough_fs(config)

    def on_signal(signum, frame):
        # Stop once.  A second SIGTERM/SIGINT must neither interrupt the clean-up below nor
        # arrive during interpreter exit, when Python restores the default (fatal) action
        # of signals it handled; ignored signals stay ignored.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    # A supervisor may signal us as soon as the socket or the pid file exists: hold the
    # stop signals back from before they exist until we are inside the try block that
    # removes them again (else SIGTERM kills us with both left behind, SIGINT tracebacks).
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cleanup: list[tuple[int, str]] = []  # (dir fd, name): unlinkable after a chroot too
    if config.fd is not None:
        listener = _inherited_listener(config.fd)
    else:
        path = config.socket_path
        try:
            dfd = os.open(os.path.dirname(os.path.abspath(path)),
                          os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            listener = _listen(path, config.socket_group)
        except OSError as e:
            raise StartupError(f"--socket-path {path}: {e.strerror}") from None
        pid_path = path + ".pid"
        cleanup = [(dfd, os.path.basename(path))]
        try:
            # Written whole under a temporary name, then renamed: whoever waits for the pid
            # file (virtme-ng, libvirt, tests) never reads it empty.
            tmp_path = f"{pid_path}.{os.getpid()}.tmp"
            with open(tmp_path, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.rename(tmp_path, pid_path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            _remove(cleanup)
            raise StartupError(f"cannot write the pid file {pid_path}: {e.strerror}") from None
        cleanup.append((dfd, os.path.basename(pid_path)))
    try:
        if config.sandbox == "namespace":
            rootless = os.geteuid() != 0
            if rootless:  # the other namespaces need a user namespace first
                sandbox.enter_user_namespace(config.uid_map, config.gid_map)
            child = sandbox.fork_into_pid_namespace()
            if child:
                listener.close()
                return _supervise(child, cleanup)
            if not rootless and (config.uid_map or config.gid_map):
                # libvirt's maps, as root: the supervisor stays root outside (it removes the
                # socket and pid file), the server becomes the root of the namespace
                sandbox.enter_user_namespace(config.uid_map, config.gid_map)
            fs.privileged = os.geteuid() == 0  # may create files as the guest's users
            fs.reopen_proc_fd()
        sandbox.enter(config.sandbox, config.shared_dir)
        sandbox.drop_capabilities(keep_caps)
        seccomp.install(config.seccomp)
    except (sandbox.SandboxError, OSError) as e:
        print(f"pyvirtiofsd: cannot enter the sandbox: {e}", file=sys.stderr)
        _remove(cleanup)
        return 1

    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # pending ones land here
        log.info("pyvirtiofsd %s, request path %s", __version__, compiled.STATE)
        log.info("waiting for a vhost-user frontend on %s", config.socket_path or f"fd {config.fd}")
        conn, _ = listener.accept()
        listener.close()
        _remove(cleanup[:1])
        log.info("frontend connected")
        shmem_sizes = [0, 0]  # VIRTIO shared memory regions: 0 the DAX window, 1 the table
        shmem_sizes[0] = config.dax_window
        if table is not None:
            shmem_sizes[version_table.SHMID] = table.size
        shmem = SharedMemory(shmem_sizes) if any(shmem_sizes) else None
        backend = VhostUserSession(VirtioFsDevice(fs, thread_pool_size=config.thread_pool_size,
                                                  shmem=shmem, dax_policy=config.dax or "always",
                                                  tag=config.tag))
        backend.serve(conn)
    except SystemExit:
        log.info("stopping on signal")
    finally:
        _remove(cleanup)
    return 0


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _supervise(child: int, cleanup: list[tuple[int, str]]) -> int:
    """The parent outside the PID namespace: forward stop signals to the daemon, wait for
    it, clean up, and exit as it did (the pid file names this process)."""
    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _, status = os.waitpid(child, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _remove(cleanup)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _remove(entries: list[tuple[int, str]]) -> None:
    for dfd, name in entries:
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except PermissionError:
            # the server under --uid-map is no longer the user who made it: the
            # supervisor, which is, removes it when the server ends
            log.debug("%s stays until the supervisor removes it", name)


if __name__ == "__main__":
    sys.exit(main())

"""pyvirtiofsd: the command line daemon, a drop-in for virtiofsd.

Accepts the reference daemon's common options (and the few virtme-ng and libvirt pass), listens
on the socket, serves one frontend connection and exits when it disconnects.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import socket
import sys

from . import __version__, sandbox, seccomp
from .device import VirtioFsDevice
from .passthrough import PassthroughFs
from .virtqueue import ORDERING_IS_SAFE
from .vhost_user.backend import VhostUserBackend

log = logging.getLogger("pyvirtiofsd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvirtiofsd",
        description="virtiofs daemon (vhost-user-fs backend) serving a host directory")
    p.add_argument("--socket-path", help="vhost-user Unix socket to listen on")
    p.add_argument("--fd", type=int, help="listen on this already bound socket fd instead")
    p.add_argument("--shared-dir", "-o", dest="shared_dir", help="directory to share")
    p.add_argument("--cache", choices=["never", "auto", "always", "metadata"], default="auto",
                   help="guest caching of entries, attributes and data (default auto)")
    p.add_argument("--readonly", action="store_true", help="refuse every write with EROFS")
    p.add_argument("--xattr", action=argparse.BooleanOptionalAction, default=True,
                   help="serve extended attributes (default on)")
    p.add_argument("--inode-file-handles", choices=["never", "prefer", "mandatory"],
                   default="never",
                   help="hold inodes as file handles instead of open fds (needs "
                        "CAP_DAC_READ_SEARCH); prefer falls back to fds where handles fail")
    p.add_argument("--posix-lock", action=argparse.BooleanOptionalAction, default=True,
                   help="forward POSIX record locks to the host as OFD locks (default on)")
    p.add_argument("--flock", action=argparse.BooleanOptionalAction, default=True,
                   help="forward flock() locks to the host (default on)")
    p.add_argument("--log-level", default="info",
                   choices=["error", "warn", "warning", "info", "debug", "off"])
    p.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")
    p.add_argument("--thread-pool-size", type=int, default=0,
                   help="threads that take requests off a queue when several wait (default 0: "
                        "each queue's own thread serves them in turn)")
    p.add_argument("--sandbox", choices=["namespace", "chroot", "none"], default=None,
                   help="confine the daemon to the shared directory: new namespaces + "
                        "pivot_root, chroot, or nothing (default namespace as root, else none)")
    p.add_argument("--seccomp", choices=["kill", "log", "trap", "none"], default="none",
                   help="system call allow-list; what to do with other calls (default none)")
    p.add_argument("--modcaps", help="adjust the kept capabilities, e.g. '-mknod,+sys_admin'")
    p.add_argument("--rlimit-nofile", type=int, help="open-file limit (default: the hard limit)")
    p.add_argument("--announce-submounts", action="store_true", help="accepted, ignored")
    p.add_argument("--no-announce-submounts", action="store_true", help="accepted, ignored")
    p.add_argument("--tag", help="not offered: QEMU 7.1-8.0 crash on the CONFIG feature")
    p.add_argument("--version", "-V", action="store_true", help="print the version and exit")
    return p


def _setup_logging(level: str, use_syslog: bool) -> None:
    if level == "off":
        logging.disable(logging.CRITICAL)
        return
    lvl = {"warn": "WARNING"}.get(level, level.upper())
    if use_syslog:
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pyvirtiofsd[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s %(levelname)s %(threadName)s] %(message)s"))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)


def _listen(path: str) -> socket.socket:
    if os.path.exists(path):
        # A stale socket from an earlier run would make bind fail.
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(path)
            probe.close()
            raise SystemExit(f"pyvirtiofsd: {path} is in use by another process")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    return s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"pyvirtiofsd {__version__}")
        return 0
    if not args.shared_dir:
        print("pyvirtiofsd: --shared-dir is required", file=sys.stderr)
        return 2
    if args.shared_dir.startswith("source="):  # C virtiofsd's -o source=DIR
        args.shared_dir = args.shared_dir[len("source="):]
    if not args.socket_path and args.fd is None:
        print("pyvirtiofsd: --socket-path or --fd is required", file=sys.stderr)
        return 2
    _setup_logging(args.log_level, args.syslog)
    if not ORDERING_IS_SAFE:
        log.error("this CPU's memory model needs fences Python cannot issue; refusing to run")
        return 1
    if args.sandbox is None:
        args.sandbox = "namespace" if os.geteuid() == 0 else "none"
    try:
        keep_caps = sandbox.parse_modcaps(args.modcaps)
        sandbox.set_rlimit_nofile(args.rlimit_nofile)
    except sandbox.SandboxError as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        return 2
    try:
        fs = PassthroughFs(args.shared_dir, cache=args.cache, readonly=args.readonly,
                           xattr=args.xattr, posix_locks=args.posix_lock, flock=args.flock,
                           inode_file_handles=args.inode_file_handles)
    except (OSError, ValueError) as e:
        print(f"pyvirtiofsd: cannot share {args.shared_dir!r}: {e}", file=sys.stderr)
        return 1

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
    if args.fd is not None:
        listener = socket.socket(fileno=args.fd)
    else:
        listener = _listen(args.socket_path)
        pid_path = args.socket_path + ".pid"
        with open(pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
        dfd = os.open(os.path.dirname(os.path.abspath(args.socket_path)),
                      os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        cleanup = [(dfd, os.path.basename(args.socket_path)), (dfd, os.path.basename(pid_path))]
    try:
        if args.sandbox == "namespace":
            child = sandbox.fork_into_pid_namespace()
            if child:
                listener.close()
                return _supervise(child, cleanup)
            fs.reopen_proc_fd()
        sandbox.enter(args.sandbox, args.shared_dir)
        sandbox.drop_capabilities(keep_caps)
        seccomp.install(args.seccomp)
    except (sandbox.SandboxError, OSError) as e:
        print(f"pyvirtiofsd: cannot enter the sandbox: {e}", file=sys.stderr)
        _remove(cleanup)
        return 1

    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # pending ones land here
        log.info("waiting for a vhost-user frontend on %s", args.socket_path or f"fd {args.fd}")
        conn, _ = listener.accept()
        listener.close()
        _remove(cleanup[:1])
        log.info("frontend connected")
        backend = VhostUserBackend(VirtioFsDevice(fs, thread_pool_size=args.thread_pool_size))
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


if __name__ == "__main__":
    sys.exit(main())

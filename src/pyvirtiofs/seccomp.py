"""A seccomp allow-list for the daemon (``--seccomp=kill|log|trap|none``).

A small classic-BPF program of our own: wrong architecture -> kill; a system call on the list
-> allow; anything else -> the chosen action.  The list is what the daemon was seen to use under
strace while a real guest exercised every FUSE operation, plus what CPython may need on other
paths (signals, sleeping, thread start).  Set-up calls (mount, pivot_root, unshare, execve,
bind, ...) are absent: the filter goes on after the sandbox is entered.  One exception, checked
on its argument: unshare(CLONE_FS), with which a serving thread gets a umask of its own.
"""

from __future__ import annotations

import ctypes
import logging
import struct

from .linux import check, libc

log = logging.getLogger(__name__)

AUDIT_ARCH_X86_64 = 0xC000003E
RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
ACTIONS = {"kill": RET_KILL_PROCESS, "trap": RET_TRAP, "log": RET_LOG}

# x86-64 system call numbers of the allowed calls.
ALLOWED = {
    "accept4": 288, "access": 21, "arch_prctl": 158, "brk": 12, "capget": 125, "capset": 126,
    "clock_gettime": 228, "clock_nanosleep": 230, "clone": 56, "clone3": 435, "close": 3,
    "connect": 42, "copy_file_range": 326, "dup": 32, "dup2": 33, "dup3": 292,
    "epoll_create1": 291, "epoll_ctl": 233, "epoll_pwait": 281, "epoll_wait": 232,
    "eventfd2": 290, "exit": 60, "exit_group": 231, "faccessat": 269, "faccessat2": 439,
    "fallocate": 285, "fchdir": 81, "fchmod": 91, "fchmodat": 268, "fchown": 93,
    "fchownat": 260, "fcntl": 72, "fdatasync": 75, "fgetxattr": 193, "flistxattr": 196,
    "flock": 73, "fremovexattr": 199, "fsetxattr": 190, "fstat": 5, "fstatfs": 138, "fsync": 74,
    "ftruncate": 77, "futex": 202, "get_robust_list": 274, "getcwd": 79, "getdents64": 217,
    "getegid": 108, "geteuid": 107, "getgid": 104, "getgroups": 115, "getpeername": 52,
    "getpid": 39, "getppid": 110, "getrandom": 318, "getresgid": 120, "getresuid": 118,
    "getrlimit": 97, "getsockname": 51, "getsockopt": 55, "gettid": 186, "gettimeofday": 96,
    "getuid": 102, "getxattr": 191, "ioctl": 16, "lgetxattr": 192, "link": 86, "linkat": 265,
    "listxattr": 194, "llistxattr": 195, "lremovexattr": 198, "lseek": 8, "lsetxattr": 189,
    "lstat": 6, "madvise": 28, "membarrier": 324, "mkdir": 83, "mkdirat": 258, "mknod": 133,
    "mknodat": 259, "mmap": 9, "mprotect": 10, "mremap": 25, "munmap": 11,
    "name_to_handle_at": 303, "nanosleep": 35, "newfstatat": 262, "open_by_handle_at": 304,
    "openat": 257, "openat2": 437, "pipe2": 293, "poll": 7, "ppoll": 271, "prctl": 157,
    "pread64": 17, "preadv": 295, "preadv2": 327, "prlimit64": 302, "pselect6": 270,
    "pwrite64": 18, "pwritev": 296, "pwritev2": 328, "read": 0, "readlink": 89,
    "readlinkat": 267, "readv": 19, "recvfrom": 45, "recvmsg": 47, "removexattr": 197,
    "rename": 82, "renameat": 264, "renameat2": 316, "restart_syscall": 219, "rmdir": 84,
    "rseq": 334, "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15,
    "sched_getaffinity": 204, "sched_yield": 24, "select": 23, "sendmsg": 46, "sendto": 44,
    "set_robust_list": 273, "set_tid_address": 218, "setfsgid": 123, "setfsuid": 122,
    "setgroups": 116, "setxattr": 188, "shutdown": 48, "sigaltstack": 131, "socket": 41,
    "stat": 4, "statfs": 137, "statx": 332, "symlink": 88, "symlinkat": 266,
    "sync_file_range": 277, "syncfs": 306, "sysinfo": 99, "tgkill": 234, "time": 201,
    "umask": 95, "uname": 63, "unlink": 87, "unlinkat": 263, "utimensat": 280, "wait4": 61,
    "write": 1, "writev": 20,
}

SYS_unshare = 272
CLONE_FS = 0x00000200  # unshare() allowed with exactly this flag (see linux.own_umask)
_ARG0_LOW = 16  # offsetof(struct seccomp_data, args[0]), its low 32 bits (little endian)

_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_INSN = struct.Struct("=HBBI")
PR_SET_NO_NEW_PRIVS = 38
SYS_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1


def build_program(action: int, allowed=ALLOWED.values()) -> bytes:
    nrs = sorted(set(allowed))
    if len(nrs) > 250:
        raise ValueError("too many system calls for 8-bit jump offsets")
    prog = [
        (_BPF_LD_W_ABS, 0, 0, 4),                   # seccomp_data.arch
        (_BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (_BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        (_BPF_LD_W_ABS, 0, 0, 0),                   # seccomp_data.nr
    ]
    n = len(nrs)
    for i, nr in enumerate(nrs):
        # on match jump over the remaining compares, the unshare check and the default
        # return to ALLOW
        prog.append((_BPF_JEQ_K, n - i + 3, 0, nr))
    prog += [
        (_BPF_JEQ_K, 0, 2, SYS_unshare),            # not unshare: the default action
        (_BPF_LD_W_ABS, 0, 0, _ARG0_LOW),
        (_BPF_JEQ_K, 1, 0, CLONE_FS),               # unshare(CLONE_FS) only
        (_BPF_RET_K, 0, 0, action),
        (_BPF_RET_K, 0, 0, RET_ALLOW),
    ]
    return b"".join(_INSN.pack(*insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(mode: str) -> None:
    """Install the filter on every thread of the process (TSYNC)."""
    if mode == "none":
        return
    action = ACTIONS[mode]
    code = build_program(action)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // _INSN.size, ctypes.cast(buf, ctypes.c_void_p))
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    check(libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                       ctypes.byref(prog)), "seccomp")
    log.info("seccomp filter installed (%d system calls allowed, others: %s)", len(ALLOWED), mode)

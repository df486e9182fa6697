"""The FUSE wire format (include/uapi/linux/fuse.h), little-endian as virtio-fs guests send it.

Only layouts and numbers live here; :mod:`pyvirtiofs.fuse.server` gives them meaning.
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
# What we reply; Linux 6.1 sends 7.38, Linux 6.12 sends 7.41.  Of what 7.39-7.41 added, we
# serve STATX (7.39), send max_stack_depth 0 and backing_id 0 (7.40: no FUSE_PASSTHROUGH, which
# needs host fds the guest cannot reach), and leave the new INIT flags off unless asked:
# DIRECT_IO_ALLOW_MMAP is --allow-mmap; HAS_RESEND needs a notification queue, which Linux's
# virtio-fs driver never sets up; NO_EXPORT_SUPPORT would only take NFS export away from the
# guest; ALLOW_IDMAP (as virtiofsd) lets the guest make idmapped mounts, for file systems
# whose capabilities say they use the caller's ids only when creating (Linux then sends
# uid/gid -1 on every other request).
KERNEL_MINOR_VERSION = 41
MIN_MINOR_VERSION = 27     # oldest guest protocol we serve (as virtiofsd)
ROOT_ID = 1


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# INIT flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
MAP_ALIGNMENT = 1 << 26
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36  # flags2 bit 4 (7.39): shared mmap of FOPEN_DIRECT_IO files
# pyvirtiofs's own extension (docs/version-table.md), far above the upstream bits: LOOKUP and
# GETATTR replies end with a VERSION_OUT naming the inode's version-table slot and version.
PYVFS_VERSION_TABLE = 1 << 63
HAS_INODE_DAX = 1 << 33
SECURITY_CTX = 1 << 32
# 7.38: requests that create something may carry the caller's supplementary group that owns
# the parent directory (an EXT_GROUPS extension), sent when that is not the caller's fsgid
CREATE_SUPP_GROUP = 1 << 34
ALLOW_IDMAP = 1 << 40          # 7.40: idmapped mounts of this file system in the guest

# fuse_attr.flags
ATTR_SUBMOUNT = 1 << 0
ATTR_DAX = 1 << 1
# fuse_setxattr_in.setxattr_flags (with SETXATTR_EXT)
SETXATTR_ACL_KILL_SGID = 1 << 0

# Request extensions (fuse_in_header.total_extlen, in units of 8 bytes, at the request's
# end).  Types 0..MAX_NR_SECCTX are a security context header whose type is its count.
EXT_HEADER = struct.Struct("<II")                # size (whole extension) type / nr_secctx
SECCTX = struct.Struct("<II")                    # size (of the value) padding; name\0 value
MAX_NR_SECCTX = 31
EXT_GROUPS = 32                                  # fuse_supp_groups: nr_groups, then the gids
SUPP_GROUPS = struct.Struct("<I")

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

OPEN_KILL_SUIDGID = 1 << 0
GETATTR_FH = 1
FSYNC_FDATASYNC = 1
WRITE_KILL_SUIDGID = 1 << 2
LK_FLOCK = 1
RELEASE_FLOCK_UNLOCK = 1 << 1

# Structures.  Sizes are asserted below against the header's.
IN_HEADER = struct.Struct("<IIQQIIIHH")          # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")               # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")        # fuse_attr
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")        # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")            # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")                 # major minor max_readahead flags (+flags2 at 16)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")      # ... max_pages map_alignment flags2 unused[7]
OPEN_IN = struct.Struct("<II")                   # flags open_flags
OPEN_OUT = struct.Struct("<QII")                 # fh open_flags padding
CREATE_IN = struct.Struct("<IIII")               # flags mode umask open_flags
MKNOD_IN = struct.Struct("<IIII")                # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")                  # mode umask
RENAME_IN = struct.Struct("<Q")                  # newdir
RENAME2_IN = struct.Struct("<QII")               # newdir flags padding
LINK_IN = struct.Struct("<Q")                    # oldnodeid
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size lock_owner a m c ns... mode u4 uid gid u5
GETATTR_IN = struct.Struct("<IIQ")               # getattr_flags dummy fh
READ_IN = struct.Struct("<QQIIQII")              # fh offset size read_flags lock_owner flags pad
WRITE_IN = READ_IN                               # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")              # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")                # fh unused padding lock_owner
FSYNC_IN = struct.Struct("<QII")                 # fh fsync_flags padding
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
KSTATFS = struct.Struct("<QQQQQIII28x")          # blocks bfree bavail files ffree bsize namelen frsize pad spare
SETXATTR_IN = struct.Struct("<II")               # size flags
SETXATTR_IN_EXT = struct.Struct("<IIII")         # size flags setxattr_flags padding
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
DIRENT_HEAD = struct.Struct("<QQII")             # ino off namelen type
FALLOCATE_IN = struct.Struct("<QQQII")           # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")                # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")   # fh_in off_in nodeid_out fh_out off_out len flags
FILE_LOCK = struct.Struct("<QQII")               # start end type pid
LK_IN = struct.Struct("<QQQQIIII")               # fh owner lk(start end type pid) lk_flags padding
LK_OUT = FILE_LOCK
VERSION_OUT = struct.Struct("<QQ")               # slot version (PYVFS_VERSION_TABLE)
SETUPMAPPING_IN = struct.Struct("<QQQQQ")       # fh foffset len flags moffset
REMOVEMAPPING_IN = struct.Struct("<I")           # count, then count of:
REMOVEMAPPING_ONE = struct.Struct("<QQ")         # moffset len
STATX_IN = struct.Struct("<IIQII")               # getattr_flags reserved fh sx_flags sx_mask
STATX_OUT_HEAD = struct.Struct("<QII16x")        # attr_valid attr_valid_nsec flags spare[2]
# fuse_statx: mask blksize attributes nlink uid gid mode spare ino size blocks attributes_mask,
# atime btime ctime mtime (sec, nsec, reserved), rdev_major rdev_minor dev_major dev_minor, spare
STATX = struct.Struct("<IIQIIIHxxQQQQ" + "qIxxxx" * 4 + "IIII112x")
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert ENTRY_OUT_HEAD.size + ATTR.size == 128 and ATTR_OUT_HEAD.size + ATTR.size == 104
assert INIT_OUT.size == 64 and SETATTR_IN.size == 88 and READ_IN.size == 40
assert STATX_IN.size == 24 and STATX_OUT_HEAD.size + STATX.size == 288
assert KSTATFS.size == 80 and LK_IN.size == 48 and COPY_FILE_RANGE_IN.size == 56

ENTRY_OUT_SIZE = 128
ATTR_OUT_SIZE = 104

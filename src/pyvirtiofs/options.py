"""The command line: virtiofsd 1.13's options (and the C virtiofsd's ``-o`` forms that libvirt
still passes) parsed into one :class:`~pyvirtiofs.config.Config`.

:func:`parse` raises :class:`UsageError` (exit status 2) with a one-line message naming the
option for anything the command line gets wrong: an unknown option, a value of the wrong type
or out of range, a malformed mapping, a contradiction.  Whether the environment allows what
was asked (the directory exists, the socket can be made) is decided later, by the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import Config, NamespaceIdRange, TranslateRule, XattrMapRule
from .dax import DAX_POLICIES
from .vhost_user.shmem import PAGE_SIZE

PROG = "pyvirtiofsd"

#: What ``--print-capabilities`` prints (libvirt's vhost-user.json "fs" backend).  No
#: "migrate-precopy": migration is not implemented.  No "separate-options": with it, libvirt
#: refuses <lock posix/flock> settings, which pyvirtiofsd does honour when given as ``-o``.
CAPABILITIES = {"type": "fs", "features": []}

#: Options the daemon parses but does not implement yet: Config field -> how it is spelled.
#: main() refuses any of them that is set, with a one-line error, rather than ignore it.
NOT_IMPLEMENTED: dict[str, str] = {}

LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def _non_negative(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """A size such as 4096, 512M or 1G (powers of 1024); a multiple of the page size."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = int(t[:len(t) - len(unit)], 10) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1G, 512M)") from None
    if value < 0 or value % PAGE_SIZE or value >= 1 << 48:
        raise argparse.ArgumentTypeError(f"{text!r}: a multiple of {PAGE_SIZE} below 256T")
    return value


def _grammar(parse, what: str):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    convert.__name__ = what  # argparse names the type in some messages
    return convert


def _table_slots(text: str) -> int:
    from .version_table import parse_slots
    return parse_slots(text)


def _tag(text: str) -> str:
    from .device import tag_bytes
    tag_bytes(text)
    return text


def _source_option(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: not KEY=VALUE")
    return key, value


# With --source the daemon serves a remote store: these options (and none of the host
# directory's) apply.  The sandbox is off: the namespace one would cut the network.
SOURCE_OPTIONS = {"source", "source_options", "socket_path", "socket_group", "fd", "tag",
                  "sandbox", "seccomp", "rlimit_nofile", "thread_pool_size", "log_level",
                  "syslog", "modcaps"}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False,
                usage=f"{PROG} --shared-dir DIR (--socket-path PATH | --fd N) [options]",
                description="virtiofs daemon (vhost-user-fs backend) serving a host directory; "
                            "a drop-in for virtiofsd 1.13")
    S = argparse.SUPPRESS  # set only when given: the Config's defaults stay the defaults
    where = p.add_argument_group("what to share and where")
    where.add_argument("--shared-dir", default=S, help="the directory the guest sees")
    where.add_argument("--source", default=S, metavar="URL",
                       help="instead of --shared-dir: an fsspec URL the guest sees "
                            "(s3://bucket/prefix, memory://, gs://...; needs "
                            "pyvirtiofs[fsspec], and [s3] for s3://)")
    where.add_argument("--source-option", dest="source_options", action="append",
                       type=_source_option, default=S, metavar="KEY=VALUE",
                       help="a storage option for --source (repeatable); VALUE is read as "
                            "JSON when it parses (true, 3, {...}), else as a string")
    where.add_argument("--socket-path", default=S, help="vhost-user Unix socket to create; a "
                       "stale socket there is replaced, anything else is refused")
    where.add_argument("--socket", dest="socket_path", default=S,
                       help="same as --socket-path (deprecated)")
    where.add_argument("--socket-group", default=S,
                       help="give the socket to this group and let the group connect")
    where.add_argument("--fd", type=_non_negative, default=S,
                       help="an inherited, already listening socket instead of --socket-path")
    where.add_argument("--tag", type=_grammar(_tag, "tag"), default=S,
                       help="tag the device advertises in its config space (offers the "
                            "vhost-user CONFIG feature, on which QEMU 7.1-8.0 crash)")
    where.add_argument("--readonly", action="store_true", default=S,
                       help="refuse every change with EROFS")
    cache = p.add_argument_group("caching and I/O")
    cache.add_argument("--cache", choices=["never", "auto", "always", "metadata"], default=S,
                       help="guest caching of entries, attributes and data (default auto)")
    cache.add_argument("--writeback", action="store_true", default=S,
                       help="let the guest cache writes and send them later (FUSE writeback "
                            "cache)")
    cache.add_argument("--allow-direct-io", action="store_true", default=S,
                       help="honour the guest's O_DIRECT on the host file (default: drop it)")
    cache.add_argument("--allow-mmap", action="store_true", default=S,
                       help="with --cache=never or metadata, let the guest mmap files shared")
    cache.add_argument("--killpriv-v2", dest="killpriv_v2", action="store_true", default=S,
                       help="the daemon clears suid/sgid/capabilities on writes, truncates "
                            "and chown by the guest (FUSE_HANDLE_KILLPRIV_V2)")
    cache.add_argument("--no-killpriv-v2", dest="killpriv_v2", action="store_false", default=S,
                       help="leave that to the guest kernel (the default)")
    cache.add_argument("--preserve-noatime", action="store_true", default=S,
                       help="keep the guest's O_NOATIME (default: drop it)")
    cache.add_argument("--no-readdirplus", dest="readdirplus", action="store_false", default=S,
                       help="do not offer READDIRPLUS")
    cache.add_argument("--announce-submounts", dest="announce_submounts", action="store_true",
                       default=S, help="mark host mount points so the guest mounts them "
                                       "separately, with their own st_dev (default)")
    cache.add_argument("--no-announce-submounts", dest="announce_submounts",
                       action="store_false", default=S, help="do not")
    share = p.add_argument_group("several daemons on one tree (docs/version-table.md)")
    share.add_argument("--version-table", metavar="PATH", default=S,
                       help="shared metadata version table, a file in /dev/shm created if "
                            "missing, that every daemon serving this tree opens")
    share.add_argument("--version-table-slots", metavar="N", default=S,
                       type=_grammar(_table_slots, "slot count"),
                       help="slots of a table this daemon creates, e.g. 64k or 1M (an "
                            "existing table keeps its own; default 64k)")
    xa = p.add_argument_group("extended attributes and identities")
    xa.add_argument("--xattr", dest="xattr", action="store_true", default=S,
                    help="serve extended attributes")
    xa.add_argument("--no-xattr", dest="xattr", action="store_false", default=S,
                    help="answer extended-attribute requests with ENOSYS (the default)")
    xa.add_argument("--posix-acl", action="store_true", default=S,
                    help="POSIX ACLs (implies --xattr)")
    xa.add_argument("--security-label", action="store_true", default=S,
                    help="security labels on creation (implies --xattr)")
    xa.add_argument("--xattrmap", type=_grammar(XattrMapRule.parse_all, "xattr map"), default=S,
                    help="rules translating xattr names, e.g. :map::user.virtiofs.: "
                         "(implies --xattr)")
    xa.add_argument("--translate-uid", action="append",
                    type=_grammar(TranslateRule.parse, "uid rule"), default=S,
                    metavar="TYPE:SOURCE:TARGET:COUNT",
                    help="translate uids between guest and host (guest, host, squash-guest, "
                         "squash-host, forbid-guest, map); repeatable")
    xa.add_argument("--translate-gid", action="append",
                    type=_grammar(TranslateRule.parse, "gid rule"), default=S,
                    metavar="TYPE:SOURCE:TARGET:COUNT", help="the same for gids")
    xa.add_argument("--uid-map", action="append",
                    type=_grammar(NamespaceIdRange.parse, "uid map"), default=S,
                    metavar=":NS_UID:HOST_UID:COUNT:",
                    help="uid range of the sandbox's user namespace; repeatable")
    xa.add_argument("--gid-map", action="append",
                    type=_grammar(NamespaceIdRange.parse, "gid map"), default=S,
                    metavar=":NS_GID:HOST_GID:COUNT:", help="the same for gids")
    locks = p.add_argument_group("locks (pyvirtiofsd only)")
    locks.add_argument("--posix-lock", action=argparse.BooleanOptionalAction, default=S,
                       help="forward POSIX record locks to the host as OFD locks (default on)")
    locks.add_argument("--flock", action=argparse.BooleanOptionalAction, default=S,
                       help="forward flock() locks to the host (default on)")
    conf = p.add_argument_group("confinement and resources")
    conf.add_argument("--sandbox", choices=["namespace", "chroot", "none"], default=S,
                      help="confine the daemon to the shared directory (default namespace)")
    conf.add_argument("--seccomp", choices=["none", "kill", "log", "trap"], default=S,
                      help="system-call allow-list and what to do with other calls "
                           "(default kill; none with --source)")
    conf.add_argument("--modcaps", default=S,
                      help="adjust the capabilities kept: +a:-b or +a,-b")
    conf.add_argument("--rlimit-nofile", type=_non_negative, default=S,
                      help="open-file limit (0 leaves it; default: min(1000000, "
                           "/proc/sys/fs/nr_open), or the hard limit when that fails)")
    conf.add_argument("--thread-pool-size", type=_non_negative, default=S,
                      help="threads that take requests off a busy queue (0: none, the "
                           "default)")
    conf.add_argument("--inode-file-handles", choices=["never", "prefer", "mandatory",
                                                       "fallback"], default=S,
                      help="hold inodes as file handles rather than O_PATH fds (fallback is "
                           "the old name of prefer)")
    dax = p.add_argument_group("DAX window (pyvirtiofsd only; see docs/dax.md)")
    dax.add_argument("--dax-window", type=_size, default=S, metavar="SIZE",
                     help="offer a DAX window of SIZE (e.g. 1G) as shared memory region 0; "
                          "needs a frontend with vhost-user SHMEM (default: no window)")
    dax.add_argument("--dax", choices=list(DAX_POLICIES), default=S,
                     help="which files carry FUSE_ATTR_DAX for guests mounted with dax=inode: "
                          "never, always (every regular file; the default) or inode "
                          "(regular files of 1 MiB or more)")
    mig = p.add_argument_group("migration (not implemented: only the defaults are accepted)")
    mig.add_argument("--migration-mode", choices=["find-paths", "file-handles"], default=S)
    mig.add_argument("--migration-on-error", choices=["abort", "guest-error"], default=S)
    mig.add_argument("--migration-verify-handles", action="store_true", default=S)
    mig.add_argument("--migration-confirm-paths", action="store_true", default=S)
    logs = p.add_argument_group("logging")
    logs.add_argument("--log-level", choices=LOG_LEVELS + ("warning",), default=S)
    logs.add_argument("-d", dest="log_level", action="store_const", const="debug", default=S,
                      help="same as --log-level=debug")
    logs.add_argument("--syslog", action="store_true", default=S, help="log to syslog")
    other = p.add_argument_group("compatibility and information")
    other.add_argument("-o", dest="compat", action="append", default=[],
                       metavar="OPT[,OPT...]",
                       help="the C virtiofsd's options: source=DIR, cache=none|auto|always, "
                            "[no_]xattr, [no_]flock, [no_]posix_lock, [no_]writeback, "
                            "[no_]readdirplus, [no_]allow_direct_io, [no_]killpriv_v2, "
                            "[no_]posix_acl, [no_]security_label, announce_submounts, "
                            "xattrmap=, modcaps=, log_level=|loglevel=, sandbox=, timeout=, "
                            "debug, norace")
    other.add_argument("-f", dest="foreground", action="store_true",
                       help="no effect: the daemon always stays in the foreground")
    other.add_argument("--print-capabilities", action="store_true", default=S,
                       help="print the vhost-user.json capabilities and exit")
    other.add_argument("-V", "--version", action="store_true", default=S,
                       help="print the version and exit")
    return p


# -o NAME[=VALUE]: the C virtiofsd's spellings, mapped onto Config fields.
_COMPAT_FLAGS = {
    "xattr": ("xattr", True), "no_xattr": ("xattr", False),
    "flock": ("flock", True), "no_flock": ("flock", False),
    "posix_lock": ("posix_lock", True), "no_posix_lock": ("posix_lock", False),
    "writeback": ("writeback", True), "no_writeback": ("writeback", False),
    "readdirplus": ("readdirplus", True), "no_readdirplus": ("readdirplus", False),
    "allow_direct_io": ("allow_direct_io", True), "no_allow_direct_io": ("allow_direct_io", False),
    "killpriv_v2": ("killpriv_v2", True), "no_killpriv_v2": ("killpriv_v2", False),
    "posix_acl": ("posix_acl", True), "no_posix_acl": ("posix_acl", False),
    "security_label": ("security_label", True), "no_security_label": ("security_label", False),
    "announce_submounts": ("announce_submounts", True),
    "debug": ("log_level", "debug"),
}
_COMPAT_LOG_LEVELS = {"err": "error", "error": "error", "warn": "warn", "info": "info",
                      "debug": "debug"}
_COMPAT_CACHE = {"none": "never", "auto": "auto", "always": "always", "metadata": "metadata"}


def _split_compat(text: str) -> list[str]:
    """Split at single commas; ',,' is a literal comma (QEMU's escaping, which libvirt uses
    for a shared directory whose name has a comma)."""
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return [x for x in items if x]


def _apply_compat(values: dict, text: str) -> None:
    for item in _split_compat(text):
        name, eq, value = item.partition("=")
        where = f"-o {item}"
        if name in _COMPAT_FLAGS and not eq:
            field_name, v = _COMPAT_FLAGS[name]
            values[field_name] = v
        elif name == "norace" and not eq:
            pass  # we never fall back to racy path-based calls; nothing to disable
        elif name == "source" and eq:
            values["shared_dir"] = value
        elif name == "cache" and eq:
            if value not in _COMPAT_CACHE:
                raise UsageError(f"{where}: cache is one of none, auto, always, metadata")
            values["cache"] = _COMPAT_CACHE[value]
        elif name in ("log_level", "loglevel") and eq:  # the C and the Rust spelling
            if value not in _COMPAT_LOG_LEVELS:
                raise UsageError(f"{where}: {name} is one of err, warn, info, debug")
            values["log_level"] = _COMPAT_LOG_LEVELS[value]
        elif name == "sandbox" and eq:
            if value not in ("namespace", "chroot"):
                raise UsageError(f"{where}: sandbox is namespace or chroot")
            values["sandbox"] = value
        elif name == "modcaps" and eq:
            values["modcaps"] = value
        elif name == "xattrmap" and eq:
            try:
                values["xattrmap"] = XattrMapRule.parse_all(value)
            except ValueError as e:
                raise UsageError(f"{where}: {e}") from None
        elif name == "timeout" and eq:
            try:
                t = float(value)
            except ValueError:
                raise UsageError(f"{where}: not a number of seconds") from None
            if not 0 <= t < 2 ** 63:
                raise UsageError(f"{where}: out of range")
            values["timeout"] = t
        else:
            raise UsageError(f"unknown or malformed compat option {where!r}")


def parse(argv: list[str] | None = None) -> Config:
    """The command line as a Config; UsageError for anything wrong with it."""
    args = argv if argv is not None else sys.argv[1:]
    ns = vars(build_parser().parse_args(args))
    values: dict = {}
    for text in ns.pop("compat"):
        _apply_compat(values, text)
    ns.pop("foreground")
    values.update(ns)  # the long options win over -o
    if values.get("inode_file_handles") == "fallback":
        values["inode_file_handles"] = "prefer"
    if values.get("log_level") == "warning":
        values["log_level"] = "warn"
    for key in ("translate_uid", "translate_gid", "uid_map", "gid_map", "source_options"):
        if key in values:
            values[key] = tuple(values[key])
    config = Config(**values)
    _check(config, values)
    return config


def _check(c: Config, given: dict) -> None:
    if c.print_capabilities or c.version:
        return
    if c.source is not None:
        _check_source(c, given)
    elif c.source_options:
        raise UsageError("--source-option needs --source")
    elif not c.shared_dir:
        raise UsageError("--shared-dir (or -o source=DIR) or --source=URL is required")
    if c.socket_path is None and c.fd is None:
        raise UsageError("--socket-path or --fd is required")
    if c.socket_path is not None and c.fd is not None:
        raise UsageError("--socket-path and --fd exclude each other")
    if c.socket_path == "":
        raise UsageError("--socket-path: empty path")
    if (c.uid_map or c.gid_map) and c.sandbox != "namespace":
        raise UsageError("--uid-map/--gid-map map the ids of the namespace sandbox: they need "
                         "--sandbox=namespace")
    needs_xattr = [o for o, on in (("--posix-acl", c.posix_acl),
                                   ("--security-label", c.security_label),
                                   ("--xattrmap", c.xattrmap is not None)) if on]
    if needs_xattr:
        if given.get("xattr") is False:
            raise UsageError(f"{needs_xattr[0]} needs extended attributes, but --no-xattr "
                             "was given")
        c.xattr = True
    if c.posix_acl and (c.translate_uid or c.translate_gid):
        raise UsageError("--posix-acl cannot be combined with --translate-uid/--translate-gid "
                         "(translated ids would break the ACLs)")
    if c.dax is not None and not c.dax_window:
        raise UsageError("--dax needs --dax-window=SIZE")
    from .idmap import IdMap, IdMapError
    for rules, option in ((c.translate_uid, "--translate-uid"), (c.translate_gid,
                                                                 "--translate-gid")):
        try:
            IdMap(rules)
        except IdMapError as e:
            raise UsageError(f"{option}: {e}") from None
    if c.modcaps is not None:
        from . import sandbox
        try:
            sandbox.parse_modcaps(c.modcaps)
        except sandbox.SandboxError as e:
            raise UsageError(f"--modcaps: {e}") from None
    # Migration is not implemented (QEMU 7.2 cannot migrate a vhost-user-fs device, and we
    # advertise no migration feature), so only the values that change nothing are accepted.
    for field_name, option, default in (
            ("migration_mode", "--migration-mode", "find-paths"),
            ("migration_on_error", "--migration-on-error", "abort"),
            ("migration_verify_handles", "--migration-verify-handles", False),
            ("migration_confirm_paths", "--migration-confirm-paths", False)):
        if getattr(c, field_name) != default:
            raise UsageError(f"{option}: migration is not implemented")


def _check_source(c: Config, given: dict) -> None:
    if c.shared_dir:
        raise UsageError("--source and --shared-dir exclude each other")
    if not c.source:
        raise UsageError("--source: empty URL")
    other = sorted(k for k in given if k not in SOURCE_OPTIONS)
    if other:
        raise UsageError(f"--{other[0].replace('_', '-')} does not apply to --source")
    if given.get("sandbox", "none") != "none":
        raise UsageError("--source needs the network: only --sandbox=none goes with it")
    c.sandbox = "none"
    if "seccomp" not in given:  # the allow-list is the host directory's; a store client's
        c.seccomp = "none"      # network and TLS calls are not on it


def capabilities_json() -> str:
    return json.dumps(CAPABILITIES, indent=2)

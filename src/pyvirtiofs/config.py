"""The daemon's configuration: one typed object built from the command line
(:mod:`pyvirtiofs.options`) and read by the rest of the daemon.

The value types for the structured options live here too, each parsed from its command-line
grammar by a ``parse`` class method that raises :class:`ValueError` with a one-line reason:
:class:`TranslateRule` (``--translate-uid/--translate-gid``), :class:`NamespaceIdRange`
(``--uid-map/--gid-map``) and :class:`XattrMapRule` (``--xattrmap``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ID_SPACE = 1 << 32  # uid_t/gid_t values 0..2^32-1


def _id_field(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} {text!r} is not a number")
    value = int(text, 10)
    if value >= ID_SPACE:
        raise ValueError(f"{what} {value} is out of range (0..{ID_SPACE - 1})")
    return value


def _check_range(base: int, count: int, what: str) -> None:
    if base + count > ID_SPACE:
        raise ValueError(f"{what} range {base}+{count} goes past {ID_SPACE - 1}")


@dataclass(frozen=True)
class TranslateRule:
    """One ``--translate-uid``/``--translate-gid`` rule, ``TYPE:SOURCE:TARGET:COUNT``
    (``forbid-guest`` has no target: ``forbid-guest:SOURCE:COUNT``).

    ``kind`` is one of :attr:`KINDS`.  For ``guest``/``squash-guest``/``forbid-guest`` the
    source range is guest ids; for ``host``/``squash-host`` it is host ids; for ``map`` the
    source is the guest base and the target the host base, applied in both directions.
    ``target`` is None for ``forbid-guest``."""
    kind: str
    source: int
    target: int | None
    count: int

    KINDS = ("guest", "host", "squash-guest", "squash-host", "forbid-guest", "map")

    @classmethod
    def parse(cls, text: str) -> "TranslateRule":
        # virtiofsd takes any separator that is not a letter, digit, '-' or '_' (the same
        # one throughout): map:1:2:3 and map/1/2/3 are one rule
        sep = next((ch for ch in text if not (ch.isalnum() or ch in "-_")), ":")
        parts = text.split(sep)
        kind = parts[0]
        if kind not in cls.KINDS:
            raise ValueError(f"unknown type {kind!r} (one of {', '.join(cls.KINDS)})")
        want = 3 if kind == "forbid-guest" else 4
        if len(parts) != want:
            shape = ("forbid-guest:<guest base>:<count>" if kind == "forbid-guest"
                     else f"{kind}:<source base>:<target base>:<count>")
            raise ValueError(f"expected {shape}")
        source = _id_field(parts[1], "base")
        target = None if kind == "forbid-guest" else _id_field(parts[2], "base")
        count = _id_field(parts[-1], "count")
        if count == 0:
            raise ValueError("count must be at least 1")
        _check_range(source, count, "source")
        if target is not None and not kind.startswith("squash"):
            _check_range(target, count, "target")
        return cls(kind, source, target, count)


@dataclass(frozen=True)
class NamespaceIdRange:
    """One ``--uid-map``/``--gid-map`` range ``:INSIDE:OUTSIDE:COUNT:`` for the user namespace
    the sandbox puts the daemon in (a line of /proc/PID/uid_map or gid_map)."""
    inside: int
    outside: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "NamespaceIdRange":
        if len(text) < 2 or text[0] != text[-1] or text[0].isalnum():
            raise ValueError("expected :<namespace id>:<host id>:<count>: (any punctuation "
                             "as separator, the same at both ends)")
        parts = text[1:-1].split(text[0])
        if len(parts) != 3:
            raise ValueError("expected :<namespace id>:<host id>:<count>:")
        inside = _id_field(parts[0], "namespace id")
        outside = _id_field(parts[1], "host id")
        count = _id_field(parts[2], "count")
        if count == 0:
            raise ValueError("count must be at least 1")
        _check_range(inside, count, "namespace")
        _check_range(outside, count, "host")
        return cls(inside, outside, count)


@dataclass(frozen=True)
class XattrMapRule:
    """One rule of an ``--xattrmap``: ``type`` is prefix, ok, bad or unsupported; ``scope``
    is client, server or all; ``key`` is matched against the guest's name (client scope),
    ``prepend`` against the host's name (server scope).  The ``map`` shorthand is expanded
    into these rules by :meth:`parse_all`."""
    type: str
    scope: str
    key: str
    prepend: str

    TYPES = ("prefix", "ok", "bad", "unsupported")
    SCOPES = ("client", "server", "all")

    @classmethod
    def parse_all(cls, text: str) -> tuple["XattrMapRule", ...]:
        """The whole mapping: rules one after another, each starting with its own separator
        (its first non-blank character), white space allowed between rules."""
        rules: list[XattrMapRule] = []
        i, n = 0, len(text)
        while True:
            while i < n and text[i].isspace():
                i += 1
            if i == n:
                break
            sep = text[i]
            if sep.isalnum():
                raise ValueError(f"rule {len(rules) + 1}: separator {sep!r} must not be a "
                                 "letter or digit")
            fields = []
            j = i + 1
            while len(fields) < 4:
                k = text.find(sep, j)
                if k < 0:
                    raise ValueError(f"rule {len(rules) + 1}: unterminated (every field ends "
                                     f"with {sep!r})")
                fields.append(text[j:k])
                j = k + 1
                if fields[0] == "map" and len(fields) == 3:
                    break
            i = j
            if fields[0] == "map" and text[i:].strip():
                raise ValueError(f"rule {len(rules) + 1}: a map rule must be the last")
            rules.extend(cls._rule(fields, len(rules) + 1))
        if not rules:
            raise ValueError("no rules")
        return tuple(rules)

    @classmethod
    def _rule(cls, f: list[str], number: int) -> list["XattrMapRule"]:
        if f[0] == "map":
            key, prepend = f[1], f[2]
            if not prepend:
                raise ValueError(f"rule {number}: map needs a prefix to prepend")
            if not key:  # every name gets the prefix; unprefixed host names are hidden
                return [cls("prefix", "all", "", prepend), cls("bad", "all", "", "")]
            return [cls("prefix", "all", key, prepend), cls("bad", "server", "", key),
                    cls("bad", "client", prepend, ""), cls("ok", "all", "", "")]
        type_, scope, key, prepend = f
        if type_ not in cls.TYPES:
            raise ValueError(f"rule {number}: unknown type {type_!r} (one of "
                             f"{', '.join(cls.TYPES + ('map',))})")
        if scope not in cls.SCOPES:
            raise ValueError(f"rule {number}: unknown scope {scope!r} (one of "
                             f"{', '.join(cls.SCOPES)})")
        return [cls(type_, scope, key, prepend)]


@dataclass
class Config:
    """Everything the command line decides.  Every default of an option virtiofsd 1.13 has is
    virtiofsd 1.13's (tests/unit/test_defaults.py compares them with its --help); the options
    it lacks say what their default is and why."""
    # where and what
    shared_dir: str | None = None
    source: str | None = None            # an fsspec URL served instead of shared_dir
    source_options: tuple[tuple[str, str], ...] = ()  # --source-option KEY=VALUE
    socket_path: str | None = None
    socket_group: str | None = None      # chgrp the socket to this group
    fd: int | None = None                # an inherited listening socket instead of a path
    tag: str | None = None
    readonly: bool = False
    # caching and I/O
    cache: str = "auto"                  # never | auto | always | metadata
    writeback: bool = False              # FUSE_WRITEBACK_CACHE
    allow_direct_io: bool = False        # keep the guest's O_DIRECT (else stripped)
    allow_mmap: bool = False             # shared mmap under cache=never|metadata
    killpriv_v2: bool = False
    preserve_noatime: bool = False       # else O_NOATIME is dropped from opens
    readdirplus: bool = True
    announce_submounts: bool = True
    # extended attributes, ACLs, security labels, identities
    xattr: bool = False
    posix_acl: bool = False
    security_label: bool = False
    xattrmap: tuple[XattrMapRule, ...] | None = None
    translate_uid: tuple[TranslateRule, ...] = ()
    translate_gid: tuple[TranslateRule, ...] = ()
    uid_map: tuple[NamespaceIdRange, ...] = ()
    gid_map: tuple[NamespaceIdRange, ...] = ()
    # locks (beyond virtiofsd, whose guests keep their locks to themselves): on, so locks hold
    # across guests and host processes; -o no_posix_lock/no_flock give virtiofsd's behaviour
    posix_lock: bool = True
    flock: bool = True
    # inodes
    inode_file_handles: str = "never"    # never | prefer | mandatory
    # several daemons on one tree (beyond virtiofsd): the shared metadata version table
    version_table: str | None = None     # a file in /dev/shm
    version_table_slots: int = 1 << 16   # slots of a table this daemon creates
    # DAX window (pyvirtiofsd only; needs a frontend with vhost-user SHMEM)
    dax_window: int = 0                  # bytes of shared memory region 0; 0: no window
    dax: str | None = None               # never | always | inode: files with FUSE_ATTR_DAX
    # confinement and resources
    sandbox: str = "namespace"           # namespace | chroot | none
    seccomp: str = "kill"                # --source: none (the store client needs the network)
    modcaps: str | None = None           # '+a:-b' or '+a,-b'
    rlimit_nofile: int | None = None     # None: min(1000000, nr_open); 0: leave alone
    thread_pool_size: int = 0
    # migration (not implemented; only the defaults are accepted)
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    # logging
    log_level: str = "info"              # error | warn | info | debug | trace | off
    syslog: bool = False
    # what the C virtiofsd's -o timeout= asked for (seconds), overriding the cache mode's
    timeout: float | None = None
    # one-shot actions
    print_capabilities: bool = False
    version: bool = False
    # options given on the command line that the daemon does not implement (yet)
    unimplemented: list[str] = field(default_factory=list)

"""Translating user and group ids between guest and host (--translate-uid / --translate-gid).

A guest's uid 1000 need not be the host's uid 1000.  An :class:`IdMap` holds two independent
translations, guest to host (the credentials a request runs with, the owner a guest sets) and
host to guest (the owner fields of the attributes sent back); an id no rule names maps to
itself.  Rules, as virtiofsd 1.13 spells them (any non-alphanumeric separator other than
``-`` and ``_`` may replace ``:``, the same one throughout a rule):

* ``guest:GUEST:HOST:COUNT``: guest ids GUEST.. become host ids HOST.. (one direction)
* ``host:HOST:GUEST:COUNT``: host ids HOST.. are shown as guest ids GUEST.. (one direction)
* ``squash-guest:GUEST:HOST:COUNT``: COUNT guest ids from GUEST all become host id HOST
* ``squash-host:HOST:GUEST:COUNT``: COUNT host ids from HOST are all shown as guest id GUEST
* ``forbid-guest:GUEST:COUNT``: the guest may not create files as, or give files, these ids
  (EPERM)
* ``map:GUEST:HOST:COUNT``: both directions at once

Ranges of one direction may not overlap.
"""

from __future__ import annotations

import bisect
import errno

from .filesystem import FsError

ID_MAX = 0xFFFFFFFF  # ids are u32 on the wire; (u32)-1 means "no change" in chown

_KINDS = {"guest": 3, "host": 3, "squash-guest": 3, "squash-host": 3, "forbid-guest": 2,
          "map": 3}


class IdMapError(ValueError):
    """A rule that cannot be parsed or that contradicts another."""


def _split_fields(spec: str) -> tuple[str, list[int]]:
    """'type<sep>n<sep>n...' with one separator character throughout."""
    i = 0
    while i < len(spec) and (spec[i].isalnum() or spec[i] in "-_"):
        i += 1
    kind = spec[:i].lower()
    if i == len(spec):
        raise IdMapError(f"{spec!r}: expected TYPE:FIELD:..., e.g. map:1000:101000:1")
    sep = spec[i]
    parts = spec[i + 1:].split(sep)
    try:
        values = [int(p, 10) for p in parts]
    except ValueError:
        raise IdMapError(f"{spec!r}: fields after the type must be numbers separated by "
                         f"{sep!r}") from None
    if any(v < 0 or v > ID_MAX for v in values):
        raise IdMapError(f"{spec!r}: ids are 0..{ID_MAX}")
    return kind, values


class _Table:
    """Disjoint half-open ranges [start, end) of source ids, each with a way to translate."""

    def __init__(self, direction: str):
        self.direction = direction
        self._starts: list[int] = []
        self._rules: list[tuple[int, int, str, int]] = []  # (start, end, how, target)

    def add(self, start: int, count: int, how: str, target: int, spec: str) -> None:
        if count <= 0:
            raise IdMapError(f"{spec!r}: the count must be at least 1")
        end = start + count
        if end - 1 > ID_MAX or (how == "range" and target + count - 1 > ID_MAX):
            raise IdMapError(f"{spec!r}: the range runs past id {ID_MAX}")
        i = bisect.bisect_right(self._starts, start)
        overlaps = (i > 0 and self._rules[i - 1][1] > start) or (
            i < len(self._rules) and self._rules[i][0] < end)
        if overlaps:
            raise IdMapError(f"{spec!r}: overlaps another {self.direction} rule")
        self._starts.insert(i, start)
        self._rules.insert(i, (start, end, how, target))

    def translate(self, ident: int) -> int | None:
        """The translated id, the id itself when no rule names it, None when forbidden."""
        i = bisect.bisect_right(self._starts, ident) - 1
        if i < 0:
            return ident
        start, end, how, target = self._rules[i]
        if ident >= end:
            return ident
        if how == "range":
            return target + (ident - start)
        if how == "squash":
            return target
        return None  # forbid

    def __bool__(self) -> bool:
        return bool(self._rules)


class IdMap:
    """Translations of one kind of id (uids or gids) in both directions."""

    def __init__(self, specs: list[str] | tuple[str, ...] = (), what: str = "id"):
        self.what = what
        self.specs = tuple(specs)
        self._to_host = _Table("guest-to-host")
        self._to_guest = _Table("host-to-guest")
        for spec in self.specs:
            self._add(spec)

    def _add(self, spec: str) -> None:
        kind, v = _split_fields(spec.strip())
        want = _KINDS.get(kind)
        if want is None:
            raise IdMapError(f"{spec!r}: unknown type {kind!r}; one of "
                             + ", ".join(_KINDS))
        if len(v) != want:
            raise IdMapError(f"{spec!r}: {kind} takes {want} numbers, got {len(v)}")
        if kind == "guest":
            self._to_host.add(v[0], v[2], "range", v[1], spec)
        elif kind == "host":
            self._to_guest.add(v[0], v[2], "range", v[1], spec)
        elif kind == "squash-guest":
            self._to_host.add(v[0], v[2], "squash", v[1], spec)
        elif kind == "squash-host":
            self._to_guest.add(v[0], v[2], "squash", v[1], spec)
        elif kind == "forbid-guest":
            self._to_host.add(v[0], v[1], "forbid", 0, spec)
        else:  # map
            self._to_host.add(v[0], v[2], "range", v[1], spec)
            self._to_guest.add(v[1], v[2], "range", v[0], spec)

    @property
    def is_identity(self) -> bool:
        return not self._to_host and not self._to_guest

    def to_host(self, guest_id: int) -> int:
        """The host id a guest id stands for; FsError(EPERM) if a forbid-guest rule names it."""
        host = self._to_host.translate(guest_id)
        if host is None:
            raise FsError(errno.EPERM, f"guest {self.what} {guest_id} is forbidden")
        return host

    def to_guest(self, host_id: int) -> int:
        """The guest id shown for a host id."""
        guest = self._to_guest.translate(host_id)
        return host_id if guest is None else guest

    def __repr__(self) -> str:
        return f"IdMap({list(self.specs)!r})"


class MappedStat:
    """An attribute set whose owner fields are shown in the guest's ids (os.stat_result
    cannot be copied with two fields changed)."""
    __slots__ = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                 "st_blocks", "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
                 "st_dev")

    def __init__(self, st, uid: int, gid: int):
        self.st_ino = st.st_ino
        self.st_mode = st.st_mode
        self.st_nlink = st.st_nlink
        self.st_uid = uid
        self.st_gid = gid
        self.st_rdev = st.st_rdev
        self.st_size = st.st_size
        self.st_blocks = st.st_blocks
        self.st_blksize = st.st_blksize
        self.st_atime_ns = st.st_atime_ns
        self.st_mtime_ns = st.st_mtime_ns
        self.st_ctime_ns = st.st_ctime_ns
        self.st_dev = st.st_dev


def parse_namespace_map(spec: str) -> tuple[int, int, int]:
    """libvirt's --uid-map/--gid-map form ``:INSIDE:OUTSIDE:COUNT:`` (any non-alphanumeric
    character as the separator, which also opens and closes the spec)."""
    if len(spec) < 2 or spec[0].isalnum() or spec[-1] != spec[0]:
        raise IdMapError(f"{spec!r}: expected :INSIDE:OUTSIDE:COUNT:, e.g. :0:100000:65536:")
    parts = spec[1:-1].split(spec[0])
    if len(parts) != 3:
        raise IdMapError(f"{spec!r}: expected three numbers, INSIDE, OUTSIDE and COUNT")
    try:
        inside, outside, count = (int(p, 10) for p in parts)
    except ValueError:
        raise IdMapError(f"{spec!r}: INSIDE, OUTSIDE and COUNT must be numbers") from None
    if count <= 0 or min(inside, outside) < 0 or max(inside, outside) + count - 1 > ID_MAX:
        raise IdMapError(f"{spec!r}: ids are 0..{ID_MAX} and the count at least 1")
    return inside, outside, count

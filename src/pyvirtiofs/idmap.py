"""Translating user and group ids between guest and host (--translate-uid / --translate-gid).

A guest's uid 1000 need not be the host's uid 1000.  An :class:`IdMap` holds two independent
translations, guest to host (the credentials a request runs with, the owner a guest sets) and
host to guest (the owner fields of the attributes sent back); an id no rule names maps to
itself.  The rules (:class:`pyvirtiofs.config.TranslateRule`, virtiofsd 1.13's grammar):

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
from typing import Iterable

from .config import TranslateRule
from .filesystem import FsError


class IdMapError(ValueError):
    """Rules that contradict each other."""


class _Table:
    """Disjoint half-open ranges [start, end) of source ids, each with a way to translate."""

    def __init__(self, direction: str):
        self.direction = direction
        self._starts: list[int] = []
        self._rules: list[tuple[int, int, str, int]] = []  # (start, end, how, target)

    def add(self, start: int, count: int, how: str, target: int, spec: str) -> None:
        end = start + count
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

    def __init__(self, rules: Iterable[TranslateRule] = (), what: str = "id"):
        self.what = what
        self.rules = tuple(rules)
        self._to_host = _Table("guest-to-host")
        self._to_guest = _Table("host-to-guest")
        for r in self.rules:
            self._add(r)

    @classmethod
    def parse(cls, specs: Iterable[str], what: str = "id") -> "IdMap":
        """From command-line rules such as ``map:1000:101000:10``."""
        return cls([TranslateRule.parse(s) for s in specs], what)

    def _add(self, r: TranslateRule) -> None:
        spec = f"{r.kind}:{r.source}:{r.target}:{r.count}"
        if r.kind == "guest":
            self._to_host.add(r.source, r.count, "range", r.target, spec)
        elif r.kind == "host":
            self._to_guest.add(r.source, r.count, "range", r.target, spec)
        elif r.kind == "squash-guest":
            self._to_host.add(r.source, r.count, "squash", r.target, spec)
        elif r.kind == "squash-host":
            self._to_guest.add(r.source, r.count, "squash", r.target, spec)
        elif r.kind == "forbid-guest":
            self._to_host.add(r.source, r.count, "forbid", 0, f"forbid-guest:{r.source}:{r.count}")
        else:  # map
            self._to_host.add(r.source, r.count, "range", r.target, spec)
            self._to_guest.add(r.target, r.count, "range", r.source, spec)

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
        return f"IdMap({self.rules!r})"


class MappedStat:
    """Attributes (an os.stat_result, a statx result, ...) with the owner fields shown in
    the guest's ids; every other field is the wrapped object's."""
    __slots__ = ("_st", "st_uid", "st_gid")

    def __init__(self, st, uid: int, gid: int):
        self._st = st
        self.st_uid = uid
        self.st_gid = gid

    def __getattr__(self, name: str):
        return getattr(self._st, name)

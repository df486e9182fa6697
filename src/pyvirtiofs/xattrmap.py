"""Renaming extended attributes between guest and host (--xattrmap), as virtiofsd does.

A mapping is a list of rules tried in order; the first that matches decides.  Each rule's
fields are separated by its first non-blank character (the same character closes it), so
``:prefix:all:trusted.:user.virtiofs.:`` and ``/prefix/all/trusted./user.virtiofs./`` are the
same rule; blanks and newlines may separate rules (parsed by
:meth:`pyvirtiofs.config.XattrMapRule.parse_all`)::

    <sep>TYPE<sep>SCOPE<sep>KEY<sep>PREPEND<sep>
    <sep>map<sep>KEY<sep>PREPEND<sep>          (at most one, and last)

SCOPE says which names a rule looks at: ``client`` (names in get/set/removexattr, matched
against KEY), ``server`` (names listxattr finds on the host, matched against PREPEND) or
``all`` (both).  TYPE says what happens to a matching name:

* ``prefix``: a client name gets PREPEND put in front; a server name loses PREPEND;
* ``ok``: the name passes unchanged;
* ``bad``: the client gets EPERM (ENODATA from getxattr); a server name is hidden;
* ``unsupported``: the client gets ENOTSUP; a server name is hidden.

``map`` is a shorthand: put PREPEND in front of names starting with KEY (all names if KEY
is empty), hide host names starting with KEY that lack the prefix, refuse client names
that already start with PREPEND, and let everything else through (with an empty KEY,
nothing else exists).  A name no rule matches is refused (client) or hidden (server).

The Linux kernel drops ``security.capability`` when a file is written or changes owner; if the
mapping renames it, the daemon has to drop the renamed attribute itself
(:attr:`XattrMap.capability_name`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Iterable

from .config import XattrMapRule
from .filesystem import FsError

CLIENT = 1
SERVER = 2
_SCOPES = {"client": CLIENT, "server": SERVER, "all": CLIENT | SERVER}


@dataclass(frozen=True)
class Rule:
    type: str      # prefix, ok, bad, unsupported
    scope: int     # CLIENT, SERVER or both
    key: bytes     # matched against client names
    prepend: bytes  # matched against server names; added to client names by prefix


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class XattrMap:
    """Applies a parsed mapping to names from the guest and to lists from the host."""

    def __init__(self, rules: Iterable[XattrMapRule]):
        self.rules = [Rule(r.type, _SCOPES[r.scope], _bytes(r.key), _bytes(r.prepend))
                      for r in rules]
        try:
            self.capability_name: bytes | None = self.to_host(b"security.capability")
        except FsError:
            self.capability_name = None
        if self.capability_name == b"security.capability":
            self.capability_name = None  # not renamed: the kernel handles it

    def _find(self, scope: int, name: bytes) -> Rule | None:
        for r in self.rules:
            if r.scope & scope and name.startswith(r.key if scope == CLIENT else r.prepend):
                return r
        return None

    def to_host(self, name: bytes, *, getting: bool = False) -> bytes:
        """The host name for a guest's name, or FsError (EPERM; ENODATA when ``getting``,
        so that a refused name reads as absent; ENOTSUP for ``unsupported``)."""
        r = self._find(CLIENT, name)
        if r is None or r.type == "bad":
            raise FsError(errno.ENODATA if getting else errno.EPERM,
                          f"xattr {name!r} refused by the xattr map")
        if r.type == "unsupported":
            raise FsError(errno.EOPNOTSUPP)
        if r.type == "prefix":
            return r.prepend + name
        return name

    def to_guest(self, names: list[bytes]) -> list[bytes]:
        """The names listxattr shows the guest: renamed, or hidden."""
        out = []
        for name in names:
            r = self._find(SERVER, name)
            if r is None or r.type in ("bad", "unsupported"):
                continue
            out.append(name[len(r.prepend):] if r.type == "prefix" else name)
        return out

    @classmethod
    def parse(cls, text: str) -> "XattrMap":
        """From the command-line text (ValueError with the rule's number if malformed)."""
        return cls(XattrMapRule.parse_all(text))

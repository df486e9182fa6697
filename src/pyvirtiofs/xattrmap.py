"""Renaming extended attributes between guest and host (--xattrmap), as virtiofsd does.

A mapping is a list of rules tried in order; the first that matches decides.  Each rule's
fields are separated by its first non-blank character (the same character closes it), so
``:prefix:all:trusted.:user.virtiofs.:`` and ``/prefix/all/trusted./user.virtiofs./`` are the
same rule; blanks and newlines may separate rules::

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

from .filesystem import FsError

CLIENT = 1
SERVER = 2
_SCOPES = {"client": CLIENT, "server": SERVER, "all": CLIENT | SERVER}
_TYPES = ("prefix", "ok", "bad", "unsupported", "map")


class XattrMapError(ValueError):
    """A mapping that cannot be parsed; the message names the rule."""


@dataclass(frozen=True)
class Rule:
    type: str      # prefix, ok, bad, unsupported
    scope: int     # CLIENT, SERVER or both
    key: bytes     # matched against client names
    prepend: bytes  # matched against server names; added to client names by prefix


def _read_field(text: str, pos: int, sep: str, rule_no: int) -> tuple[str, int]:
    end = text.find(sep, pos)
    if end < 0:
        raise XattrMapError(f"xattrmap rule {rule_no}: not closed with {sep!r}")
    return text[pos:end], end + 1


def parse(text: str) -> list[Rule]:
    """The rules of a --xattrmap string, with ``map`` expanded."""
    rules: list[Rule] = []
    pos, n, rule_no = 0, len(text), 0
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos == n:
            break
        rule_no += 1
        sep = text[pos]
        if sep.isalnum():
            raise XattrMapError(f"xattrmap rule {rule_no}: starts with {sep!r}; a rule starts "
                                "with its separator, e.g. :ok:all:::")
        kind, pos = _read_field(text, pos + 1, sep, rule_no)
        if kind not in _TYPES:
            raise XattrMapError(f"xattrmap rule {rule_no}: unknown type {kind!r}; one of "
                                + ", ".join(_TYPES))
        if kind == "map":
            key, pos = _read_field(text, pos, sep, rule_no)
            prepend, pos = _read_field(text, pos, sep, rule_no)
            if text[pos:].strip():
                raise XattrMapError(f"xattrmap rule {rule_no}: a map rule must be the last")
            rules += _expand_map(os_bytes(key), os_bytes(prepend))
            break
        scope, pos = _read_field(text, pos, sep, rule_no)
        if scope not in _SCOPES:
            raise XattrMapError(f"xattrmap rule {rule_no}: unknown scope {scope!r}; one of "
                                "client, server, all")
        key, pos = _read_field(text, pos, sep, rule_no)
        prepend, pos = _read_field(text, pos, sep, rule_no)
        rules.append(Rule(kind, _SCOPES[scope], os_bytes(key), os_bytes(prepend)))
    if not rules:
        raise XattrMapError("xattrmap: no rules")
    return rules


def os_bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    both = CLIENT | SERVER
    rules = [Rule("prefix", both, key, prepend)]
    if key:
        # Host names starting with key but lacking the prefix are hidden; a client may not
        # name the prefixed form directly (it would bypass the guest's own access rules).
        rules.append(Rule("bad", both, prepend, key))
        rules.append(Rule("ok", both, b"", b""))
    else:
        rules.append(Rule("bad", both, b"", b""))
    return rules


class XattrMap:
    """Applies a parsed mapping to names from the guest and to lists from the host."""

    def __init__(self, text: str):
        self.text = text
        self.rules = parse(text)
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

    def __repr__(self) -> str:
        return f"XattrMap({self.text!r})"

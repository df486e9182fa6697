"""Cache modes: how long the guest may trust the names and attributes it was told, and whether
it keeps file data in its page cache.  The same four modes everywhere: the daemon's ``--cache``,
:class:`~pyvirtiofs.passthrough.PassthroughFs`'s ``cache=`` and, for path-level file systems
(whose entries and opens the library answers for them), ``serve``/``Server``/``mount``'s
``cache=``.  An inode-level file system says the same per reply: ``Entry(entry_timeout=,
attr_timeout=)`` and ``OpenResult(direct_io=, keep_cache=, cache_dir=)``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachePolicy:
    """One cache mode: ``timeout`` seconds for entries and attributes; ``direct_io``: file data
    bypasses the guest's page cache (FOPEN_DIRECT_IO); ``keep_cache``: the page cache survives
    an open (FOPEN_KEEP_CACHE, and FOPEN_CACHE_DIR for directories)."""
    name: str
    timeout: float
    direct_io: bool
    keep_cache: bool

    @classmethod
    def from_name(cls, name: str) -> "CachePolicy":
        """The mode called ``name``; ValueError naming the modes for anything else."""
        try:
            return MODES[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown cache mode {name!r}; choose from "
                             f"{', '.join(MODES)}") from None


MODES = {  # the reference daemon's timeouts
    "never": CachePolicy("never", 0.0, True, False),  # ask every time; no data cache
    "auto": CachePolicy("auto", 1.0, False, False),  # 1 s; data cached while a file is open
    "always": CachePolicy("always", 86400.0, False, True),  # the guest owns the files
    "metadata": CachePolicy("metadata", 86400.0, True, False),  # names cached, data never
}

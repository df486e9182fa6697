"""The settings every virtiofs daemon of one benchmark runs with: like for like.

A benchmark that compares daemons gives all of them the SAME sandbox, seccomp, cache and
thread-pool settings, passed explicitly (the daemons' defaults may differ: pyvirtiofsd had no
seccomp filter by default in earlier runs, QEMU's C virtiofsd always has its filter on and
cannot run without a sandbox).  ``options(kind)`` turns them into
each daemon's command-line options; ``record(kind)`` is what the results file keeps per daemon,
so that the README's tables can state them and a test can check they match.

Defaults: ``--sandbox chroot --seccomp kill``, the one confinement all three daemons support.
"""

from __future__ import annotations

import dataclasses

SANDBOXES = ("namespace", "chroot", "none")
SECCOMPS = ("kill", "none")
CACHES = ("auto", "always", "never")
# the keys every results file records for every daemon (tests/unit/test_readme_tables.py)
KEYS = ("sandbox", "seccomp", "cache", "thread_pool_size")


class UnsupportedSettings(ValueError):
    """A daemon cannot run with the requested settings."""


@dataclasses.dataclass(frozen=True)
class DaemonSettings:
    sandbox: str = "chroot"
    seccomp: str = "kill"
    cache: str = "auto"
    thread_pool_size: int = 0

    def __post_init__(self) -> None:
        if self.sandbox not in SANDBOXES:
            raise UnsupportedSettings(f"sandbox {self.sandbox!r}: one of {', '.join(SANDBOXES)}")
        if self.seccomp not in SECCOMPS:
            raise UnsupportedSettings(f"seccomp {self.seccomp!r}: one of {', '.join(SECCOMPS)}")
        if self.cache not in CACHES:
            raise UnsupportedSettings(f"cache {self.cache!r}: one of {', '.join(CACHES)}")
        if self.thread_pool_size < 0:
            raise UnsupportedSettings("thread_pool_size must be >= 0")

    def check(self, kind: str) -> None:
        """Raise UnsupportedSettings if daemon ``kind`` cannot run with these settings."""
        if kind == "c":
            if self.sandbox == "none":
                raise UnsupportedSettings(
                    "QEMU's C virtiofsd has no sandbox=none (namespace or chroot only): "
                    "leave it out (--daemons py,rust) or use --sandbox chroot")
            if self.seccomp != "kill":
                raise UnsupportedSettings(
                    "QEMU's C virtiofsd cannot turn its seccomp filter off: leave it out "
                    "(--daemons py,rust) or use --seccomp kill")
        elif kind not in ("py", "rust"):
            raise UnsupportedSettings(f"unknown daemon {kind!r}")

    def options(self, kind: str) -> list[str]:
        """Command-line options that give daemon ``kind`` exactly these settings."""
        self.check(kind)
        if kind in ("py", "rust"):      # the same option names
            return [f"--sandbox={self.sandbox}", f"--seccomp={self.seccomp}",
                    f"--cache={self.cache}", f"--thread-pool-size={self.thread_pool_size}"]
        # C virtiofsd: its seccomp filter is always on (kill); cache=none is its "never"
        cache = "none" if self.cache == "never" else self.cache
        return ["-o", f"sandbox={self.sandbox}", "-o", f"cache={cache}",
                f"--thread-pool-size={self.thread_pool_size}"]

    def record(self) -> dict:
        return dataclasses.asdict(self)


def add_arguments(ap) -> None:
    """The benchmark scripts' --sandbox/--seccomp/--thread-pool-size options."""
    d = DaemonSettings()
    ap.add_argument("--sandbox", choices=SANDBOXES, default=d.sandbox,
                    help=f"sandbox of EVERY daemon (default {d.sandbox}: all three support it)")
    ap.add_argument("--seccomp", choices=SECCOMPS, default=d.seccomp,
                    help=f"seccomp filter of EVERY daemon (default {d.seccomp}; the C virtiofsd "
                    "cannot turn it off)")
    ap.add_argument("--thread-pool-size", type=int, default=d.thread_pool_size,
                    help="thread pool of EVERY daemon (default 0: none)")


def from_arguments(args, cache: str = "auto") -> DaemonSettings:
    return DaemonSettings(sandbox=args.sandbox, seccomp=args.seccomp, cache=cache,
                          thread_pool_size=args.thread_pool_size)

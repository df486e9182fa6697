"""pyvirtiofsd's defaults are virtiofsd 1.13's: read from the Rust virtiofsd's own ``--help``
(every ``[default: X]``, every ``[default]`` on one of a --X/--no-X pair, every plain flag
being off) and compared with what pyvirtiofsd parses from a command line that names only the
directory and the socket.  A default that drifts from virtiofsd's fails here, naming it.

The defaults that go beyond virtiofsd (the locks, the DAX window, --source) are asserted
too, with the reason they differ in the README."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys

from pyvirtiofs import options
from tests import peers

MINIMAL = ["--shared-dir=/srv", "--socket-path=/tmp/s"]

# Options whose value virtiofsd's help cannot give a default for, or that are no setting.
NOT_SETTINGS = {"help", "version", "o", "d", "f", "shared_dir", "socket_path", "socket"}
# How a value default of virtiofsd's help reads in pyvirtiofsd's Config.
VALUE_AS_CONFIG = {("rlimit_nofile", "min(1000000, '/proc/sys/fs/nr_open')"): None,
                   ("thread_pool_size", "0"): 0}


def rust_help() -> str:
    return subprocess.run([peers.find_rust_virtiofsd(), "--help"], stdout=subprocess.PIPE,
                          text=True, check=True).stdout


def rust_defaults(help_text: str) -> dict[str, object]:
    """Config field -> virtiofsd's default, from its --help."""
    entries: list[tuple[str, bool, str]] = []  # option, takes a value, its description
    for line in help_text.splitlines():
        m = re.match(r"^ {2,6}(?:-\w, )?(--?[a-z][a-z0-9-]*)([ =]<[A-Z_]+>)?", line)
        if m and not line.startswith(" " * 8):
            entries.append((m.group(1).lstrip("-").replace("-", "_"), bool(m.group(2)),
                            line[m.end():]))
        elif entries:
            name, value, text = entries[-1]
            entries[-1] = (name, value, text + " " + line.strip())
    defaults: dict[str, object] = {}
    for name, takes_value, text in entries:
        if name in NOT_SETTINGS:
            continue
        m = re.search(r"\[default: ([^\]]*(?:\][^\]]*)?)\]", text)
        if takes_value:
            given = m.group(1) if m else None
            defaults[name] = VALUE_AS_CONFIG.get((name, given), given)
        elif name.startswith("no_"):
            # --no-X: X is on unless this flag is marked [default]
            defaults[name[3:]] = "[default]" not in text
        elif "[default]" in text:  # --X of a --X/--no-X pair, marked as the default
            defaults[name] = True
        else:  # a plain flag is off, unless its --no-X said otherwise
            defaults.setdefault(name, False)
    return defaults


def test_every_default_is_virtiofsd_1_13s():
    help_text = rust_help()
    assert "virtiofsd" in help_text and "--killpriv-v2" in help_text
    theirs = rust_defaults(help_text)
    assert len(theirs) >= 30, theirs  # the help text was read
    # the markers the parser relies on were found (a changed help format fails here)
    assert (theirs["seccomp"], theirs["killpriv_v2"], theirs["announce_submounts"],
            theirs["readdirplus"], theirs["xattr"]) == ("kill", False, True, True, False)
    ours = options.parse(MINIMAL)
    # virtiofsd's options that are lists here: no value is an empty tuple
    lists = {"uid_map", "gid_map", "translate_uid", "translate_gid"}
    drift = {}
    for name, want in sorted(theirs.items()):
        have = getattr(ours, name)
        if name in lists and want is None:
            want = ()
        if have != want:
            drift[name] = (have, want)
    assert drift == {}, f"pyvirtiofsd's default (first) differs from virtiofsd 1.13's: {drift}"


def test_defaults_beyond_virtiofsd():
    c = options.parse(MINIMAL)
    # on: locks then hold across guests and host processes (README, "Locks hold across VMs")
    assert (c.posix_lock, c.flock) == (True, True)
    assert (c.dax_window, c.dax, c.version_table, c.source) == (0, None, None, None)
    # --source: the allow-list is the host directory's, so no seccomp filter unless asked
    s = options.parse(["--source=memory://", "--socket-path=/tmp/s"])
    assert (s.sandbox, s.seccomp) == ("none", "none")
    assert options.parse(["--source=memory://", "--socket-path=/tmp/s",
                          "--seccomp=log"]).seccomp == "log"


def test_help_states_the_defaults_that_differ_from_on():
    text = options.build_parser().format_help()
    flat = " ".join(text.split())
    assert "--no-killpriv-v2 leave that to the guest kernel (the default)" in flat
    assert "answer extended-attribute requests with ENOSYS (the default)" in flat
    assert "(default kill; none with --source)" in flat


def test_default_open_file_limit_is_virtiofsds(start_daemon):
    """Without --rlimit-nofile the daemon sets both limits to min(1000000, nr_open), as
    virtiofsd does (root may raise the hard limit; an ordinary user falls back to it)."""
    d = start_daemon()
    with open("/proc/sys/fs/nr_open") as f:
        target = min(1_000_000, int(f.read()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = open(f"/proc/{d.proc.pid}/limits").read()
    m = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
    assert m, limits
    if soft >= 1_000_000:
        want = (soft, hard)          # already high enough: left alone
    elif _can_set(target):
        want = (target, target)
    else:
        want = (hard, hard)          # no CAP_SYS_RESOURCE to go above the hard limit
    assert (int(m.group(1)), int(m.group(2))) == want, limits


def _can_set(n: int) -> bool:
    """Whether a process like the daemon may set both limits to n (try it in a child)."""
    r = subprocess.run([sys.executable, "-c", "import resource; resource.setrlimit("
                        f"resource.RLIMIT_NOFILE, ({n}, {n}))"], stderr=subprocess.DEVNULL)
    return r.returncode == 0

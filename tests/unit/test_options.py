"""The command line: virtiofsd 1.13's options, the C virtiofsd's -o forms libvirt passes,
the grammars of the structured options, and one-line usage errors."""

from __future__ import annotations

import re
import subprocess

import pytest

from pyvirtiofs import options
from pyvirtiofs.config import Config, NamespaceIdRange, TranslateRule, XattrMapRule
from pyvirtiofs.options import UsageError, parse
from tests import peers

BASE = ["--shared-dir=/srv", "--socket-path=/tmp/s"]


def test_defaults_without_options():
    c = parse(BASE)
    assert (c.shared_dir, c.socket_path, c.fd) == ("/srv", "/tmp/s", None)
    assert c == Config(shared_dir="/srv", socket_path="/tmp/s")
    assert (c.cache, c.thread_pool_size, c.log_level, c.inode_file_handles) == \
        ("auto", 0, "info", "never")
    assert not (c.writeback or c.allow_direct_io or c.allow_mmap or c.preserve_noatime)
    assert c.readdirplus


def test_libvirt_compat_form():
    # What libvirt 9.0 runs for <binary xattr='on'><cache mode='always'/><lock posix flock>,
    # with a comma in the directory name (QEMU escaping: ',,').
    c = parse(["--fd=3", "-o", "source=/var/lib/a,,b,cache=always,xattr,flock,posix_lock",
               "--thread-pool-size=16", "--rlimit-nofile=4096"])
    assert c.shared_dir == "/var/lib/a,b"
    assert (c.fd, c.cache, c.xattr, c.flock, c.posix_lock) == (3, "always", True, True, True)
    assert (c.thread_pool_size, c.rlimit_nofile) == (16, 4096)


def test_compat_options_map_onto_the_long_ones():
    c = parse(["--socket-path=/s", "-o", "source=/d", "-o", "cache=none,no_xattr,no_flock",
               "-o", "no_posix_lock,writeback,no_readdirplus,allow_direct_io,no_killpriv_v2",
               "-o", "log_level=err,sandbox=chroot,modcaps=+sys_admin:-mknod,timeout=2.5,norace"])
    assert (c.shared_dir, c.cache, c.xattr, c.flock, c.posix_lock) == \
        ("/d", "never", False, False, False)
    assert (c.writeback, c.readdirplus, c.allow_direct_io, c.killpriv_v2) == \
        (True, False, True, False)
    assert (c.log_level, c.sandbox, c.modcaps, c.timeout) == \
        ("error", "chroot", "+sys_admin:-mknod", 2.5)
    assert parse(["--socket-path=/s", "-o", "source=/d", "-o", "debug"]).log_level == "debug"
    # the Rust virtiofsd's spellings: loglevel= and cache=metadata
    rust = parse(["--socket-path=/s", "-o", "source=/d,loglevel=warn,cache=metadata"])
    assert (rust.log_level, rust.cache) == ("warn", "metadata")
    # a long option given too wins over -o
    assert parse(BASE + ["-o", "cache=always", "--cache=never"]).cache == "never"


@pytest.mark.parametrize("bad, says", [
    ("source=/d,frobnicate", "-o frobnicate"),
    ("source=/d,cache=sometimes", "cache is one of"),
    ("source=/d,log_level=loud", "log_level"),
    ("source=/d,sandbox=none", "sandbox is namespace or chroot"),
    ("source=/d,timeout=soon", "timeout=soon"),
    ("source=/d,xattr=1", "-o xattr=1"),
])
def test_bad_compat_options_are_named(bad, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        parse(["--socket-path=/s", "-o", bad])


def test_virtme_ng_command_line():
    c = parse(["--syslog", "--no-announce-submounts", "--readonly", "--socket-path", "/x",
               "--shared-dir", "/", "--sandbox", "none", "--cache", "always"])
    assert (c.syslog, c.announce_submounts, c.readonly, c.sandbox, c.cache) == \
        (True, False, True, "none", "always")


def test_rust_spellings():
    c = parse(BASE + ["--inode-file-handles=fallback", "--log-level=trace", "-d", "-f",
                      "--modcaps=+sys_admin:-chown", "--socket=/other"])
    assert c.inode_file_handles == "prefer"  # "fallback" is the old name
    assert c.log_level == "debug"  # -d after --log-level
    assert c.socket_path == "/other"
    assert parse(BASE + ["--log-level=trace"]).log_level == "trace"
    assert parse(BASE + ["--rlimit-nofile=0"]).rlimit_nofile == 0


@pytest.mark.parametrize("argv, says", [
    (["--bogus"], "--bogus"),
    (["--thread-pool-size=-1"], "--thread-pool-size"),
    (["--thread-pool-size=many"], "--thread-pool-size"),
    (["--fd=-3"], "--fd"),
    (["--rlimit-nofile=-1"], "--rlimit-nofile"),
    (["--cache=sometimes"], "--cache"),
    (["--log-level=loud"], "--log-level"),
    (["--sandbox=jail"], "--sandbox"),
    (["--seccomp=maybe"], "--seccomp"),
    (["--inode-file-handles=always"], "--inode-file-handles"),
    (["--modcaps=+frobnicate"], "--modcaps"),
    (["--modcaps=sys_admin"], "--modcaps"),
    (["--write"], "--write"),  # no abbreviations: --write is not --writeback
    (["--translate-uid=guest:0:1000"], "--translate-uid"),
    (["--translate-gid=mapx:0:1:1"], "--translate-gid"),
    (["--uid-map=0:1000:1"], "--uid-map"),
    (["--gid-map=:0:1000:0:"], "--gid-map"),
    (["--xattrmap=:prefix:all:user.:"], "--xattrmap"),
    (["--posix-acl", "--translate-uid=map:0:1000:1"], "--posix-acl"),
    (["--posix-acl", "--no-xattr"], "--no-xattr"),
    (["--migration-mode=file-handles"], "--migration-mode"),
    (["--migration-on-error=guest-error"], "--migration-on-error"),
    (["--migration-verify-handles"], "--migration-verify-handles"),
    (["--migration-confirm-paths"], "--migration-confirm-paths"),
    (["--fd=3"], "exclude each other"),
])
def test_usage_errors_name_the_option(argv, says):
    with pytest.raises(UsageError) as e:
        parse(BASE + argv)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_required_options():
    with pytest.raises(UsageError, match="--shared-dir"):
        parse(["--socket-path=/s"])
    with pytest.raises(UsageError, match="--socket-path or --fd"):
        parse(["--shared-dir=/d"])
    assert parse(["--print-capabilities"]).print_capabilities
    assert parse(["-V"]).version


def test_migration_defaults_are_accepted():
    c = parse(BASE + ["--migration-mode=find-paths", "--migration-on-error=abort"])
    assert (c.migration_mode, c.migration_on_error) == ("find-paths", "abort")


def test_translate_rules():
    c = parse(BASE + ["--translate-uid=map:0:100000:65536", "--translate-uid=squash-guest:65536:1000:4294901760",
                      "--translate-gid=forbid-guest:1001:999", "--translate-gid=host:5:6:1"])
    assert c.translate_uid == (TranslateRule("map", 0, 100000, 65536),
                               TranslateRule("squash-guest", 65536, 1000, 4294901760))
    assert c.translate_gid == (TranslateRule("forbid-guest", 1001, None, 999),
                               TranslateRule("host", 5, 6, 1))
    for bad in ("guest:0:1:0", "guest:4294967295:0:2", "guest:a:1:1", "forbid-guest:1:2:3",
                "guest:-1:0:1", "squash-host:0:1"):
        with pytest.raises(ValueError):
            TranslateRule.parse(bad)


def test_namespace_id_ranges():
    c = parse(BASE + ["--uid-map=:0:1000:1:", "--uid-map=:1:100000:65536:",
                      "--gid-map=/0/1000/1/"])
    assert c.uid_map == (NamespaceIdRange(0, 1000, 1), NamespaceIdRange(1, 100000, 65536))
    assert c.gid_map == (NamespaceIdRange(0, 1000, 1),)
    for bad in (":0:1:1", ":0:1:1/", ":0:1:", "a0a1a1a", ":0:1:x:", ":0:4294967295:2:"):
        with pytest.raises(ValueError):
            NamespaceIdRange.parse(bad)


def test_xattrmap_grammar():
    rules = XattrMapRule.parse_all(
        "/prefix/all/trusted./user.virtiofs./\n /bad/server//trusted./ "
        "/bad/client/user.virtiofs.// /ok/all/// :unsupported:all:security.selinux::")
    assert rules == (XattrMapRule("prefix", "all", "trusted.", "user.virtiofs."),
                     XattrMapRule("bad", "server", "", "trusted."),
                     XattrMapRule("bad", "client", "user.virtiofs.", ""),
                     XattrMapRule("ok", "all", "", ""),
                     XattrMapRule("unsupported", "all", "security.selinux", ""))
    # rules back to back, each opening with its separator
    assert len(XattrMapRule.parse_all(":prefix:all::user.virtiofs.::bad:all:::")) == 2
    # the map shorthand expands as virtiofsd does
    assert XattrMapRule.parse_all(":map:trusted.:user.virtiofs.:") == (
        XattrMapRule("prefix", "all", "trusted.", "user.virtiofs."),
        XattrMapRule("bad", "server", "", "trusted."),
        XattrMapRule("bad", "client", "user.virtiofs.", ""),
        XattrMapRule("ok", "all", "", ""))
    assert XattrMapRule.parse_all(":map::user.virtiofs.:") == (
        XattrMapRule("prefix", "all", "", "user.virtiofs."), XattrMapRule("bad", "all", "", ""))
    c = parse(BASE + ["--xattrmap=:map::user.virtiofs.:"])
    assert c.xattr and len(c.xattrmap) == 2
    for bad in ("", "   ", ":prefix:all:a:", ":frob:all:::", ":ok:everyone:::", "aokaallaaa",
                ":map:key::"):
        with pytest.raises(ValueError):
            XattrMapRule.parse_all(bad)


def test_options_implying_xattr():
    assert parse(BASE + ["--no-xattr"]).xattr is False
    assert parse(BASE + ["--posix-acl"]).xattr is True
    assert parse(BASE + ["--security-label"]).xattr is True
    with pytest.raises(UsageError, match="--security-label"):
        parse(BASE + ["--no-xattr", "--security-label"])


def test_capabilities_json_is_what_libvirt_reads():
    import json
    caps = json.loads(options.capabilities_json())
    assert caps["type"] == "fs" and isinstance(caps["features"], list)
    # libvirt refuses <lock> settings for a daemon announcing separate-options, and
    # migration is not implemented
    assert "separate-options" not in caps["features"]
    assert "migrate-precopy" not in caps["features"]


def _long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", help_text))


def _short_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?m)^\s+(-\w)\b", help_text))


def test_every_option_of_the_rust_virtiofsd_is_accepted():
    rust = peers.find_rust_virtiofsd()
    theirs = _long_options(subprocess.run([rust, "--help"], stdout=subprocess.PIPE, text=True,
                                          check=True).stdout)
    assert len(theirs) >= 38, theirs  # the help text was read
    ours = _long_options(options.build_parser().format_help())
    assert theirs - ours == set()
    rust_help = subprocess.run([rust, "--help"], stdout=subprocess.PIPE, text=True).stdout
    assert _short_options(rust_help) == {"-o", "-d", "-f", "-h", "-V"}
    assert _short_options(rust_help) <= _short_options(options.build_parser().format_help())
    # and each one parses (a value where it takes one)
    values = {"--shared-dir": "/d", "--tag": "t", "--socket": "/s", "--socket-path": "/s",
              "--socket-group": "g", "--fd": "3", "--thread-pool-size": "4",
              "--xattrmap": ":ok:all:::", "--sandbox": "none", "--seccomp": "kill",
              "--inode-file-handles": "prefer", "--cache": "never", "--modcaps": "+chown",
              "--log-level": "trace", "--rlimit-nofile": "100", "--uid-map": ":0:0:1:",
              "--gid-map": ":0:0:1:", "--translate-uid": "map:0:0:1",
              "--translate-gid": "map:0:0:1", "--migration-mode": "find-paths",
              "--migration-on-error": "abort"}
    parser = options.build_parser()
    for opt in sorted(theirs - {"--help"}):  # --help exits; its output is the check above
        argv = [f"{opt}={values[opt]}"] if opt in values else [opt]
        parser.parse_args(argv)  # raises UsageError if refused

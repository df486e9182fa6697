"""Local file system semantics, proven differentially in a real guest: every conformance case
(src/pyvirtiofs/testing/conformance.py) must give the same result on the pyvirtiofs mount as
on the guest's own tmpfs; a case whose result depends on the backing file system may instead
give the host file system's result, and a known difference must give exactly its listed
result (conformance_runner.BACKING_FS_CASES, KNOWN_DIFFERENCES)."""

import pytest

from pyvirtiofs.testing import conformance_runner

pytestmark = pytest.mark.guest

# What each cache mode is expected to show as a known difference: no more, no fewer
EXPECTED_KNOWN = {"auto": {"xattr_trusted_security"},
                  "never": {"xattr_trusted_security", "data_mmap_shared"}}


# The last run: the whole sandbox (the default as root), the seccomp allow-list with kill as its
# action and inodes held as file handles; any system call off the list kills the daemon, which
# the e2e conftest reports (and the guest's next request then fails).
HARDENED = ["--seccomp=kill", "--inode-file-handles=mandatory"]


@pytest.mark.parametrize("cache,daemon_args", [("auto", []), ("never", []), ("auto", HARDENED)],
                         ids=["auto", "never", "auto-seccomp-kill-file-handles"])
def test_conformance_fast_subset_matches_local_fs(cache, daemon_args):
    report = conformance_runner.run("pyvirtiofsd", fast=True, cache=cache,
                                    daemon_args=daemon_args)
    assert len(report.results) >= 36
    bad = [report.describe(r) for r in report.failures]
    assert not bad, "virtiofs differs from local file systems:\n" + "\n".join(bad)
    known = {r.name for r in report.results if r.verdict == "known"}
    assert known == EXPECTED_KNOWN[cache]
    # the symlink's own times and owner (once EOPNOTSUPP) behave as on tmpfs
    assert {r.name: r.verdict for r in report.results}["setattr_symlink"] == "same"

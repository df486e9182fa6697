"""Local file system semantics, proven differentially in a real guest: every conformance case
(src/pyvirtiofs/testing/conformance.py) must give the same result on the pyvirtiofs mount as
on the guest's own tmpfs, or as natively on the host file system behind the share."""

import pytest

from pyvirtiofs.testing import conformance_runner

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("cache", ["auto", "never"])
def test_conformance_fast_subset_matches_local_fs(cache):
    report = conformance_runner.run("pyvirtiofsd", fast=True, cache=cache)
    assert len(report.results) >= 35
    bad = [report.describe(r) for r in report.failures]
    assert not bad, "virtiofs differs from local file systems:\n" + "\n".join(bad)
    known = {r.name for r in report.results if r.verdict == "known"}
    assert all(n in conformance_runner.KNOWN_DIFFERENCES
               or f"{n}@{cache}" in conformance_runner.KNOWN_DIFFERENCES for n in known)

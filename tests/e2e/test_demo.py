"""The README's main command works: the demo boots a guest against pyvirtiofsd and files
cross in both directions."""

import subprocess
import sys

import pytest

from .conftest import daemon_env

pytestmark = pytest.mark.guest


def test_demo_shows_files_crossing_both_ways(guest_ready):
    r = subprocess.run([sys.executable, "-m", "pyvirtiofs.demo"], env=daemon_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hello from the host" in r.stdout          # read by the guest
    assert "hello from the guest" in r.stdout         # read back on the host
    assert "OK: the guest read the host's file and the host reads the guest's file." in r.stdout

"""The file system API serves a real guest: examples/hello_fs.py, as shown in the README."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtiofs.testing import guestvm

from .conftest import daemon_env

pytestmark = pytest.mark.guest
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello_fs.py"


def test_hello_example_serves_a_guest(guest_ready, short_tmp):
    sock = str(Path(short_tmp) / "hello.sock")
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), sock], env=daemon_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if Path(sock).exists():
                break
            time.sleep(0.05)
        res = guestvm.run_guest("ls; cat hello; cat missing 2>&1; touch new 2>&1; true",
                                [guestvm.Share("hello", socket=sock)], daemons=[proc], timeout=120)
    finally:
        proc.kill()
        err = proc.communicate()[1]
    lines = res.output.splitlines()
    assert lines[0] == "hello" and lines[1] == "hello from Python", res.output
    assert "No such file" in lines[2]
    assert "Traceback" not in err

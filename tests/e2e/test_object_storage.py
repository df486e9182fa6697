"""pyvirtiofsd --source=s3://bucket/prefix gives a real guest a share of a bucket on an S3 API
server (moto's, on loopback, started and stopped by the fixture): the guest lists, reads with
checksums, writes a 100 MiB file (13 multipart parts), renames and deletes; the bucket is
checked through boto3.  The same workload on memory://, and a guest working through a store
that answers 500s.  (100 MiB rather than 20 costs CI about 40 s for both tests, measured.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import boto3
import pytest

from pyvirtiofs.testing import guestvm
from .conftest import daemon_env
from tests.faultproxy import FaultProxy
from tests.unit.test_fsspec_s3 import Daemon, _boto_creds, s3_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.guest

SCRIPT = """
set -e
ls | tr '\\n' ' '; echo
sha256sum docs/a.bin | cut -d' ' -f1
dd if=/dev/urandom of=/tmp/w bs=1M count=100 2>/dev/null
sha256sum /tmp/w | cut -d' ' -f1
cp /tmp/w written.bin
sync
mv docs/a.bin docs/renamed.bin
rm docs/gone.txt
ls docs | tr '\\n' ' '; echo
sha256sum written.bin | cut -d' ' -f1
"""


def test_a_guest_works_on_a_bucket(guest_ready, short_tmp, s3_server):  # noqa: F811
    s3 = boto3.client("s3", endpoint_url=s3_server, **_boto_creds())
    s3.create_bucket(Bucket="guest")
    body = os.urandom(3 << 20)
    s3.put_object(Bucket="guest", Key="pre/docs/a.bin", Body=body)
    s3.put_object(Bucket="guest", Key="pre/docs/gone.txt", Body=b"delete me\n")
    d = Daemon(short_tmp, "s3://guest/pre", s3_server)
    try:
        res = guestvm.run_guest(SCRIPT, [guestvm.Share("ex", socket=d.sock)],
                                daemons=[d.proc], timeout=400)
    finally:
        err = d.stop()
    assert d.proc.returncode == 0 and "Traceback" not in err, err
    assert res.status == 0, res.output
    lines = res.output.split("\n")
    lines = [x.strip() for x in lines if x.strip()]
    assert lines[0] == "docs", res.output
    assert lines[1] == hashlib.sha256(body).hexdigest(), res.output
    written_sum = lines[2]
    assert lines[3] == "renamed.bin", res.output
    assert lines[4] == written_sum, res.output
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="guest")["Contents"]}
    assert keys == {"pre/docs/renamed.bin": len(body), "pre/written.bin": 100 << 20}, keys
    got = s3.get_object(Bucket="guest", Key="pre/written.bin")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == written_sum
    renamed = s3.get_object(Bucket="guest", Key="pre/docs/renamed.bin")["Body"].read()
    assert renamed == body


MEMORY_SCRIPT = """
set -e
mkdir d
dd if=/dev/urandom of=/tmp/w bs=1M count=100 2>/dev/null
cp /tmp/w d/w.bin
sync
echo 3 > /proc/sys/vm/drop_caches
cmp /tmp/w d/w.bin && echo same
mv d/w.bin d/v.bin
ls d
cmp /tmp/w d/v.bin && echo still-same
rm d/v.bin
rmdir d
ls | wc -l
"""


def test_the_same_workload_on_memory(guest_ready, short_tmp):
    """memory:// (the store lives in the daemon): what the guest wrote reads back after the
    guest dropped its caches, and survives a rename."""
    sock = str(short_tmp / "mem.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtiofs", f"--socket-path={sock}",
                             "--source=memory://guest"], env=daemon_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if os.path.exists(sock) or proc.poll() is not None:
                break
            time.sleep(0.05)
        res = guestvm.run_guest(MEMORY_SCRIPT, [guestvm.Share("ex", socket=sock)],
                                daemons=[proc], timeout=400)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert res.status == 0, res.output
    assert res.output.split() == ["same", "v.bin", "still-same", "0"], res.output


FAULT_SCRIPT = """
dd if=/dev/urandom of=/tmp/k bs=1M count=4 2>/dev/null
dd if=/tmp/k of=kept.bin bs=1M conv=fsync 2>/dev/null && echo kept-fsynced
sha256sum /tmp/k | cut -d' ' -f1
exec 3>pending.bin 5<fault-off/x  # opened before the fault
x=$(echo)                         # a child's exit flushes fd 3: pending.bin is stored empty
ls fault-on >/dev/null            # the proxy answers 500s to every request after this one
sleep 2                           # the daemon's 1 s listing cache expires
cat docs/b.txt >/dev/null 2>/tmp/e; echo "read $? $(cat /tmp/e)"
ls docs >/dev/null 2>/tmp/e; echo "ls $? $(cat /tmp/e)"
dd if=/tmp/k of=/proc/self/fd/3 bs=1M count=1 conv=fsync 2>/tmp/e; echo "fsync $? $(cat /tmp/e)"
exec 3>&-                         # close(2): the upload fails again, and is logged
head -c1 <&5 >/dev/null 2>&1      # lists fault-off/ (stat): the store answers again from here
exec 5<&-
sleep 2
sha256sum kept.bin | cut -d' ' -f1
cat docs/b.txt
"""


def test_a_guest_on_a_store_answering_500s_gets_eio_and_loses_nothing_it_fsynced(
        guest_ready, short_tmp, s3_server):  # noqa: F811
    """The store fails while the guest works (tests/faultproxy.py in front of moto, switched by
    the guest listing fault-on/ and fault-off/): reads and listings answer EIO, a write's
    fsync answers EIO, what was fsync'd before stays whole, and all works again after."""
    s3 = boto3.client("s3", endpoint_url=s3_server, **_boto_creds())
    s3.create_bucket(Bucket="faults")
    for key in ("pre/docs/b.txt", "pre/fault-on/x", "pre/fault-off/x"):
        s3.put_object(Bucket="faults", Key=key, Body=b"served again\n")
    with FaultProxy(s3_server) as proxy:
        proxy.switch_when("prefix=pre%2Ffault-on%2F", "500")
        # fault-off/ is listed before the fault too: switching to "pass" then changes nothing
        proxy.switch_when("prefix=pre%2Ffault-off%2F", "pass")
        d = Daemon(short_tmp, "s3://faults/pre", proxy.url)
        try:
            res = guestvm.run_guest(FAULT_SCRIPT, [guestvm.Share("ex", socket=d.sock)],
                                    daemons=[d.proc], timeout=400)
        finally:
            err = d.stop()
    assert d.proc.returncode == 0 and "Traceback" not in err, err
    assert res.status == 0, res.output
    errors = [x for x in err.splitlines() if " ERROR " in x]
    assert errors and all("We encountered an internal error" in x
                          or "the last writes were never uploaded" in x for x in errors), err
    assert proxy.seen("500") > 0, proxy.log
    lines = [x.strip() for x in res.output.split("\n") if x.strip()]
    assert lines[0] == "kept-fsynced", res.output
    kept_sum = lines[1]
    assert lines[2].startswith("read 1 ") and "Input/output error" in lines[2], res.output
    assert lines[3].startswith("ls 1 ") and "Input/output error" in lines[3], res.output
    assert lines[4].startswith("fsync 1 ") and "Input/output error" in lines[4], res.output
    assert lines[5:] == [kept_sum, "served again"], res.output
    got = s3.get_object(Bucket="faults", Key="pre/kept.bin")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == kept_sum
    # its write failed (and said so): the object is as uploaded before the fault, empty
    assert s3.get_object(Bucket="faults", Key="pre/pending.bin")["Body"].read() == b""

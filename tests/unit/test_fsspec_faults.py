"""pyvirtiofsd --source=s3://... when the store fails: 500s, a stalled store, dropped
connections (tests/faultproxy.py, a proxy on loopback in front of moto's S3 server that the
test switches at run time), and credentials revoked while serving.  The guest side is the
test frontend; the bucket is checked through boto3, straight at moto (not through the proxy).

What a user notices: an errno (EIO, EACCES) within a bounded time instead of a request that
hangs for minutes; other requests answered meanwhile; a write that could not be uploaded
reported at fsync and close, never dropped silently; what was fsync'd before still whole."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import boto3
import pytest

from pyvirtiofs.testing import frontend as F
from pyvirtiofs.testing.frontend import FUSE_ROOT_ID, FuseClient, FuseError, Op
from tests.faultproxy import FaultProxy
from tests.unit.test_fsspec_s3 import (SRC, Daemon, _boto_creds, moto_server,  # noqa: F401
                                       s3_server)

STALL_LIMITS = '--source-option=config_kwargs=' + json.dumps(
    {"connect_timeout": 2, "read_timeout": 5})  # shorter than the defaults: a quicker test


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


@pytest.fixture
def bucket(s3_server, request):
    s3 = boto3.client("s3", endpoint_url=s3_server, **_boto_creds())
    name = "f-" + request.node.name.replace("_", "-")[:50].lower()
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="pre/docs/a.txt", Body=b"hello object\n")
    return s3, name


def start(tmp_path, bucket, proxy, *extra):
    d = Daemon(tmp_path, f"s3://{bucket[1]}/pre", proxy.url, *extra)
    assert d.proc.poll() is None, d.stop()
    return d


def finish(d: Daemon) -> str:
    out = d.stop()
    assert d.proc.returncode == 0 and "Traceback" not in out, out
    return out


def connect(d: Daemon) -> FuseClient:
    c = FuseClient.connect(d.sock)
    c.timeout = 120  # a bound on the test, far above what the daemon may take
    return c


def err(fn, *args):
    with pytest.raises(FuseError) as ei:
        fn(*args)
    return ei.value.errno


def names(c, nodeid):
    return sorted(e.name for e in c.listdir(nodeid) if e.name not in (b".", b".."))


def expire_listings():
    time.sleep(1.2)  # the daemon caches listings 1 s


def test_500s_answer_eio_after_three_attempts_and_the_daemon_recovers(tmp_path, bucket, proxy):
    d = start(tmp_path, bucket, proxy)  # the default limits
    try:
        with connect(d) as c:
            a = c.lookup(c.lookup(FUSE_ROOT_ID, b"docs").nodeid, b"a.txt")
            proxy.mode = "500"
            expire_listings()
            n, t = proxy.requests, time.monotonic()
            assert err(c.lookup, FUSE_ROOT_ID, b"new") == errno.EIO
            # one listing, tried 3 times (s3fs's 5 tries of botocore's 5 took minutes)
            assert proxy.requests - n == 3, proxy.log[n:]
            assert time.monotonic() - t < 60
            assert err(c.open, a.nodeid) == errno.EIO
            assert err(c.listdir, FUSE_ROOT_ID) == errno.EIO
            assert c.getattr(FUSE_ROOT_ID).attr.mode & 0o170000 == 0o040000  # still serving
            proxy.mode = "pass"
            assert names(c, FUSE_ROOT_ID) == [b"docs"]
            fh = c.open(a.nodeid).fh
            assert c.read(a.nodeid, fh, 0, 100) == b"hello object\n"
            c.release(a.nodeid, fh)
    finally:
        out = finish(d)
    assert "listing /: OSError: We encountered an internal error" in out, out


def test_a_failed_upload_is_reported_at_fsync_and_close_and_fsynced_data_stays(
        tmp_path, bucket, proxy):
    s3, b = bucket
    v1, v2, v3 = os.urandom(1 << 20), os.urandom(1 << 20), os.urandom(20 << 20)
    d = start(tmp_path, bucket, proxy)
    try:
        with connect(d) as c:
            e, o = c.create(FUSE_ROOT_ID, b"f.bin", flags=os.O_WRONLY | os.O_CREAT)
            c.write(e.nodeid, o.fh, 0, v1)
            c.fsync(e.nodeid, o.fh)
            proxy.mode = "500"
            c.write(e.nodeid, o.fh, 0, v2)
            assert err(c.fsync, e.nodeid, o.fh) == errno.EIO
            assert err(c.flush, e.nodeid, o.fh) == errno.EIO  # close(2) says so too
            assert s3.get_object(Bucket=b, Key="pre/f.bin")["Body"].read() == v1
            proxy.mode = "pass"
            c.fsync(e.nodeid, o.fh)  # the spool kept v2: the next fsync uploads it
            assert s3.get_object(Bucket=b, Key="pre/f.bin")["Body"].read() == v2
            # a multipart upload (8 MiB parts) that fails after two of its requests: aborted,
            # not completed with parts missing; the object stays v2
            for off in range(0, len(v3), 1 << 20):
                c.write(e.nodeid, o.fh, off, v3[off:off + (1 << 20)])
            proxy.fail_after(2, "500")
            assert err(c.fsync, e.nodeid, o.fh) == errno.EIO
            assert s3.get_object(Bucket=b, Key="pre/f.bin")["Body"].read() == v2
            proxy.mode = "pass"
            c.flush(e.nodeid, o.fh)
            c.release(e.nodeid, o.fh)
            got = s3.get_object(Bucket=b, Key="pre/f.bin")["Body"].read()
            assert got == v3
    finally:
        out = finish(d)
    assert out.count("uploading /f.bin failed: OSError") == 3, out


def test_a_stalled_store_times_out_and_other_requests_are_served_meanwhile(
        tmp_path, bucket, proxy):
    d = start(tmp_path, bucket, proxy, STALL_LIMITS)
    try:
        with connect(d) as c:
            assert names(c, FUSE_ROOT_ID) == [b"docs"]
            proxy.mode = "hang"
            expire_listings()
            t = time.monotonic()
            stalled = c.submit(Op.LOOKUP, FUSE_ROOT_ID, [b"new\0"], [F.ENTRY_OUT_SIZE])
            # the root's attributes need no store: answered while the lookup waits (3 reads
            # of 5 s each); a daemon serving one request at a time answers it after
            st = c.submit(Op.GETATTR, FUSE_ROOT_ID, [bytes(16)], [F.ATTR_OUT_SIZE])
            c.wait(st, timeout=4).check()
            assert stalled not in c.poll_completions(), "the lookup was answered first"
            with pytest.raises(FuseError) as ei:
                c.wait(stalled).check()
            assert ei.value.errno == errno.EIO
            assert 10 < time.monotonic() - t < 90  # 3 attempts of 5 s (read_timeout)
            proxy.mode = "drop"
            n = proxy.requests
            assert err(c.lookup, FUSE_ROOT_ID, b"new") == errno.EIO
            # 3 attempts; aiohttp sends a request again once when the connection drops
            assert 3 <= proxy.requests - n <= 6, proxy.log[n:]
            proxy.mode = "pass"
            assert c.lookup(FUSE_ROOT_ID, b"docs").attr.mode & 0o170000 == 0o040000
    finally:
        out = finish(d)
    assert "listing /: ReadTimeoutError: Read timeout" in out, out
    assert "listing /: ConnectionClosedError" in out, out


def test_a_slow_store_is_served_and_listed_once_for_many_lookups(tmp_path, bucket, proxy):
    s3, b = bucket
    for i in range(3):
        s3.put_object(Bucket=b, Key=f"pre/docs/f{i}", Body=b"slow")
    d = start(tmp_path, bucket, proxy)
    try:
        with connect(d) as c:
            docs = c.lookup(FUSE_ROOT_ID, b"docs")
            proxy.delay = 1.5  # every answer takes longer than the 1 s the listing is kept
            expire_listings()
            n = proxy.requests
            for i in range(3):
                assert c.lookup(docs.nodeid, f"f{i}".encode()).attr.size == 4
            # kept from when it arrived: not stale on arrival, not listed again per name
            listings = [x for x in proxy.log[n:] if "prefix=pre%2Fdocs%2F" in x]
            assert len(listings) == 1, proxy.log[n:]
    finally:
        finish(d)


def test_writing_many_files_into_one_directory_does_not_list_it_for_each(
        tmp_path, bucket, proxy):
    s3, b = bucket
    d = start(tmp_path, bucket, proxy)
    try:
        with connect(d) as c:
            docs = c.lookup(FUSE_ROOT_ID, b"docs")
            n = proxy.requests
            for i in range(6):
                name = f"w{i}".encode()
                assert err(c.lookup, docs.nodeid, name) == errno.ENOENT  # as a guest's open
                e, o = c.create(docs.nodeid, name)
                c.write(e.nodeid, o.fh, 0, b"%d" % i)
                c.flush(e.nodeid, o.fh)
                c.release(e.nodeid, o.fh)
            # the upload puts the new name into the cached listing instead of dropping it
            listings = [x for x in proxy.log[n:] if "prefix=pre%2Fdocs%2F" in x]
            assert len(listings) <= 2, proxy.log[n:]  # the cache lasts 1 s
            assert [c.lookup(docs.nodeid, b"w%d" % i).attr.size for i in range(6)] == [1] * 6
            c.unlink(docs.nodeid, b"w0")
            assert err(c.lookup, docs.nodeid, b"w0") == errno.ENOENT
    finally:
        finish(d)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=b, Prefix="pre/docs/")["Contents"]}
    assert keys == {"pre/docs/a.txt"} | {f"pre/docs/w{i}" for i in range(1, 6)}


def test_credentials_revoked_while_serving_answer_eacces(tmp_path):
    # moto checks keys against its IAM once its first 3 requests (these below) are done
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="3") as url:
        iam = boto3.client("iam", endpoint_url=url, **_boto_creds())
        iam.create_user(UserName="guest")
        iam.put_user_policy(UserName="guest", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="guest")["AccessKey"]
        creds = dict(aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        s3 = boto3.client("s3", endpoint_url=url, **creds)
        s3.create_bucket(Bucket="creds")
        s3.put_object(Bucket="creds", Key="pre/a.txt", Body=b"readable\n")
        d = Daemon(tmp_path, "s3://creds/pre", url, f"--source-option=key={key['AccessKeyId']}",
                   f"--source-option=secret={key['SecretAccessKey']}")
        try:
            with connect(d) as c:
                a = c.lookup(FUSE_ROOT_ID, b"a.txt")
                e, o = c.create(FUSE_ROOT_ID, b"new.txt")
                c.write(e.nodeid, o.fh, 0, b"not uploaded yet")
                boto3.client("iam", endpoint_url=url, **creds).delete_access_key(
                    UserName="guest", AccessKeyId=key["AccessKeyId"])
                expire_listings()
                assert err(c.lookup, FUSE_ROOT_ID, b"other") == errno.EACCES
                assert err(c.open, a.nodeid) == errno.EACCES
                assert err(c.fsync, e.nodeid, o.fh) == errno.EACCES
                assert err(c.flush, e.nodeid, o.fh) == errno.EACCES
                c.release(e.nodeid, o.fh)
                assert c.getattr(FUSE_ROOT_ID).attr.mode & 0o170000 == 0o040000
        finally:
            out = finish(d)
    assert "listing /: PermissionError: The AWS Access Key Id you provided does not exist" \
        in out, out


def test_config_kwargs_that_is_not_an_object_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyvirtiofs", f"--socket-path={tmp_path}/s",
                        "--source=s3://b/p", "--source-option=config_kwargs=5"],
                       env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("pyvirtiofsd: --source s3://b/p: config_kwargs must be a JSON "
                               "object") and r.stderr.count("\n") == 1, r.stderr

"""pyvirtiofsd --source=s3://bucket/prefix against a real S3 API server on loopback (moto's
server mode, started and stopped here), driven through the test frontend; the bucket is
checked through boto3 afterwards.  Also: the command line's --source errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from pyvirtiofs.testing.frontend import FuseClient, FuseError

SRC = str(Path(__file__).resolve().parents[2] / "src")
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(**env: str):
    """moto's S3 API server on a loopback port: its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, **CREDS, **env))
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"moto server exited: {proc.stderr.read().decode()}")
                time.sleep(0.1)
        else:
            pytest.fail("moto server did not listen within 30 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def s3_server():
    with moto_server() as url:
        yield url


@pytest.fixture
def bucket(s3_server, request):
    s3 = boto3.client("s3", endpoint_url=s3_server, **_boto_creds())
    name = "b-" + request.node.name.replace("_", "-")[:50].lower()
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="pre/docs/a.txt", Body=b"hello object\n")
    s3.put_object(Bucket=name, Key="outside.txt", Body=b"not served\n")
    return s3, name


def _boto_creds():
    return dict(aws_access_key_id="testing", aws_secret_access_key="testing",
                region_name="us-east-1")


class Daemon:
    def __init__(self, tmp: Path, url: str, endpoint: str, *extra: str):
        self.sock = str(tmp / "d.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtiofs", f"--socket-path={self.sock}",
             f"--source={url}", f"--source-option=endpoint_url={endpoint}", *extra],
            env=dict(os.environ, PYTHONPATH=SRC, **CREDS), stderr=subprocess.PIPE, text=True)
        for _ in range(300):
            if os.path.exists(self.sock) or self.proc.poll() is not None:
                break
            time.sleep(0.05)

    def stop(self) -> str:
        """The daemon's stderr; it ends by itself once the frontend has left."""
        try:
            return self.proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the daemon did not exit after the frontend left:\n"
                                 + self.proc.communicate()[1]) from None


@pytest.fixture
def daemon(tmp_path, s3_server, bucket):
    d = Daemon(tmp_path, f"s3://{bucket[1]}/pre", s3_server)
    yield d
    err = d.stop()
    assert "Traceback" not in err and d.proc.returncode in (0, -signal.SIGKILL), err


def err(fn, *args, **kw):
    with pytest.raises(FuseError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def names(c, nodeid):
    return sorted(e.name for e in c.listdir(nodeid) if e.name not in (b".", b".."))


def test_a_bucket_prefix_is_served(daemon, bucket):
    s3, b = bucket
    body = os.urandom(3 << 20)  # several ranged GETs
    s3.put_object(Bucket=b, Key="pre/big.bin", Body=body)
    with FuseClient.connect(daemon.sock) as c:
        assert names(c, 1) == [b"big.bin", b"docs"]  # outside.txt is outside the prefix
        d = c.lookup(1, b"docs")
        a = c.lookup(d.nodeid, b"a.txt")
        fh = c.open(a.nodeid).fh
        assert c.read(a.nodeid, fh, 0, 100) == b"hello object\n"
        c.release(a.nodeid, fh)
        big = c.lookup(1, b"big.bin")
        assert big.attr.size == len(body)
        fh = c.open(big.nodeid).fh
        got = b"".join(c.read(big.nodeid, fh, off, 128 << 10)
                       for off in range(0, len(body), 128 << 10))
        c.release(big.nodeid, fh)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest()


def test_fsync_makes_a_write_durable_even_if_the_daemon_is_killed(daemon, bucket):
    s3, b = bucket
    data = os.urandom(17 << 20)  # above two 8 MiB parts: a multipart upload (8 + 8 + 1)
    with FuseClient.connect(daemon.sock) as c:
        e, o = c.create(1, b"new.bin", flags=os.O_WRONLY | os.O_CREAT)
        for off in range(0, len(data), 1 << 20):
            c.write(e.nodeid, o.fh, off, data[off:off + (1 << 20)])
        assert "Contents" not in s3.list_objects_v2(Bucket=b, Prefix="pre/new.bin")
        c.fsync(e.nodeid, o.fh)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
    got = s3.get_object(Bucket=b, Key="pre/new.bin")["Body"].read()
    assert s3.head_object(Bucket=b, Key="pre/new.bin")["ETag"].endswith('-3"')  # 3 parts
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def test_close_uploads_rename_copies_unlink_deletes(daemon, bucket):
    s3, b = bucket
    with FuseClient.connect(daemon.sock) as c:
        d = c.mkdir(1, b"dir")
        e, o = c.create(d.nodeid, b"f.txt")
        c.write(e.nodeid, o.fh, 0, b"written by the guest")
        c.flush(e.nodeid, o.fh)  # close(2)
        c.release(e.nodeid, o.fh)
        assert s3.get_object(Bucket=b, Key="pre/dir/f.txt")["Body"].read() == \
            b"written by the guest"
        c.rename(d.nodeid, b"f.txt", 1, b"g.txt")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]}
        assert "pre/g.txt" in keys and "pre/dir/f.txt" not in keys
        c.unlink(1, b"g.txt")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]}
        assert "pre/g.txt" not in keys
        assert err(c.lookup, 1, b"g.txt") == errno.ENOENT
        a = c.lookup(c.lookup(1, b"docs").nodeid, b"a.txt")
        assert err(c.link, a.nodeid, 1, b"hard") == errno.EPERM
        assert err(c.symlink, 1, b"sym", b"docs/a.txt") == errno.EPERM
        assert err(c.setattr, a.nodeid, mode=0o600) == errno.EPERM
        assert err(c.unlink, 1, b"docs") == errno.EISDIR
        assert err(c.rmdir, 1, b"docs") == errno.ENOTEMPTY


def test_a_missing_bucket_answers_enoent_and_the_daemon_keeps_serving(tmp_path, s3_server):
    d = Daemon(tmp_path, "s3://no-such-bucket/pre", s3_server)
    try:
        with FuseClient.connect(d.sock) as c:
            assert err(c.lookup, 1, b"anything") == errno.ENOENT
            e, o = c.create(1, b"new")  # in the spool: the store is asked at close
            c.write(e.nodeid, o.fh, 0, b"lost?")
            assert err(c.fsync, e.nodeid, o.fh) == errno.EIO  # reported, not dropped
            assert err(c.flush, e.nodeid, o.fh) == errno.EIO
            c.release(e.nodeid, o.fh)
            assert c.getattr(1).attr.mode & 0o170000 == 0o040000  # still serving
    finally:
        out = d.stop()
    assert "Traceback" not in out and d.proc.returncode == 0, out


def test_refused_credentials_stop_the_daemon_at_start_with_one_line(tmp_path):
    # moto checks keys against its IAM once INITIAL_NO_AUTH_ACTION_COUNT requests are done
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        d = Daemon(tmp_path, "s3://any/pre", url)
        out = d.stop()
    assert d.proc.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("pyvirtiofsd: --source s3://any/pre: ") and "Traceback" not in out, out


def test_source_and_shared_dir_exclude_each_other(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyvirtiofs", f"--socket-path={tmp_path}/s",
                        "--source=memory://x", f"--shared-dir={tmp_path}"],
                       env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == "pyvirtiofsd: --source and --shared-dir exclude each other\n"


def test_without_fsspec_the_option_says_what_to_install(tmp_path):
    fake = tmp_path / "nofsspec" / "fsspec"  # an fsspec that cannot be imported
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named fsspec')\n")
    r = subprocess.run([sys.executable, "-m", "pyvirtiofs", f"--socket-path={tmp_path}/s",
                        "--source=s3://b/p"],
                       env=dict(os.environ, PYTHONPATH=f"{fake.parent}:{SRC}"),
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "pip install 'pyvirtiofs[fsspec]'" in r.stderr, r.stderr

"""Any fsspec file system (S3, GCS, Azure, HTTP, memory://, zip::...) served at the path level.

What an object store can and cannot do, and what the guest sees (README "Object storage"):

- Directories are key prefixes.  ``mkdir`` makes an empty directory that exists in this daemon
  (and in stores with real directories) until a file is written under it.
- Reads are ranged GETs through fsspec's read-ahead cache (``block_size`` bytes at a time).
- Writes go to a local spool file and are uploaded whole with the store's ``put_file`` (for S3
  a multipart upload above two parts, aborted if a part fails: the older object stays) on
  close and on fsync; fsync returns once the store has the object.  An upload that fails
  answers EIO (EACCES when the store refuses the credentials) to that close or fsync and is
  logged; the data stays in the spool and the next fsync/close tries again.
- Every error from the store's client becomes an errno for the guest (ENOENT, EACCES, else
  EIO) and one line in the log.  For S3 the client's retries and timeouts are bounded
  (``S3_LIMITS``), so a failing or stalled store answers within a stated time.  Opening an existing object for writing without O_TRUNC
  downloads it into the spool first: the whole object is rewritten on close.
- rename is copy then delete (not atomic; a directory is renamed object by object).
- No hard links, symbolic links or device nodes (EPERM, as link(2)/symlink(2)/mknod(2) say for
  a file system that does not support them); no owners or modes (chmod/chown: EPERM); times are
  the store's (utimens is accepted and changes nothing).
- Listings are cached for ``listing_timeout`` seconds (the guest caches names and attributes as
  long); changes made through this daemon drop the cache at once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import posixpath
import stat
import tempfile
import threading
import time
from typing import Any, Iterable

from .filesystem import Attr, FsError, StatFs
from .pathfs import PathFileSystem

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pyvirtiofs[fsspec]' (and 'pyvirtiofs[s3]' for s3://)"

# Bounds on each request to an S3 store (botocore's Config; ``--source-option
# config_kwargs={...}`` overrides them key by key).  Left to s3fs and botocore's defaults, a
# store answering 500s was retried for minutes while the guest's fsync (and the daemon's
# exit) waited.  With these, one request gives up after 3 attempts, each abandoned after 5 s
# without a connection or 15 s without a byte of the answer (plus up to a few seconds of
# backoff): about a minute at worst, a few seconds when the store answers errors at once.
S3_LIMITS = {"connect_timeout": 5, "read_timeout": 15,
             "retries": {"total_max_attempts": 3, "mode": "standard"}}


def open_url(url: str, options: dict[str, Any] | None = None):
    """``(fsspec file system, root path)`` for ``url``; ImportError names what to install."""
    try:
        import fsspec.core
    except ImportError:
        raise ImportError(f"--source needs fsspec: {INSTALL_HINT}") from None
    options = dict(options or {})
    is_s3 = fsspec.core.split_protocol(url)[0] in ("s3", "s3a")
    if is_s3:
        given = options.get("config_kwargs", {})
        if not isinstance(given, dict):
            raise ValueError("config_kwargs must be a JSON object, e.g. "
                             "config_kwargs='{\"read_timeout\": 5}'")
        options["config_kwargs"] = {**S3_LIMITS, **given}
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # a backend (s3fs, gcsfs...) is missing: fsspec says which
        raise ImportError(f"--source {url}: {e}") from None
    if is_s3:
        fs.retries = 1  # botocore retries as bounded above; s3fs's own loop would multiply them
    return fs, root


@contextlib.contextmanager
def _store(what: str, *args: Any):
    """Turn whatever the store's client raises into an errno for the guest (ENOENT, EACCES,
    else EIO), logging one line: ``what % args`` and the store's message."""
    try:
        yield
    except FsError:
        raise
    except FileNotFoundError:
        raise FsError(errno.ENOENT) from None
    except Exception as e:  # botocore's and aiohttp's errors are not all OSErrors
        log.error("%s: %s", what % args, _message(e))
        raise FsError(errno.EACCES if isinstance(e, PermissionError) else errno.EIO) from None


def _message(e: BaseException) -> str:
    text = str(getattr(e, "strerror", None) or e).strip().splitlines()  # no "[Errno 121]"
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _mtime_ns(info: dict) -> int:
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, datetime.datetime):
            return int(v.timestamp() * 1e9)
        if isinstance(v, (int, float)):
            return int(v * 1e9)
        if isinstance(v, str):
            try:
                return int(datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
                           .timestamp() * 1e9)
            except ValueError:
                continue
    return 0


class _Upload:
    """A file open for writing: its bytes in a local spool file until uploaded."""

    def __init__(self, spool_dir: str | None):
        self.spool = tempfile.TemporaryFile(dir=spool_dir, buffering=0)  # pwrite and copies mix
        self.lock = threading.Lock()
        self.dirty = True   # a new or truncated object is uploaded even when empty
        self.mtime_ns = time.time_ns()

    def size(self) -> int:
        return os.fstat(self.spool.fileno()).st_size


class _Reader:
    """A file open for reading: fsspec's file object (ranged GETs, read-ahead)."""

    def __init__(self, f: Any):
        self.f = f
        self.lock = threading.Lock()  # fsspec file objects are not thread-safe


class FsspecFs(PathFileSystem):
    """Serves the fsspec file system ``fs`` below ``root`` (a bucket/prefix, or "")."""

    serve_in_threads = True  # requests wait on the network: one must not hold up the rest

    def __init__(self, fs: Any, root: str = "", *, listing_timeout: float = 1.0,
                 block_size: int = 4 << 20, part_size: int = 8 << 20,
                 spool_dir: str | None = None):
        self.fs = fs
        self.root = root.rstrip("/")
        self.listing_timeout = listing_timeout
        self.entry_timeout = listing_timeout
        self.block_size = block_size
        self.part_size = part_size  # multipart upload parts (S3's minimum is 5 MiB)
        self.spool_dir = spool_dir
        self._lock = threading.Lock()
        self._listings: dict[str, tuple[float, dict[str, dict]]] = {}
        self._pending: dict[str, _Upload] = {}   # path -> the newest open upload
        self._dirs: set[str] = {"/"}            # directories made by mkdir here
        # put_file's part size, for the stores that take one (s3fs: a single PUT below two)
        self._put_options = ({"chunksize": part_size}
                             if "s3" in _protocols(fs) else {})

    @classmethod
    def from_url(cls, url: str, options: dict[str, str] | None = None, **kw: Any) -> "FsspecFs":
        fs, root = open_url(url, options)
        return cls(fs, root, **kw)

    def check(self) -> None:
        """List the root once, so that a wrong endpoint or refused credentials stop the daemon
        at start with the store's message.  A prefix with nothing under it yet is fine."""
        try:
            self.fs.ls(self._key("/"), detail=False)
        except FileNotFoundError:
            pass

    # -- keys and listings ------------------------------------------------------------------

    def _key(self, path: str) -> str:
        return self.root + path if path != "/" else (self.root or "/")

    def _listing(self, path: str) -> dict[str, dict]:
        """name -> fsspec info of the directory ``path``, cached; ENOENT if none."""
        now = time.monotonic()
        with self._lock:
            hit = self._listings.get(path)
        if hit and now - hit[0] < self.listing_timeout:
            return hit[1]
        try:
            with _store("listing %s", path):
                try:
                    infos = self.fs.ls(self._key(path), detail=True, refresh=True)
                except TypeError:  # a backend without refresh=
                    infos = self.fs.ls(self._key(path), detail=True)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            infos = None
        if infos is None:
            if path in self._dirs:
                infos = []
            else:
                raise FsError(errno.ENOENT)
        key = self._key(path).rstrip("/")
        out = {}
        for info in infos:
            name = info["name"].rstrip("/")
            if name == key:
                if info.get("type") != "directory":
                    raise FsError(errno.ENOTDIR)
                continue  # the directory itself (some backends list it)
            out[posixpath.basename(name)] = info
        with self._lock:
            # valid from when the answer came: a listing that takes longer than the timeout
            # (1,000 keys from a slow store) would otherwise be stale on arrival, and every
            # lookup in that directory would list it again
            self._listings[path] = (time.monotonic(), out)
        return out

    def _changed(self, *paths: str) -> None:
        """Forget the listings of the directories holding ``paths``."""
        with self._lock:
            for p in paths:
                self._listings.pop(posixpath.dirname(p), None)
                self._listings.pop(p, None)

    def _cached_entry(self, path: str, info: dict | None) -> None:
        """Change one name in its directory's cached listing (None: remove it) after this
        daemon changed the store, rather than dropping the listing: writing 1,000 files into
        a directory would otherwise list it again for every file.  Copied, not changed in
        place: other threads may be iterating the old one."""
        parent, name = posixpath.split(path)
        with self._lock:
            hit = self._listings.get(parent)
            if hit is None:
                return
            names = dict(hit[1])
            if info is None:
                names.pop(name, None)
            else:
                names[name] = info
            self._listings[parent] = (hit[0], names)

    def _info(self, path: str) -> dict | None:
        if path == "/":
            return {"type": "directory"}
        with self._lock:
            up = self._pending.get(path)
        if up is not None:
            return {"type": "file", "size": up.size(), "pending": up}
        try:
            info = self._listing(posixpath.dirname(path)).get(posixpath.basename(path))
        except FsError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise  # the store failed: not an answer about this name
            info = None
        if info is None and path in self._dirs:
            return {"type": "directory"}
        return info

    # -- reading ----------------------------------------------------------------------------

    def getattr(self, path: str) -> Attr:
        info = self._info(path)
        if info is None:
            raise FsError(errno.ENOENT)
        if info.get("type") == "directory":
            t = _mtime_ns(info)
            return Attr(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_atime_ns=t,
                        st_mtime_ns=t, st_ctime_ns=t)
        size = int(info.get("size") or 0)
        t = info["pending"].mtime_ns if "pending" in info else _mtime_ns(info)
        return Attr(st_mode=stat.S_IFREG | 0o644, st_size=size, st_blocks=(size + 511) // 512,
                    st_blksize=self.block_size if self.block_size < 1 << 31 else 4096,
                    st_atime_ns=t, st_mtime_ns=t, st_ctime_ns=t)

    def readdir(self, path: str) -> Iterable[str]:
        names = set(self._listing(path))
        with self._lock:  # files not uploaded yet, directories made here
            local = list(self._pending) + list(self._dirs)
        names.update(posixpath.basename(p) for p in local
                     if p != "/" and posixpath.dirname(p) == path)
        return sorted(names)

    def open(self, path: str, flags: int) -> Any:
        info = self._info(path)
        if info is None:
            raise FsError(errno.ENOENT)
        if info.get("type") == "directory":
            raise FsError(errno.EISDIR)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            up = info.get("pending")
            if up is not None:  # not uploaded yet: read what was written
                return up
            with _store("opening %s", path):
                return _Reader(self.fs.open(self._key(path), "rb",
                                            block_size=self.block_size,
                                            cache_type="readahead"))
        up = _Upload(self.spool_dir)
        if flags & os.O_TRUNC or not info.get("size"):
            up.dirty = bool(flags & os.O_TRUNC)
        else:  # no partial overwrite in an object store: fetch it, rewrite it whole
            self._download(path, up)
            up.dirty = False
        with self._lock:
            self._pending[path] = up
        return up

    def _download(self, path: str, up: _Upload) -> None:
        with _store("downloading %s to rewrite it", path):
            self.fs.get_file(self._key(path), _fd_path(up.spool))

    def read(self, path: str, fh: Any, offset: int, size: int) -> bytes:
        if isinstance(fh, _Upload):
            return os.pread(fh.spool.fileno(), size, offset)
        if not isinstance(fh, _Reader):
            raise FsError(errno.EBADF)
        with fh.lock, _store("reading %s at %d", path, offset):
            fh.f.seek(offset)
            return bytes(fh.f.read(size))

    # -- writing ----------------------------------------------------------------------------

    def create(self, path: str, mode: int, flags: int) -> Any:
        parent = posixpath.dirname(path)
        if self._info(parent) is None:
            raise FsError(errno.ENOENT)
        up = _Upload(self.spool_dir)
        with self._lock:
            self._pending[path] = up  # _info and readdir see it there until it is uploaded
        return up

    def write(self, path: str, fh: Any, offset: int, data: bytes) -> int:
        if not isinstance(fh, _Upload):
            raise FsError(errno.EBADF)
        with fh.lock:
            n = os.pwrite(fh.spool.fileno(), data, offset)
            fh.dirty = True
            fh.mtime_ns = time.time_ns()
        return n

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        if isinstance(fh, _Upload):
            with fh.lock:
                os.ftruncate(fh.spool.fileno(), length)
                fh.dirty = True
            return
        with self._lock:
            up = self._pending.get(path)
        if up is not None:
            return self.truncate(path, length, up)
        info = self._info(path)
        if info is None:
            raise FsError(errno.ENOENT)
        if info.get("type") == "directory":
            raise FsError(errno.EISDIR)
        if int(info.get("size") or 0) == length:
            return
        up = _Upload(self.spool_dir)
        try:
            if length:
                self._download(path, up)
            os.ftruncate(up.spool.fileno(), length)
            self._upload(path, up)
        finally:
            up.spool.close()

    def _upload(self, path: str, up: _Upload) -> None:
        """Put the spool in the store, all or nothing (put_file: a failed multipart upload is
        aborted, never completed with parts missing); EIO or EACCES, logged, if it could not."""
        with up.lock:
            if not up.dirty:
                return
            try:
                with _store("uploading %s failed", path):
                    self.fs.put_file(_fd_path(up.spool), self._key(path), **self._put_options)
            except FsError as e:
                if e.errno == errno.EACCES:
                    raise
                raise FsError(errno.EIO) from None  # a missing bucket too: the write failed
            up.dirty = False
            self._cached_entry(path, {"name": self._key(path), "type": "file",
                                      "size": up.size(), "mtime": time.time()})

    def flush(self, path: str, fh: Any) -> None:
        if isinstance(fh, _Upload):
            self._upload(path, fh)

    def fsync(self, path: str, fh: Any, datasync: bool) -> None:
        if isinstance(fh, _Upload):
            self._upload(path, fh)

    def release(self, path: str | None, fh: Any) -> None:
        if isinstance(fh, _Reader):
            with fh.lock:
                fh.f.close()
            return
        if not isinstance(fh, _Upload):
            return
        try:
            if path is not None and fh.dirty:
                self._upload(path, fh)  # flush failed earlier and nobody retried
        except FsError:
            log.error("%s: the last writes were never uploaded (reported to close/fsync)",
                      path)
        finally:
            with self._lock:
                for p, u in list(self._pending.items()):
                    if u is fh:
                        del self._pending[p]
            fh.spool.close()
            if path is not None and fh.dirty:  # not uploaded: what the store has is unknown
                self._changed(path)

    # -- names ------------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> None:
        if self._info(path) is not None:
            raise FsError(errno.EEXIST)
        if self._info(posixpath.dirname(path)) is None:
            raise FsError(errno.ENOENT)
        try:
            self.fs.makedirs(self._key(path), exist_ok=True)
        except Exception as e:  # prefixes need no creating in most stores: it lives here
            log.debug("mkdir %s in the store: %s", path, _message(e))
        with self._lock:
            self._dirs.add(path)
        self._changed(path)

    def _is_dir(self, path: str) -> bool:
        info = self._info(path)
        if info is None:
            raise FsError(errno.ENOENT)
        return info.get("type") == "directory"

    def unlink(self, path: str) -> None:
        if self._is_dir(path):
            raise FsError(errno.EISDIR)
        with self._lock:
            up = self._pending.pop(path, None)
        try:
            with _store("deleting %s", path):
                self.fs.rm_file(self._key(path))
        except FsError as e:
            self._changed(path)
            if e.errno != errno.ENOENT or up is None:
                raise
        self._cached_entry(path, None)

    def rmdir(self, path: str) -> None:
        if not self._is_dir(path):
            raise FsError(errno.ENOTDIR)
        if self.readdir(path):
            raise FsError(errno.ENOTEMPTY)
        try:
            self.fs.rmdir(self._key(path))
        except Exception as e:  # an empty prefix is nothing to remove
            log.debug("rmdir %s in the store: %s", path, _message(e))
        with self._lock:
            self._dirs.discard(path)
        self._changed(path)

    def rename(self, old: str, new: str, flags: int) -> None:
        if flags:
            raise FsError(errno.EINVAL, "RENAME_NOREPLACE/EXCHANGE: not in an object store")
        if old == new:
            return
        old_is_dir = self._is_dir(old)
        target = self._info(new)
        if target is not None:
            if target.get("type") == "directory":
                if not old_is_dir:
                    raise FsError(errno.EISDIR)
                if self.readdir(new):
                    raise FsError(errno.ENOTEMPTY)
            elif old_is_dir:
                raise FsError(errno.ENOTDIR)
        if new.startswith(old + "/"):
            raise FsError(errno.EINVAL)
        with self._lock:
            up = self._pending.get(old)
        if up is not None:
            self._upload(old, up)  # copy what the guest wrote, not the older object
        try:
            with _store("renaming %s to %s", old, new):
                if old_is_dir:
                    self._rename_tree(old, new)
                else:
                    self.fs.copy(self._key(old), self._key(new))
                    self.fs.rm_file(self._key(old))
        finally:
            self._changed(old, new)
        with self._lock:
            for p in [p for p in self._dirs if p == old or p.startswith(old + "/")]:
                self._dirs.discard(p)
                self._dirs.add(new + p[len(old):])
            for p in [p for p in self._pending if p == old or p.startswith(old + "/")]:
                self._pending[new + p[len(old):]] = self._pending.pop(p)
            self._listings.clear()

    def _rename_tree(self, old: str, new: str) -> None:
        src = self._key(old)
        for key in self.fs.find(src):
            rel = key.rstrip("/")[len(src.rstrip("/")):]
            self.fs.copy(key, self._key(new) + rel)
            self.fs.rm_file(key)

    # -- what an object store cannot do ----------------------------------------------------

    def link(self, path: str, new_path: str) -> None:
        raise FsError(errno.EPERM, "no hard links in an object store")

    def symlink(self, path: str, target: str) -> None:
        raise FsError(errno.EPERM, "no symbolic links in an object store")

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        if not stat.S_ISREG(mode):
            raise FsError(errno.EPERM, "only regular files in an object store")
        self.release(path, self.create(path, mode, os.O_WRONLY))

    def readlink(self, path: str) -> str:
        raise FsError(errno.EINVAL)

    def chmod(self, path: str, mode: int) -> None:
        raise FsError(errno.EPERM, "objects have no modes")

    def chown(self, path: str, uid: int, gid: int) -> None:
        raise FsError(errno.EPERM, "objects have no owners")

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        if self._info(path) is None:
            raise FsError(errno.ENOENT)  # the store keeps its own times: nothing to change

    def statfs(self, path: str) -> StatFs:
        big = 1 << 40  # an object store has no fixed size: report plenty of room
        return StatFs(f_bsize=4096, f_frsize=4096, f_blocks=big, f_bfree=big, f_bavail=big,
                      f_files=big, f_ffree=big, f_namemax=1024)


def _fd_path(f: Any) -> str:
    """A path naming the open (unlinked) spool file, for fsspec's put_file/get_file."""
    return f"/proc/self/fd/{f.fileno()}"


def _protocols(fs: Any) -> tuple[str, ...]:
    p = getattr(fs, "protocol", ())
    return (p,) if isinstance(p, str) else tuple(p)

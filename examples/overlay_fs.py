"""An overlay of a read-only lower directory and a writable upper one, each served by
PassthroughFs (so each stays confined to its directory).  A file is copied up on its first
change; removing a lower file leaves a whiteout (a 0/0 character device, as overlayfs does).
python examples/overlay_fs.py SOCKET LOWER UPPER"""
import contextlib, errno, os, stat, sys, threading
import pyvirtiofs
from pyvirtiofs import Context, FsError, ROOT_INODE, SetattrRequest
from pyvirtiofs.passthrough import PassthroughFs

ROOT = Context(0, 0, 0)  # the overlay acts on both layers itself
NOREPLACE = 1  # renameat2

def is_whiteout(st):
    return st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

class OverlayFs(pyvirtiofs.PathFileSystem):
    def __init__(self, lower, upper):
        self.lower = PassthroughFs(lower, readonly=True)
        self.upper = PassthroughFs(upper)
        self.lock = threading.RLock()  # copy-up and whiteouts change the layers in steps

    @contextlib.contextmanager
    def node(self, fs, path):
        """The layer's node id for ``path``, with a reference held meanwhile."""
        held = []
        try:
            for name in filter(None, path.split("/")):
                held.append(fs.lookup(held[-1] if held else ROOT_INODE, name.encode(), ROOT).inode)
            yield held[-1] if held else ROOT_INODE
        finally:
            for inode in held:
                fs.forget(inode, 1)

    def stat(self, fs, path):
        try:
            with self.node(fs, path) as inode:
                return fs.getattr(inode, None, ROOT).attr
        except (FsError, OSError):
            return None

    def layer(self, path):
        """The layer that shows ``path``, and its stat; ENOENT if absent or whited out."""
        st = self.stat(self.upper, path)
        if st is None and (st := self.stat(self.lower, path)) is not None:
            return self.lower, st
        if st is None or is_whiteout(st):
            raise FsError(errno.ENOENT)
        return self.upper, st

    def shows(self, path):
        try:
            return bool(self.layer(path))
        except FsError:
            return False

    def entries(self, fs, path):
        with self.node(fs, path) as inode:
            fh = fs.opendir(inode, ROOT).fh
            names = [e.name.decode() for e in fs.readdir(inode, fh, 0)
                     if e.name not in (b".", b"..")]
            fs.releasedir(inode, fh)
        return names

    def whiteout(self, path):
        parent, name = os.path.split(path)
        with self.node(self.upper, parent) as up:
            self.upper.forget(self.upper.mknod(up, name.encode(), stat.S_IFCHR, 0, ROOT).inode, 1)

    def copy_up(self, path):
        """Make ``path`` exist in the upper layer, its parents first."""
        with self.lock:
            fs, st = self.layer(path)
            if fs is self.upper:
                return
            parent, name = os.path.split(path)
            self.copy_up(parent)
            with self.node(self.upper, parent) as up, self.node(self.lower, path) as low:
                if stat.S_ISDIR(st.st_mode):
                    e = self.upper.mkdir(up, name.encode(), st.st_mode, ROOT)
                elif stat.S_ISLNK(st.st_mode):
                    e = self.upper.symlink(up, name.encode(), self.lower.readlink(low, ROOT), ROOT)
                else:  # a regular file: its data, 1 MiB at a time
                    e, out = self.upper.create(up, name.encode(), st.st_mode, os.O_WRONLY, ROOT)
                    src, offset = self.lower.open(low, os.O_RDONLY, ROOT), 0
                    while data := self.lower.read(low, src.fh, offset, 1 << 20):
                        offset += self.upper.write(e.inode, out.fh, offset, data, ROOT)
                    self.lower.release(low, src.fh)
                    self.upper.release(e.inode, out.fh)
                mode = None if stat.S_ISLNK(st.st_mode) else st.st_mode
                times = SetattrRequest(mode, st.st_uid, st.st_gid, None, st.st_atime_ns,
                                       st.st_mtime_ns)
                self.upper.setattr(e.inode, None, times, ROOT)
                self.upper.forget(e.inode, 1)

    def make(self, path, create):
        """``create(upper, parent node, name)`` in place of a whiteout, if there is one."""
        with self.lock:
            parent, name = os.path.split(path)
            self.copy_up(parent)
            replaced = is_whiteout(self.stat(self.upper, path))
            with self.node(self.upper, parent) as up:
                if replaced:
                    self.upper.unlink(up, name.encode(), ROOT)
                result = create(self.upper, up, name.encode())
            entry = result[0] if isinstance(result, tuple) else result
            self.upper.forget(entry.inode, 1)
            if replaced and stat.S_ISDIR(entry.attr.st_mode):  # hide the lower one's entries
                for old in self.entries(self.lower, path) if self.stat(self.lower, path) else ():
                    self.whiteout(os.path.join(path, old))
            return result

    def remove(self, path, rmdir):
        with self.lock:
            if rmdir and self.readdir(path):
                raise FsError(errno.ENOTEMPTY)
            fs, _ = self.layer(path)
            self.copy_up(os.path.dirname(path))
            if fs is self.upper:
                parent, name = os.path.split(path)
                for whiteout in self.entries(self.upper, path) if rmdir else ():  # all that is left
                    with self.node(self.upper, path) as inode:
                        self.upper.unlink(inode, whiteout.encode(), ROOT)
                with self.node(self.upper, parent) as up:
                    (self.upper.rmdir if rmdir else self.upper.unlink)(up, name.encode(), ROOT)
            if self.stat(self.lower, path) is not None:  # hide the lower file from now on
                self.whiteout(path)

    # -- the path-level file system ------------------------------------------------------
    def getattr(self, path):
        return self.layer(path)[1]
    def readdir(self, path):
        shown = {}
        for fs in (self.lower, self.upper):  # upper entries, whiteouts too, win
            if self.stat(fs, path) is not None:
                for name in self.entries(fs, path):
                    shown[name] = not is_whiteout(self.stat(fs, os.path.join(path, name)))
        return [name for name, show in shown.items() if show]
    def readlink(self, path):
        fs, _ = self.layer(path)
        with self.node(fs, path) as inode:
            return fs.readlink(inode, ROOT).decode()
    def open(self, path, flags):  # our handle: (layer, its node id, its handle)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.copy_up(path)
        fs, _ = self.layer(path)
        with self.node(fs, path) as inode:  # a PassthroughFs handle outlives the reference
            return fs, inode, fs.open(inode, flags, ROOT).fh
    def create(self, path, mode, flags):
        e, o = self.make(path, lambda fs, up, name: fs.create(up, name, mode, flags, ROOT))
        return self.upper, e.inode, o.fh
    def read(self, path, fh, offset, size):
        return fh[0].read(fh[1], fh[2], offset, size)
    def write(self, path, fh, offset, data):
        return fh[0].write(fh[1], fh[2], offset, data, ROOT)
    def release(self, path, fh):
        fh[0].release(fh[1], fh[2])
    def change(self, path, **fields):
        self.copy_up(path)
        with self.node(self.upper, path) as inode:
            self.upper.setattr(inode, None, SetattrRequest(**fields), ROOT)
    def truncate(self, path, length, fh=None):
        self.change(path, size=length)
    def chmod(self, path, mode):
        self.change(path, mode=mode)
    def chown(self, path, uid, gid):
        self.change(path, uid=None if uid == -1 else uid, gid=None if gid == -1 else gid)
    def utimens(self, path, atime_ns, mtime_ns):
        self.change(path, atime_ns=atime_ns, mtime_ns=mtime_ns)
    def mkdir(self, path, mode):
        self.make(path, lambda fs, up, name: fs.mkdir(up, name, stat.S_IFDIR | mode, ROOT))
    def symlink(self, path, target):
        self.make(path, lambda fs, up, name: fs.symlink(up, name, target.encode(), ROOT))
    def unlink(self, path):
        self.remove(path, rmdir=False)
    def rmdir(self, path):
        self.remove(path, rmdir=True)
    def rename(self, old, new, flags):
        if flags & ~NOREPLACE or stat.S_ISDIR(self.layer(old)[1].st_mode):
            raise FsError(errno.EXDEV)  # as overlayfs without redirect_dir: mv copies instead
        with self.lock:
            if flags and self.shows(new):
                raise FsError(errno.EEXIST)
            self.copy_up(old)
            old_dir, old_name = os.path.split(old)
            with self.node(self.upper, old_dir) as src:
                self.make(new, lambda fs, up, name: fs.rename(
                    src, old_name.encode(), up, name, 0, ROOT) or fs.lookup(up, name, ROOT))
            if self.stat(self.lower, old) is not None:
                self.whiteout(old)
    def statfs(self, path):
        return self.upper.statfs(ROOT_INODE)

if __name__ == "__main__":
    pyvirtiofs.serve(OverlayFs(sys.argv[2], sys.argv[3]), sys.argv[1])

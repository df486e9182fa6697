"""An overlay of a read-only lower directory and a writable upper one, each a PassthroughFs (so
each stays confined to its directory) used through paths (PathView).  A file is copied up on its
first change; removing a lower file leaves a whiteout (a 0/0 character device, as overlayfs
does).  python examples/overlay_fs.py SOCKET LOWER UPPER"""
import errno, os, stat, sys, threading
import pyvirtiofs
from pyvirtiofs import FsError, PassthroughFs, PathView

NOREPLACE = 1  # renameat2

def is_whiteout(st):
    return st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

class OverlayFs(pyvirtiofs.PathFileSystem):
    def __init__(self, lower, upper):
        self.lower = PathView(PassthroughFs(lower, readonly=True))
        self.upper = PathView(PassthroughFs(upper))
        self.lock = threading.RLock()  # copy-up and whiteouts change the layers in steps

    def layer(self, path):
        """The layer that shows ``path``, and its stat; ENOENT if absent or whited out."""
        st = self.upper.stat(path)
        if st is None and (st := self.lower.stat(path)) is not None:
            return self.lower, st
        if st is None or is_whiteout(st):
            raise FsError(errno.ENOENT)
        return self.upper, st

    def shows(self, path):
        try:
            return bool(self.layer(path))
        except FsError:
            return False

    def whiteout(self, path):
        self.upper.mknod(path, stat.S_IFCHR, 0)

    def copy_up(self, path):
        """Make ``path`` exist in the upper layer, its parents first."""
        with self.lock:
            layer, st = self.layer(path)
            if layer is self.upper:
                return
            self.copy_up(os.path.dirname(path))
            if stat.S_ISDIR(st.st_mode):
                self.upper.mkdir(path, st.st_mode)
            elif stat.S_ISLNK(st.st_mode):
                self.upper.symlink(path, self.lower.readlink(path))
            elif not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device node: no data
                self.upper.mknod(path, st.st_mode, st.st_rdev)
            else:  # a regular file: its data, 1 MiB at a time
                src, offset = self.lower.open(path, os.O_RDONLY), 0
                out = self.upper.create(path, st.st_mode, os.O_WRONLY)
                while data := self.lower.read(path, src, offset, 1 << 20):
                    offset += self.upper.write(path, out, offset, data)
                self.lower.release(path, src)
                self.upper.release(path, out)
            self.upper.chown(path, st.st_uid, st.st_gid)  # before chmod: chown drops suid
            if not stat.S_ISLNK(st.st_mode):
                self.upper.chmod(path, stat.S_IMODE(st.st_mode))
            self.upper.utimens(path, st.st_atime_ns, st.st_mtime_ns)

    def make(self, path, create):
        """``create()`` in the upper layer, in place of a whiteout if there is one."""
        with self.lock:
            self.copy_up(os.path.dirname(path))
            replaced = is_whiteout(self.upper.stat(path))
            if replaced:
                self.upper.unlink(path)
            result = create()
            if replaced and stat.S_ISDIR(self.upper.getattr(path).st_mode):
                for name in self.lower.readdir(path) if self.lower.stat(path) else ():
                    self.whiteout(os.path.join(path, name))  # the lower one's stay hidden
            return result

    def remove(self, path, rmdir):
        with self.lock:
            if rmdir and self.readdir(path):
                raise FsError(errno.ENOTEMPTY)
            layer, _ = self.layer(path)
            self.copy_up(os.path.dirname(path))
            if layer is self.upper:
                for whiteout in self.upper.readdir(path) if rmdir else ():  # all that is left
                    self.upper.unlink(os.path.join(path, whiteout))
                (self.upper.rmdir if rmdir else self.upper.unlink)(path)
            if self.lower.stat(path) is not None:  # hide the lower file from now on
                self.whiteout(path)

    def change(self, method, path, *args):
        self.copy_up(path)
        getattr(self.upper, method)(path, *args)

    # -- the path-level file system ------------------------------------------------------
    def getattr(self, path):
        return self.layer(path)[1]
    def readdir(self, path):
        shown = {}
        for layer in (self.lower, self.upper):  # upper entries, whiteouts too, win
            if layer.stat(path) is not None:
                for name in layer.readdir(path):
                    shown[name] = not is_whiteout(layer.stat(os.path.join(path, name)))
        return [name for name, show in shown.items() if show]
    def readlink(self, path):
        return self.layer(path)[0].readlink(path)
    def open(self, path, flags):  # our handle: (layer, its handle)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.copy_up(path)
        layer = self.layer(path)[0]
        return layer, layer.open(path, flags)
    def create(self, path, mode, flags):
        return self.upper, self.make(path, lambda: self.upper.create(path, mode, flags))
    def read(self, path, fh, offset, size):
        return fh[0].read(path, fh[1], offset, size)
    def write(self, path, fh, offset, data):
        return fh[0].write(path, fh[1], offset, data)
    def release(self, path, fh):
        fh[0].release(path, fh[1])
    def truncate(self, path, length, fh=None):
        self.change("truncate", path, length)
    def chmod(self, path, mode):
        self.change("chmod", path, mode)
    def chown(self, path, uid, gid):
        self.change("chown", path, uid, gid)
    def utimens(self, path, atime_ns, mtime_ns):
        self.change("utimens", path, atime_ns, mtime_ns)
    def mkdir(self, path, mode):
        self.make(path, lambda: self.upper.mkdir(path, mode))
    def symlink(self, path, target):
        self.make(path, lambda: self.upper.symlink(path, target))
    def mknod(self, path, mode, rdev):
        self.make(path, lambda: self.upper.mknod(path, mode, rdev))
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
            self.make(new, lambda: self.upper.rename(old, new, 0))
            if self.lower.stat(old) is not None:
                self.whiteout(old)
    def statfs(self, path):
        return self.upper.statfs("/")

if __name__ == "__main__":
    pyvirtiofs.serve(OverlayFs(sys.argv[2], sys.argv[3]), sys.argv[1])

"""A writable file system of paths in a dict, served to a VM: python examples/path_fs.py SOCKET"""
import errno, posixpath, stat, sys, threading
import pyvirtiofs
from pyvirtiofs import Attr, FsError

class DictFs(pyvirtiofs.PathFileSystem):
    def __init__(self):
        self.files = {"/": None, "/README": bytearray(b"files live in a Python dict\n")}
        self.lock = threading.Lock()
    def getattr(self, path):
        if path not in self.files:
            raise FsError(errno.ENOENT)
        data = self.files[path]
        if data is None:
            return Attr(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        return Attr(st_mode=stat.S_IFREG | 0o644, st_size=len(data))
    def readdir(self, path):
        return [posixpath.basename(p) for p in self.files
                if p != "/" and posixpath.dirname(p) == path]
    def read(self, path, fh, offset, size):
        return bytes(self.files[path][offset:offset + size])
    def write(self, path, fh, offset, data):
        with self.lock:
            f = self.files[path]
            f[len(f):offset] = bytes(max(0, offset - len(f)))
            f[offset:offset + len(data)] = data
        return len(data)
    def truncate(self, path, length, fh=None):
        with self.lock:
            f = self.files[path]
            del f[length:]
            f.extend(bytes(length - len(f)))
    def create(self, path, mode, flags):
        self.files.setdefault(path, bytearray())
    def mkdir(self, path, mode):
        self.files[path] = None
    def unlink(self, path):
        del self.files[path]
    def rmdir(self, path):
        if any(posixpath.dirname(p) == path for p in self.files):
            raise FsError(errno.ENOTEMPTY)
        del self.files[path]
    def rename(self, old, new, flags):
        with self.lock:
            for p in [p for p in self.files if p == old or p.startswith(old + "/")]:
                self.files[new + p[len(old):]] = self.files.pop(p)

if __name__ == "__main__":
    pyvirtiofs.serve(DictFs(), sys.argv[1])

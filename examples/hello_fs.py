"""A read-only file system of one file, served to a VM: python examples/hello_fs.py SOCKET"""
import errno, socket, stat
from pyvirtiofs.filesystem import FileSystem, FsError, Entry, Attr, OpenResult, DirEntry
from pyvirtiofs.device import VirtioFsDevice
from pyvirtiofs.vhost_user.backend import VhostUserBackend

class Hello(FileSystem):
    DATA = b"hello from Python\n"
    def lookup(self, parent, name, ctx):
        if parent != 1 or name != b"hello":
            raise FsError(errno.ENOENT)
        return Entry(2, self.getattr(2, None, ctx)[0])
    def getattr(self, inode, fh, ctx):
        if inode == 1:
            return Attr(st_ino=1, st_mode=stat.S_IFDIR | 0o755, st_nlink=2), 1.0
        return Attr(st_ino=2, st_mode=stat.S_IFREG | 0o444, st_size=len(self.DATA)), 1.0
    def open(self, inode, flags, ctx):
        return OpenResult(fh=0)
    def read(self, inode, fh, offset, size):
        return self.DATA[offset:offset + size]
    def readdir(self, inode, fh, offset):
        entries = [(b".", 1, 4), (b"..", 1, 4), (b"hello", 2, 8)]
        for i, (name, ino, dtype) in enumerate(entries[offset:], offset + 1):
            yield DirEntry(name, ino, dtype, i)

import sys
listener = socket.socket(socket.AF_UNIX); listener.bind(sys.argv[1]); listener.listen(1)
conn, _ = listener.accept()
VhostUserBackend(VirtioFsDevice(Hello())).serve(conn)

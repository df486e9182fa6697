"""A read-only file system of one file, at the inode level, served to a VM:
python examples/hello_fs.py SOCKET"""
import errno, stat, sys
import pyvirtiofs
from pyvirtiofs import Attr, DirEntry, Entry, FileType, FsError, OpenResult, ROOT_INODE

HELLO = 2  # the node id of /hello

class Hello(pyvirtiofs.FileSystem):
    DATA = b"hello from Python\n"
    def lookup(self, parent, name, ctx):
        if parent != ROOT_INODE or name != b"hello":
            raise FsError(errno.ENOENT)
        return self.getattr(HELLO, None, ctx)  # node ids are fixed: no lookup count to keep
    def getattr(self, inode, fh, ctx):
        if inode == ROOT_INODE:
            return Entry(inode, Attr(st_ino=1, st_mode=stat.S_IFDIR | 0o755, st_nlink=2))
        return Entry(inode, Attr(st_ino=2, st_mode=stat.S_IFREG | 0o444, st_size=len(self.DATA)))
    def open(self, inode, flags, ctx):
        return OpenResult(fh=0)
    def read(self, inode, fh, offset, size):
        return self.DATA[offset:offset + size]
    def readdir(self, inode, fh, offset):
        entries = [(b".", 1, FileType.DIR), (b"..", 1, FileType.DIR), (b"hello", 2, FileType.REG)]
        for i, (name, ino, dtype) in enumerate(entries[offset:], offset + 1):
            yield DirEntry(name, ino, dtype, i)

if __name__ == "__main__":
    pyvirtiofs.serve(Hello(), sys.argv[1])

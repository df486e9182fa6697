"""A file system in memory at the inode level (files, directories, symlinks, hard links, device
nodes, FIFOs, renameat2), served to a VM: python examples/memory_fs.py SOCKET"""
import errno, os, stat, sys, threading, time
import pyvirtiofs
from pyvirtiofs import Attr, DirEntry, Entry, FileType, FsError, OpenResult, StatFs
NOREPLACE, EXCHANGE = 1, 2  # renameat2 flags

class Node:
    def __init__(self, mode, uid, gid, rdev=0):
        self.mode, self.uid, self.gid, self.rdev = mode, uid, gid, rdev
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.data, self.children = bytearray(), {}
        self.atime = self.mtime = self.ctime = time.time_ns()

def isdir(node):
    return int(stat.S_ISDIR(node.mode))

def _raise(err):
    raise FsError(err)

class MemoryFs(pyvirtiofs.FileSystem):
    def __init__(self):
        self.lock = threading.RLock()  # one lock: every method is short
        self.nodes = pyvirtiofs.InodeTable(Node(stat.S_IFDIR | 0o755, 0, 0))
        self.handles = pyvirtiofs.HandleTable()  # fh -> O_APPEND or a directory listing

    def attr(self, inode, n):
        return Attr(inode, n.mode, n.nlink, n.uid, n.gid, n.rdev, len(n.data),
                    (len(n.data) + 511) // 512, 4096, n.atime, n.mtime, n.ctime)
    def entry(self, node):  # hands the guest one reference
        inode = self.nodes.lookup(node)
        return Entry(inode, self.attr(inode, node))
    def child(self, parent, name):
        return self.nodes[parent].children.get(name) or _raise(errno.ENOENT)
    def touch(self, *nodes):
        for n in nodes:
            n.mtime = n.ctime = time.time_ns()

    def lookup(self, parent, name, ctx):  # InodeTable is thread-safe: no lock needed
        return self.entry(self.child(parent, name))
    def forget(self, inode, nlookup):
        self.nodes.forget(inode, nlookup)
    def getattr(self, inode, fh, ctx):
        return Entry(inode, self.attr(inode, self.nodes[inode]))
    def setattr(self, inode, fh, req, ctx):
        with self.lock:
            n = self.nodes[inode]
            n.mode = n.mode if req.mode is None else stat.S_IFMT(n.mode) | stat.S_IMODE(req.mode)
            n.uid = n.uid if req.uid is None else req.uid
            n.gid = n.gid if req.gid is None else req.gid
            if req.size is not None:
                del n.data[req.size:]
                n.data.extend(bytes(req.size - len(n.data)))
                n.mtime = time.time_ns()
            if req.kill_suidgid or ((req.uid is not None or req.gid is not None) and ctx.uid):
                n.mode &= ~(stat.S_ISUID | (stat.S_ISGID if n.mode & stat.S_IXGRP else 0))
            n.atime = time.time_ns() if req.atime_now else req.atime_ns or n.atime
            n.mtime = time.time_ns() if req.mtime_now else req.mtime_ns or n.mtime
            n.ctime = time.time_ns()
            return Entry(inode, self.attr(inode, n))

    def mknod(self, parent, name, mode, rdev, ctx, data=b""):
        with self.lock:
            d = self.nodes[parent]
            if name in d.children:
                raise FsError(errno.EEXIST)
            setgid = d.mode & stat.S_ISGID  # the directory's group, and for directories the bit
            n = d.children[name] = Node(mode | (setgid if stat.S_ISDIR(mode) else 0), ctx.uid,
                                        d.gid if setgid else ctx.gid, rdev)
            n.data[:] = data
            d.nlink += isdir(n)
            self.touch(d)
            return self.entry(n)
    def mkdir(self, parent, name, mode, ctx):
        return self.mknod(parent, name, stat.S_IFDIR | (mode & 0o7777), 0, ctx)
    def symlink(self, parent, name, target, ctx):
        return self.mknod(parent, name, stat.S_IFLNK | 0o777, 0, ctx, target)
    def readlink(self, inode, ctx):
        return bytes(self.nodes[inode].data)
    def link(self, inode, new_parent, new_name, ctx):
        with self.lock:
            n, d = self.nodes[inode], self.nodes[new_parent]
            if new_name in d.children:
                raise FsError(errno.EEXIST)
            d.children[new_name] = n
            n.nlink += 1
            self.touch(d)
            n.ctime = d.ctime
            return self.entry(n)
    def unlink(self, parent, name, ctx, rmdir=False):
        with self.lock:  # the node lives on while the guest holds it (InodeTable)
            d, n = self.nodes[parent], self.child(parent, name)
            if rmdir and n.children:
                raise FsError(errno.ENOTEMPTY)
            del d.children[name]
            n.nlink = 0 if rmdir else n.nlink - 1
            d.nlink -= rmdir
            self.touch(d)
            n.ctime = d.ctime
    def rmdir(self, parent, name, ctx):
        self.unlink(parent, name, ctx, rmdir=True)
    def rename(self, parent, name, new_parent, new_name, flags, ctx):
        with self.lock:
            d, nd, n = self.nodes[parent], self.nodes[new_parent], self.child(parent, name)
            old = nd.children.get(new_name)
            if flags & ~(NOREPLACE | EXCHANGE):
                raise FsError(errno.EINVAL)
            if (flags & NOREPLACE and old) or (flags & EXCHANGE and not old):
                raise FsError(errno.EEXIST if old else errno.ENOENT)
            if flags & EXCHANGE:
                d.children[name], nd.children[new_name] = old, n
                d.nlink += isdir(old) - isdir(n)
                nd.nlink += isdir(n) - isdir(old)
                return self.touch(d, nd)
            if old is n:
                return
            if old is not None:
                if isdir(old) != isdir(n):
                    raise FsError(errno.EISDIR if isdir(old) else errno.ENOTDIR)
                self.unlink(new_parent, new_name, ctx, rmdir=isdir(old))
            nd.children[new_name] = d.children.pop(name)
            d.nlink -= isdir(n)
            nd.nlink += isdir(n)
            self.touch(d, nd)
            n.ctime = d.ctime

    def open(self, inode, flags, ctx):
        with self.lock:
            if flags & os.O_TRUNC:
                del self.nodes[inode].data[:]
                self.touch(self.nodes[inode])
            return OpenResult(self.handles.add(flags & os.O_APPEND))
    def create(self, parent, name, mode, flags, ctx):
        entry = self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, ctx)
        return entry, self.open(entry.inode, flags & os.O_APPEND, ctx)
    def release(self, inode, fh):
        self.handles.pop(fh)
    def read(self, inode, fh, offset, size):
        return bytes(self.nodes[inode].data[offset:offset + size])
    def write(self, inode, fh, offset, data, ctx, kill_priv=False):
        with self.lock:
            n = self.nodes[inode]
            offset = len(n.data) if self.handles[fh] else offset
            n.data.extend(bytes(max(0, offset - len(n.data))))
            n.data[offset:offset + len(data)] = data
            n.mode &= ~(stat.S_ISUID | stat.S_ISGID) if kill_priv else ~0
            self.touch(n)
            return len(data)
    def write_from(self, inode, fh, offset, buffers, kill_priv, ctx):
        return self.write(inode, fh, offset, b"".join(buffers), ctx, kill_priv)

    def opendir(self, inode, ctx):  # a snapshot: entries added or removed meanwhile do no harm
        with self.lock:
            items = [(b".", FileType.DIR), (b"..", FileType.DIR)] + [
                (name, FileType.of_mode(n.mode)) for name, n in self.nodes[inode].children.items()]
            return OpenResult(self.handles.add(items))
    def readdir(self, inode, fh, offset):
        for i, (name, type_) in enumerate(self.handles[fh][offset:], offset + 1):
            yield DirEntry(name, i, type_, i)
    def releasedir(self, inode, fh):
        self.handles.pop(fh)
    def statfs(self, inode):
        return StatFs(f_blocks=1 << 20, f_bfree=1 << 20, f_bavail=1 << 20, f_files=1 << 20)

if __name__ == "__main__":
    pyvirtiofs.serve(MemoryFs(), sys.argv[1])

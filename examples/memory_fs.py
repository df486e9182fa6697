"""A file system in memory at the inode level (files, directories, symlinks, hard links, device
nodes, FIFOs, renameat2), served to a VM: python examples/memory_fs.py SOCKET"""
import errno, os, stat, sys, threading, time
import pyvirtiofs
from pyvirtiofs import Attr, DirEntry, Entry, FileType, FsError, OpenResult, StatFs
NOREPLACE, EXCHANGE = 1, 2  # renameat2 flags

class Node:  # attributes named as Attr's, so that SetattrRequest.apply can change them
    def __init__(self, mode, uid, gid, rdev=0, data=b""):
        self.st_mode, self.st_uid, self.st_gid, self.st_rdev = mode, uid, gid, rdev
        self.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        self.data, self.children = bytearray(data), {}
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = time.time_ns()

def isdir(node):
    return int(stat.S_ISDIR(node.st_mode))

class MemoryFs(pyvirtiofs.FileSystem):
    def __init__(self):
        self.lock = threading.RLock()  # one lock: every method is short
        self.nodes = pyvirtiofs.InodeTable(Node(stat.S_IFDIR | 0o755, 0, 0))
        self.listings = pyvirtiofs.HandleTable()  # fh -> an open directory's entries

    def entry(self, n, inode=None):  # without a node id, a new reference to one
        inode = inode or self.nodes.lookup(n)
        return Entry(inode, Attr(inode, n.st_mode, n.st_nlink, n.st_uid, n.st_gid, n.st_rdev,
                                 len(n.data), (len(n.data) + 511) // 512, 4096, n.st_atime_ns,
                                 n.st_mtime_ns, n.st_ctime_ns))
    def child(self, parent, name):
        if (n := self.nodes[parent].children.get(name)) is None:
            raise FsError(errno.ENOENT)
        return n
    def touch(self, *dirs, changed=None):  # new contents; ``changed``: new attributes only
        for n in dirs:
            n.st_mtime_ns = n.st_ctime_ns = time.time_ns()
        if changed is not None:
            changed.st_ctime_ns = dirs[0].st_ctime_ns

    def lookup(self, parent, name, ctx):  # InodeTable is thread-safe: no lock needed
        return self.entry(self.child(parent, name))
    def forget(self, inode, nlookup):
        self.nodes.forget(inode, nlookup)
    def getattr(self, inode, fh, ctx):
        return self.entry(self.nodes[inode], inode)
    def setattr(self, inode, fh, req, ctx):
        with self.lock:
            n = self.nodes[inode]
            req.apply(n)  # the guest kernel clears suid/sgid itself (no handle_killpriv_v2)
            if req.size is not None:
                del n.data[req.size:]
                n.data.extend(bytes(req.size - len(n.data)))
            return self.entry(n, inode)

    def mknod(self, parent, name, mode, rdev, ctx, data=b""):
        with self.lock:
            d = self.nodes[parent]
            if name in d.children:
                raise FsError(errno.EEXIST)
            setgid = d.st_mode & stat.S_ISGID  # the directory's group, for directories the bit
            n = d.children[name] = Node(mode | (setgid if stat.S_ISDIR(mode) else 0), ctx.uid,
                                        d.st_gid if setgid else ctx.gid, rdev, data)
            d.st_nlink += isdir(n)
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
            n.st_nlink += 1
            self.touch(d, changed=n)
            return self.entry(n)
    def unlink(self, parent, name, ctx, rmdir=False):
        with self.lock:  # the node lives on while the guest holds it (InodeTable)
            d, n = self.nodes[parent], self.child(parent, name)
            if rmdir and n.children:
                raise FsError(errno.ENOTEMPTY)
            del d.children[name]
            n.st_nlink = 0 if rmdir else n.st_nlink - 1
            d.st_nlink -= rmdir
            self.touch(d, changed=n)
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
                d.st_nlink += isdir(old) - isdir(n)
                nd.st_nlink += isdir(n) - isdir(old)
                return self.touch(d, nd)
            if old is n:
                return
            if old is not None:
                if isdir(old) != isdir(n):
                    raise FsError(errno.EISDIR if isdir(old) else errno.ENOTDIR)
                self.unlink(new_parent, new_name, ctx, rmdir=isdir(old))
            nd.children[new_name] = d.children.pop(name)
            d.st_nlink -= isdir(n)
            nd.st_nlink += isdir(n)
            self.touch(d, nd, changed=n)

    def open(self, inode, flags, ctx):  # no state: the guest kernel places O_APPEND writes
        if flags & os.O_TRUNC:
            self.setattr(inode, None, pyvirtiofs.SetattrRequest(size=0), ctx)
        return OpenResult(0)
    def create(self, parent, name, mode, flags, ctx):
        return self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, ctx), OpenResult(0)
    def read(self, inode, fh, offset, size):
        return bytes(self.nodes[inode].data[offset:offset + size])
    def write(self, inode, fh, offset, data, ctx):
        with self.lock:
            n = self.nodes[inode]
            n.data.extend(bytes(max(0, offset - len(n.data))))
            n.data[offset:offset + len(data)] = data
            self.touch(n)
            return len(data)

    def opendir(self, inode, ctx):  # a snapshot: entries added or removed meanwhile do no harm
        with self.lock:
            children = self.nodes[inode].children.items()
            items = [(b".", FileType.DIR), (b"..", FileType.DIR)] + [
                (name, FileType.of_mode(n.st_mode)) for name, n in children]
            return OpenResult(self.listings.add(items))
    def readdir(self, inode, fh, offset):
        for i, (name, type_) in enumerate(self.listings[fh][offset:], offset + 1):
            yield DirEntry(name, i, type_, i)
    def releasedir(self, inode, fh):
        self.listings.pop(fh)
    def statfs(self, inode):
        return StatFs(f_blocks=1 << 20, f_bfree=1 << 20, f_bavail=1 << 20, f_files=1 << 20)

if __name__ == "__main__":
    pyvirtiofs.serve(MemoryFs(), sys.argv[1])

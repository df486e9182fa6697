"""A tar or zip archive as a read-only file system (path level), served to a VM:
python examples/archive_fs.py SOCKET ARCHIVE"""
import errno, os, posixpath, stat, sys, tarfile, threading, time, zipfile
import pyvirtiofs
from pyvirtiofs import Attr, FsError

class Member:
    def __init__(self, mode, size=0, mtime=0, uid=0, gid=0, target="", read=None):
        self.mode, self.size, self.mtime, self.uid, self.gid = mode, size, mtime, uid, gid
        self.target, self.read, self.names = target, read, []

class ArchiveFs(pyvirtiofs.PathFileSystem):
    entry_timeout = 60.0  # nothing ever changes

    def __init__(self, path):
        self.lock = threading.Lock()  # tarfile and zipfile objects are not thread-safe
        self.members = {"/": Member(stat.S_IFDIR | 0o755)}
        if zipfile.is_zipfile(path):
            self.load_zip(zipfile.ZipFile(path))
        else:
            self.load_tar(tarfile.open(path))

    def add(self, name, member):
        path = posixpath.normpath("/" + name.strip("/"))
        parent = posixpath.dirname(path)
        if parent not in self.members:
            self.add(parent, Member(stat.S_IFDIR | 0o755, mtime=member.mtime))
        if path not in self.members:
            self.members[parent].names.append(posixpath.basename(path))
        elif stat.S_ISDIR(member.mode):  # an explicit entry for an implied directory
            member.names = self.members[path].names
        self.members[path] = member

    def load_tar(self, tar):
        for m in tar.getmembers():
            data = tar.getmember(m.linkname) if m.islnk() else m  # a hard link shares data
            kind = (stat.S_IFDIR if m.isdir() else stat.S_IFLNK if m.issym() else
                    stat.S_IFREG if data.isfile() else 0)  # devices and FIFOs: left out
            if kind:
                size = len(m.linkname) if m.issym() else data.size
                self.add(m.name, Member(kind | m.mode, size, int(m.mtime), m.uid, m.gid,
                                        m.linkname, lambda d=data: tar.extractfile(d).read()))

    def load_zip(self, zf):
        for info in zf.infolist():
            mode = info.external_attr >> 16 or (0o40755 if info.is_dir() else 0o100644)
            if info.is_dir():
                mode = stat.S_IFDIR | stat.S_IMODE(mode)
            read = lambda i=info: zf.read(i)  # noqa: E731
            target = read().decode() if stat.S_ISLNK(mode) else ""
            mtime = int(time.mktime(info.date_time + (0, 0, -1)))
            self.add(info.filename, Member(mode, len(target) or info.file_size, mtime,
                                           target=target, read=read))

    def member(self, path):
        if path not in self.members:
            raise FsError(errno.ENOENT)
        return self.members[path]

    def getattr(self, path):
        m = self.member(path)
        return Attr(st_mode=m.mode, st_nlink=2 if stat.S_ISDIR(m.mode) else 1, st_size=m.size,
                    st_uid=m.uid, st_gid=m.gid, st_blocks=(m.size + 511) // 512,
                    st_atime_ns=m.mtime * 10**9, st_mtime_ns=m.mtime * 10**9,
                    st_ctime_ns=m.mtime * 10**9)

    def readdir(self, path):
        return self.member(path).names

    def readlink(self, path):
        return self.member(path).target

    def open(self, path, flags):  # the handle is the file's content, read once
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EROFS)
        with self.lock:
            return self.member(path).read()

    def read(self, path, fh, offset, size):
        return fh[offset:offset + size]

if __name__ == "__main__":
    pyvirtiofs.serve(ArchiveFs(sys.argv[2]), sys.argv[1])

"""pyvirtiofs: serve a file system written in Python to a VM (virtiofs), or mount it on the host.

The public API is what this module exports (``__all__``); submodules are the implementation
and may change.  Start with :class:`FileSystem` (inodes) or :class:`PathFileSystem` (paths),
then :func:`serve` it to a VM or :func:`mount` it on the host.  docs/api.md is the reference.

The daemon, pyvirtiofsd, is :mod:`pyvirtiofs.cli` serving :class:`PassthroughFs`.
"""

from typing import TYPE_CHECKING, Any

from . import compiled as _compiled

_compiled.choose()  # before any module of the request path is imported: compiled or source

__version__ = "0.1.0"

from .filesystem import (ROOT_INODE, Attr, Capabilities, Context, DirEntry, Entry, FileSystem,
                         FileType, FsError, OpenResult, SetattrRequest, StatFs, StatResult)
from .inodes import HandleTable, InodeTable
from .pathfs import PathAdapter, PathFileSystem, PathView
from .serving import Server, SocketInUse, listen, serve

if TYPE_CHECKING:
    from .hostmount import Mount, mount
    from .passthrough import PassthroughFs

__all__ = [
    "__version__",
    # the inode-level API
    "FileSystem", "FsError", "Context", "Entry", "Attr", "StatResult", "DirEntry", "FileType",
    "StatFs", "OpenResult", "SetattrRequest", "Capabilities", "ROOT_INODE",
    # help with node ids, lookup counts and handles; the path level
    "InodeTable", "HandleTable", "PathFileSystem", "PathAdapter", "PathView",
    # a host directory, to serve or to build on
    "PassthroughFs",
    # serving to a VM
    "serve", "Server", "listen", "SocketInUse",
    # mounting on the host (/dev/fuse)
    "mount", "Mount",
]


def __getattr__(name: str) -> Any:
    # Host mounting is imported when first used: the daemon never needs it.
    if name in ("mount", "Mount"):
        from . import hostmount
        return getattr(hostmount, name)
    if name == "PassthroughFs":  # the daemon's file system: imported when first used
        from .passthrough import PassthroughFs
        return PassthroughFs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Coroutine methods: a file system may define any method with ``async def``.

Such a method runs on one event loop the library manages (a daemon thread, started when first
needed; :func:`loop` returns it, for file systems that want to start their own tasks there).
Requests for a file system with coroutine methods are taken off the request queue at once
and served by a pool of ``AIO_THREADS`` threads, each waiting for its coroutine to finish: the
queue goes on serving while a method awaits the network, and up to ``AIO_THREADS`` requests are
in progress at the same time.  Plain methods of such a file system run in those threads too.

An ``async def readdir`` (a coroutine returning entries, or an async generator) is collected
whole before the reply is made.
"""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, cast

from .filesystem import FileSystem, copy_into

if TYPE_CHECKING:  # asyncio costs ~10 MiB of RSS: imported only when a coroutine runs
    import asyncio

AIO_THREADS = 32

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def loop() -> asyncio.AbstractEventLoop:
    """The library's event loop (running in its own daemon thread)."""
    global _loop
    import asyncio
    with _loop_lock:
        if _loop is None:
            new = asyncio.new_event_loop()
            threading.Thread(target=new.run_forever, name="pyvirtiofs-aio", daemon=True).start()
            _loop = new
        return _loop


def run(awaitable: Any) -> Any:
    """Run a coroutine (or collect an async generator) on the library's loop; wait for it."""
    import asyncio
    if inspect.isasyncgen(awaitable):
        awaitable = _collect(awaitable)
    return asyncio.run_coroutine_threadsafe(awaitable, loop()).result()


async def _collect(agen: Any) -> list[Any]:
    return [x async for x in agen]


def async_methods(obj: object) -> set[str]:
    """The names of ``obj``'s public methods written with ``async def``."""
    names = set()
    for name in dir(type(obj)):
        if name.startswith("_"):
            continue
        fn = getattr(type(obj), name, None)
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            names.add(name)
    return names


def has_coroutines(fs: object) -> bool:
    """Whether serving ``fs`` waits for coroutines (its own, or those of the path-level file
    system it adapts)."""
    return bool(async_methods(fs)) or getattr(fs, "_has_coroutines", False)


def for_server(fs: FileSystem) -> FileSystem:
    """What the FUSE server should call for ``fs``: ``fs`` itself, or a :class:`Blocking`
    view of it when it has coroutine methods."""
    names = async_methods(fs)
    return Blocking(fs, names) if names else fs  # type: ignore[return-value]


class Blocking:
    """``target`` with its coroutine methods turned into plain ones that wait for the result
    on the library's loop; everything else passes through."""

    def __init__(self, target: Any, names: set[str]):
        self._target = target
        for name in names:
            setattr(self, name, self._waiting(getattr(target, name)))
        if isinstance(target, FileSystem):
            # The defaults of read_into/write_from call read/write on the target itself,
            # which would hand them an unawaited coroutine.
            cls = type(target)
            if "read" in names and cls.read_into is FileSystem.read_into:
                self._wait_read = self._waiting(target.read)
                self.read_into = self._read_into
            if "write" in names and cls.write_from is FileSystem.write_from:
                self._wait_write = self._waiting(target.write)
                self.write_from = self._write_from
            if names & {"readdir", "lookup"} and cls.readdirplus is FileSystem.readdirplus:
                # the default, calling readdir and lookup through this view
                self.readdirplus = partial(FileSystem.readdirplus, cast(FileSystem, self))

    @staticmethod
    def _waiting(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if inspect.iscoroutine(result) or inspect.isasyncgen(result):
                return run(result)
            return result
        call.__name__ = getattr(method, "__name__", "call")
        return call

    def _read_into(self, inode: int, fh: int, offset: int, buffers: list[memoryview]) -> int:
        data = self._wait_read(inode, fh, offset, sum(len(b) for b in buffers))
        return copy_into(memoryview(data), buffers)

    def _write_from(self, inode: int, fh: int, offset: int, buffers: list[memoryview],
                    kill_priv: bool, ctx: Any) -> int:
        n: int = self._wait_write(inode, fh, offset, b"".join(buffers), ctx)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def deferring(serve_request: Callable[..., int], deferred: int) -> Callable[..., int]:
    """A ``serve_request`` that serves each request in the aio pool and answers through the
    completion callback (``serve_request`` returns ``deferred`` when it does so itself)."""
    pool = ThreadPoolExecutor(AIO_THREADS, thread_name_prefix="aio")

    def serve_later(chain: Any, complete: Callable[[int, int], None]) -> None:
        try:
            n = serve_request(chain, complete)
        except BaseException:  # serve_request() answers errors itself; the queue must not wait
            complete(chain.head, 0)
            raise
        if n != deferred:
            complete(chain.head, n)

    def deferring_serve_request(chain: Any,
                                complete: Callable[[int, int], None] | None = None) -> int:
        if complete is None:  # a caller that cannot take a late answer
            return serve_request(chain, None)
        pool.submit(serve_later, chain, complete)
        return deferred

    return deferring_serve_request

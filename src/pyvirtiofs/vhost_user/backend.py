"""The vhost-user backend: the state machine behind QEMU's control messages.

It owns guest memory and the virtqueues and starts a :class:`QueueWorker` for each ring that is
started (it has memory, addresses and a kick fd) and enabled.  What requests mean is the
device's business: the contract is :class:`~pyvirtiofs.vhost_user.device.Device`.  With
``shmem`` regions the backend offers the SHMEM protocol feature, answers GET_SHMEM_CONFIG and
hands them the backend channel.

Frontend mistakes (wrong payload sizes, missing fds, rings outside memory, ...) are logged and
answered with a failure where the protocol has a reply; a message we cannot even frame ends the
connection.  Nothing the frontend sends raises out of :meth:`VhostUserSession.serve`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from ..guest_memory import GuestMemory, GuestMemoryError, MemoryRegion
from ..queue_worker import QueueWorker
from ..virtqueue import MAX_QUEUE_SIZE, Virtqueue
from . import messages as m
from .connection import Connection, Message, ProtocolViolation
from .device import Device
from .shmem import SharedMemory

log = logging.getLogger(__name__)


class BadMessage(Exception):
    """A well-framed message with a bad payload; answered with failure, connection kept."""


VIRTIO_FEATURES = m.F_VERSION_1 | m.F_INDIRECT_DESC | m.F_EVENT_IDX | m.F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = (m.PF_MQ | m.PF_REPLY_ACK | m.PF_CONFIGURE_MEM_SLOTS | m.PF_RESET_DEVICE)
# Offered too when the device has shared memory regions: the backend channel carries
# SHMEM_MAP/UNMAP, and REPLY_ACK lets us wait for the frontend's answer.
SHMEM_PROTOCOL_FEATURES = m.PF_SHMEM | m.PF_BACKEND_REQ | m.PF_REPLY_ACK

# Requests that act on the device and so are refused before SET_OWNER.
_NEEDS_OWNER = {m.Request.SET_MEM_TABLE, m.Request.ADD_MEM_REG, m.Request.REM_MEM_REG,
                m.Request.SET_VRING_NUM, m.Request.SET_VRING_ADDR, m.Request.SET_VRING_BASE,
                m.Request.GET_VRING_BASE, m.Request.SET_VRING_KICK, m.Request.SET_VRING_CALL,
                m.Request.SET_VRING_ERR, m.Request.SET_VRING_ENABLE, m.Request.SET_FEATURES}


class VhostUserSession:
    """One frontend's vhost-user session: its memory, rings and workers, driven by its control
    messages.  (rust-vmm calls the device trait ``VhostUserBackend``; here that is
    :class:`~pyvirtiofs.vhost_user.device.Device`.)"""

    def __init__(self, device: Device, name: str = "pyvirtiofs"):
        self.device = device
        self.name = name
        self.queues = [Virtqueue(i) for i in range(device.num_queues)]
        self.workers: dict[int, QueueWorker] = {}
        self.memory = GuestMemory()
        self.acked_features = 0
        self.acked_protocol = 0
        self.owner = False
        shmem = device.shmem
        self.shmem: SharedMemory | None = shmem if shmem is not None and shmem.regions else None
        self.protocol_features = PROTOCOL_FEATURES | (SHMEM_PROTOCOL_FEATURES if self.shmem
                                                      else 0)
        # The device's config space (virtio-fs: its tag), only when it has one to tell.
        self.config_space: bytes | None = device.config_space
        if self.config_space is not None:
            self.protocol_features |= m.PF_CONFIG
        self._lock = threading.Lock()
        self._handlers = {}
        for req in m.Request:
            h = getattr(self, "_" + req.name.lower(), None)
            if h is not None:
                self._handlers[int(req)] = h

    # -- connection loop ------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        """Serve one frontend until it disconnects."""
        conn = Connection(sock)
        try:
            while True:
                try:
                    msg = conn.receive()
                except ProtocolViolation as e:
                    log.error("vhost-user: %s; closing the connection", e)
                    return
                except OSError as e:
                    log.error("vhost-user socket error: %s", e)
                    return
                if msg is None:
                    log.info("frontend disconnected")
                    return
                if not self._dispatch(conn, msg):
                    return
        finally:
            self.shutdown()
            conn.close()

    def _dispatch(self, conn: Connection, msg: Message) -> bool:
        try:
            name = m.Request(msg.request).name
        except ValueError:
            name = f"request {msg.request}"
        handler = self._handlers.get(msg.request)
        ok = True
        reply = None
        try:
            if handler is None:
                raise BadMessage(f"unsupported {name}")
            if msg.request in _NEEDS_OWNER and not self.owner:
                raise BadMessage(f"{name} before SET_OWNER")
            reply = handler(msg)
        except (BadMessage, GuestMemoryError) as e:
            log.error("vhost-user %s refused: %s", name, e)
            ok = False
        except Exception:
            log.exception("vhost-user %s failed", name)
            ok = False
        finally:
            msg.close_fds()
        try:
            if reply is not None:
                conn.reply(msg, reply)
            elif msg.need_reply and self.acked_protocol & m.PF_REPLY_ACK:
                conn.reply(msg, m.U64.pack(0 if ok else 1))
            elif not ok and msg.request in _REPLYING:
                # The frontend waits for an answer we cannot give: it must not hang.
                log.error("cannot answer %s; closing the connection", name)
                return False
        except OSError as e:
            log.error("vhost-user reply failed: %s", e)
            return False
        return True

    @staticmethod
    def _payload(msg: Message, st) -> tuple:
        if len(msg.payload) != st.size:
            raise BadMessage(f"payload of {len(msg.payload)} bytes, expected {st.size}")
        return st.unpack(msg.payload)

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise BadMessage(f"queue index {index} out of range (0..{len(self.queues) - 1})")
        return self.queues[index]

    # -- queue workers --------------------------------------------------------------------
    def _update_queue(self, vq: Virtqueue) -> None:
        """Start or stop the worker so that it runs exactly when the ring may be processed."""
        should_run = (vq.ready and vq.kick_fd is not None and vq.enabled and not vq.broken)
        running = vq.index in self.workers
        if should_run and not running:
            w = QueueWorker(vq, self.device.queue_handler(vq.index), f"vq{vq.index}",
                            self.device.cancel_pending, self.device.pool)
            self.workers[vq.index] = w
            w.start()
        elif running and not should_run:
            self._stop_worker(vq.index)

    def _stop_worker(self, index: int) -> None:
        w = self.workers.pop(index, None)
        if w is not None:
            w.stop()

    def _stop_all(self) -> None:
        for i in list(self.workers):
            self._stop_worker(i)

    def shutdown(self) -> None:
        self._stop_all()
        if self.shmem is not None:
            self.shmem.detach()
        for vq in self.queues:
            self._close_queue_fds(vq)
            vq.reset()
        self.memory.release()
        self.memory = GuestMemory()

    @staticmethod
    def _close_queue_fds(vq: Virtqueue) -> None:
        for attr in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(vq, attr)
            if fd is not None:
                os.close(fd)
                setattr(vq, attr, None)

    # -- features -------------------------------------------------------------------------
    def _get_features(self, msg):
        return m.U64.pack(VIRTIO_FEATURES)

    def _set_features(self, msg):
        (features,) = self._payload(msg, m.U64)
        if features & ~VIRTIO_FEATURES:
            raise BadMessage(f"features {features & ~VIRTIO_FEATURES:#x} were not offered")
        self.acked_features = features
        for vq in self.queues:
            vq.event_idx = bool(features & m.F_EVENT_IDX)
            if not features & m.F_PROTOCOL_FEATURES:
                vq.enabled = True  # without protocol features rings start enabled
                self._update_queue(vq)

    def _get_protocol_features(self, msg):
        return m.U64.pack(self.protocol_features)

    def _set_protocol_features(self, msg):
        (features,) = self._payload(msg, m.U64)
        if features & ~self.protocol_features:
            raise BadMessage(f"protocol features {features & ~self.protocol_features:#x} "
                             "not offered")
        self.acked_protocol = features
        if self.shmem is not None:
            usable = features & SHMEM_PROTOCOL_FEATURES == SHMEM_PROTOCOL_FEATURES
            if features & m.PF_SHMEM and not usable:
                log.warning("frontend took SHMEM without BACKEND_REQ and REPLY_ACK: "
                            "shared memory stays unused")
            elif not features & m.PF_SHMEM:
                log.info("the frontend has no vhost-user SHMEM (QEMU 10.2 and older): "
                         "no shared memory regions, no DAX window")
            self.shmem.negotiated(usable)

    def _get_shmem_config(self, msg):
        if self.shmem is None:
            return m.SHMEM_CONFIG.pack(0, 0, *[0] * m.MAX_SHMEM_REGIONS)
        return self.shmem.config_reply()

    def _get_config(self, msg):
        if self.config_space is None:
            raise BadMessage("no config space (CONFIG was not offered)")
        if len(msg.payload) < m.CONFIG_HEAD.size:
            raise BadMessage("short GET_CONFIG")
        offset, size, flags = m.CONFIG_HEAD.unpack_from(msg.payload)
        if offset + size > len(self.config_space):
            raise BadMessage(f"GET_CONFIG of bytes {offset}..{offset + size} of a "
                             f"{len(self.config_space)}-byte config space")
        return (m.CONFIG_HEAD.pack(offset, size, flags)
                + self.config_space[offset:offset + size])

    def _set_config(self, msg):
        raise BadMessage("the virtio-fs config space is read-only")

    def _get_queue_num(self, msg):
        return m.U64.pack(len(self.queues))

    def _get_max_mem_slots(self, msg):
        return m.U64.pack(m.MAX_MEM_SLOTS)

    def _set_owner(self, msg):
        self.owner = True

    def _reset_owner(self, msg):
        self._reset()

    def _reset_device(self, msg):
        self._reset()

    def _reset(self):
        log.info("device reset")
        self._stop_all()
        for vq in self.queues:
            self._close_queue_fds(vq)
            vq.reset()
            vq.size = 0
        self.acked_features = 0
        if self.shmem is not None:
            self.shmem.dropped()  # the frontend drops every mapping at reset
        self.device.reset()

    def _set_backend_req_fd(self, msg):
        if self.shmem is None:
            return  # we send no backend requests; the fd is closed with the message
        if len(msg.fds) != 1:
            raise BadMessage(f"SET_BACKEND_REQ_FD carries {len(msg.fds)} fds, expected 1")
        fd = msg.take_fd()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise BadMessage(f"SET_BACKEND_REQ_FD: not a socket ({e})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise BadMessage("SET_BACKEND_REQ_FD: not a Unix stream socket")
        self.shmem.attach(sock)

    def _set_vring_endian(self, msg):
        raise BadMessage("legacy (non-VERSION_1) rings are not supported")

    # -- memory ---------------------------------------------------------------------------
    def _set_mem_table(self, msg):
        p = msg.payload
        if len(p) < m.MEM_TABLE_HEAD.size:
            raise BadMessage("short SET_MEM_TABLE")
        n, _ = m.MEM_TABLE_HEAD.unpack_from(p)
        if n > 8 or n == 0:
            raise BadMessage(f"SET_MEM_TABLE with {n} regions")
        if len(p) != m.MEM_TABLE_HEAD.size + n * m.MEM_REGION.size:
            raise BadMessage(f"SET_MEM_TABLE payload of {len(p)} bytes for {n} regions")
        if len(msg.fds) != n:
            raise BadMessage(f"SET_MEM_TABLE with {n} regions carries {len(msg.fds)} fds")
        regions = []
        try:
            for i in range(n):
                gpa, size, uaddr, off = m.MEM_REGION.unpack_from(p, 8 + i * m.MEM_REGION.size)
                regions.append(MemoryRegion.from_fd(msg.fds[i], gpa, size, uaddr, off))
            memory = GuestMemory(regions)
        except GuestMemoryError:
            for r in regions:
                r.release()
            raise
        self._replace_memory(memory)

    def _add_mem_reg(self, msg):
        gpa, size, uaddr, off = self._single_region(msg)
        if len(self.memory.regions) >= m.MAX_MEM_SLOTS:
            raise BadMessage("no free memory slot")
        if len(msg.fds) != 1:
            raise BadMessage(f"ADD_MEM_REG carries {len(msg.fds)} fds, expected 1")
        region = MemoryRegion.from_fd(msg.fds[0], gpa, size, uaddr, off)
        base, replaced = self.memory, None
        if any(r.guest_phys_addr == gpa and r.size == size for r in base.regions):
            # The same slot again (QEMU re-adds its regions after a device reset): replace it.
            base, replaced = base.without_region(gpa, size)
        try:
            memory = base.with_region(region)
        except GuestMemoryError:
            region.release()
            raise
        self._replace_memory(memory, release_old=False)
        if replaced is not None:
            replaced.release()

    def _rem_mem_reg(self, msg):
        gpa, size, _, _ = self._single_region(msg)
        memory, removed = self.memory.without_region(gpa, size)
        self._replace_memory(memory, release_old=False)
        removed.release()

    def _single_region(self, msg):
        _, gpa, size, uaddr, off = self._payload(msg, m.SINGLE_MEM_REGION)
        return gpa, size, uaddr, off

    def _replace_memory(self, memory: GuestMemory, release_old: bool = True) -> None:
        """Swap the memory table with the rings paused, then re-resolve the rings."""
        running = list(self.workers)
        self._stop_all()
        old, self.memory = self.memory, memory
        for vq in self.queues:
            try:
                vq.remap(memory)
            except GuestMemoryError as e:
                log.error("queue %d no longer in guest memory: %s", vq.index, e)
                vq.reset()
        for i in running:
            self._update_queue(self.queues[i])
        if release_old:
            old.release()
        log.info("guest memory: %d region(s), %d MiB", len(memory.regions),
                 memory.total_size >> 20)

    # -- rings ----------------------------------------------------------------------------
    def _set_vring_num(self, msg):
        index, num = self._payload(msg, m.VRING_STATE)
        vq = self._queue(index)
        if not num or num & (num - 1) or num > MAX_QUEUE_SIZE:
            raise BadMessage(f"queue {index}: invalid size {num}")
        vq.size = num

    def _set_vring_addr(self, msg):
        index, flags, desc, used, avail, _log = self._payload(msg, m.VRING_ADDR)
        vq = self._queue(index)
        self._stop_worker(index)
        mem = self.memory
        vq.configure(mem, mem.user_to_guest(desc), mem.user_to_guest(avail),
                     mem.user_to_guest(used))
        self._update_queue(vq)

    def _set_vring_base(self, msg):
        index, num = self._payload(msg, m.VRING_STATE)
        vq = self._queue(index)
        if num > 0xFFFF:
            raise BadMessage(f"queue {index}: base {num} is not a 16-bit index")
        vq.set_base(num)

    def _get_vring_base(self, msg):
        index, _ = self._payload(msg, m.VRING_STATE)
        vq = self._queue(index)
        self._stop_worker(index)  # waits for the request in progress
        base = vq.next_avail
        self._close_queue_fds(vq)
        vq.reset()
        return m.VRING_STATE.pack(index, base)

    def _vring_fd(self, msg) -> tuple[Virtqueue, int | None]:
        (v,) = self._payload(msg, m.U64)
        vq = self._queue(v & m.VRING_IDX_MASK)
        if v & m.VRING_NOFD_MASK:
            if msg.fds:
                raise BadMessage("fd sent with the no-fd flag")
            return vq, None
        if len(msg.fds) != 1:
            raise BadMessage(f"expected 1 fd, got {len(msg.fds)}")
        return vq, msg.take_fd()

    def _set_vring_kick(self, msg):
        vq, fd = self._vring_fd(msg)
        if fd is None:
            raise BadMessage("polling rings without a kick fd are not supported")
        self._stop_worker(vq.index)
        if vq.kick_fd is not None:
            os.close(vq.kick_fd)
        vq.kick_fd = fd
        if not self.acked_features & m.F_PROTOCOL_FEATURES:
            vq.enabled = True
        self._update_queue(vq)

    def _set_vring_call(self, msg):
        vq, fd = self._vring_fd(msg)
        vq.set_call_fd(fd)

    def _set_vring_err(self, msg):
        vq, fd = self._vring_fd(msg)
        vq.set_err_fd(fd)

    def _set_vring_enable(self, msg):
        index, enable = self._payload(msg, m.VRING_STATE)
        vq = self._queue(index)
        if enable not in (0, 1):
            raise BadMessage(f"SET_VRING_ENABLE {enable}")
        vq.enabled = bool(enable)
        self._update_queue(vq)


# Requests whose sender always waits for a reply payload.
_REPLYING = {m.Request.GET_FEATURES, m.Request.GET_PROTOCOL_FEATURES, m.Request.GET_QUEUE_NUM,
             m.Request.GET_VRING_BASE, m.Request.GET_MAX_MEM_SLOTS, m.Request.GET_CONFIG,
             m.Request.GET_INFLIGHT_FD, m.Request.GET_STATUS, m.Request.GET_SHMEM_CONFIG}

"""vhost-user message numbers and payload layouts (QEMU docs/interop/vhost-user.rst)."""

from __future__ import annotations

import enum
import struct


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(enum.IntEnum):
    """Requests the backend sends on the SET_BACKEND_REQ_FD channel."""
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


# Virtio feature bits
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32

# Protocol feature bits
PF_MQ = 1 << 0
PF_LOG_SHMFD = 1 << 1
PF_REPLY_ACK = 1 << 3
PF_BACKEND_REQ = 1 << 5
PF_CONFIG = 1 << 9   # offered only with --tag: QEMU 7.1-8.0 crash on it for vhost-user-fs
PF_RESET_DEVICE = 1 << 13
PF_CONFIGURE_MEM_SLOTS = 1 << 15
PF_STATUS = 1 << 16
PF_SHMEM = 1 << 20   # VIRTIO shared memory regions (GET_SHMEM_CONFIG, SHMEM_MAP/UNMAP)

# Header flags
VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

HEADER = struct.Struct("<III")          # request flags size
CONFIG_HEAD = struct.Struct("<III")     # offset size flags, then the config bytes
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")      # index num
VRING_ADDR = struct.Struct("<IIQQQQ")   # index flags desc used avail log
MEM_TABLE_HEAD = struct.Struct("<II")   # nregions padding
MEM_REGION = struct.Struct("<QQQQ")     # guest_phys_addr size user_addr mmap_offset
SINGLE_MEM_REGION = struct.Struct("<QQQQQ")  # padding + region
MAX_SHMEM_REGIONS = 8
SHMEM_CONFIG = struct.Struct("<II8Q")   # nregions padding memory_sizes[8]
SHMEM_MMAP = struct.Struct("<B7xQQQQ")  # shmid padding fd_offset shm_offset len flags
SHMEM_MAP_RW = 1                        # SHMEM_MMAP flags: 0 = read-only

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
MAX_PAYLOAD = 4096 + 8   # larger than any message we accept
MAX_FDS = 32
MAX_MEM_SLOTS = 509      # as libvhost-user

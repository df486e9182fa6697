"""pyvirtiofs: a virtiofs daemon (vhost-user-fs backend) and library in Python.

Layers, one module each: :mod:`guest_memory`, :mod:`virtqueue`, :mod:`queue_worker`,
:mod:`vhost_user`, :mod:`fuse`, :mod:`filesystem` (the API), :mod:`passthrough` (a host
directory), :mod:`device` (virtio-fs queues to the FUSE server), :mod:`cli` (pyvirtiofsd).
"""

__version__ = "0.1.0"

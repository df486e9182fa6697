"""Tools to test a virtiofs file system: a public part of pyvirtiofs (docs/api.md, "Testing
your file system"), shipped with the package because users need them for their own file
systems and ``pyvirtiofs.demo`` runs on them.

- :mod:`.frontend`: a vhost-user-fs frontend that plays QEMU and the guest's virtio-fs driver
  over the real socket (``FuseClient.connect(path)``).  It is an independent oracle: it imports
  nothing of the daemon, and its FUSE and vhost-user encodings (``frontend.py``'s own structs
  and constants) are written separately from ``pyvirtiofs.fuse.abi`` and
  ``pyvirtiofs.vhost_user.messages`` on purpose, so a wrong layout on one side shows up.
- :mod:`.guestvm`: boots a real Linux guest under QEMU with shares mounted and runs a script.
- :mod:`.conformance`, :mod:`.conformance_runner`: differential file system cases (run in a
  guest on tmpfs and on the share, or on any directory) and their runner.
- :mod:`.version_client`: the guest half of the metadata version table (docs/version-table.md),
  a reference for guest drivers.

What only the project's own tests use (daemon fixtures, hand-built requests, hostile-guest
rings, a private libvirtd) lives in tests/, not here.
"""

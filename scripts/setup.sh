#!/bin/bash
# Set-up on a fresh Debian 12 machine: the apt packages a real guest needs, and a virtualenv
# (.venv) with the pinned test dependencies and pyvirtiofs installed in editable mode.
# Idempotent: does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# (grep reads the whole list: with -q it would stop early, busybox would die of SIGPIPE and
# pipefail would call the check failed, reinstalling busybox-static on every run)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x cpio >/dev/null || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)   # the Linux 6.12 guest kernel is zstd-compressed
# virtme-ng (a real client, tests/e2e/test_virtme_ng.py) needs depmod and udevadm
[ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ] || need+=(kmod)
[ -x /usr/bin/udevadm ] || [ -x /bin/udevadm ] || need+=(udev)
# the ACL and xattr tools the identity guest test runs inside the guest (the host's root)
command -v setfacl >/dev/null || need+=(acl)
command -v setfattr >/dev/null || need+=(attr)
command -v newuidmap >/dev/null || need+=(uidmap)   # --uid-map as an ordinary user (unit/test_uid_map.py)
# mypyc compiles the request path at install (setup.py): a C compiler and Python's headers
command -v gcc >/dev/null || need+=(gcc)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(
  os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need+=(python3-dev)
# libvirt (a real client, tests/e2e/test_libvirt.py); the test starts libvirtd and virtlogd
{ command -v virsh >/dev/null && [ -x /usr/sbin/libvirtd ]; } || need+=(libvirt-daemon-system libvirt-clients)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install ${need[*]} (apt-get)" >&2; exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The package is installed editable and compiled in place (PYVIRTIOFS_COMPILE=1: fail rather
# than fall back to pure Python; set PYVIRTIOFS_COMPILE=0 to work on pure Python only).  It is
# installed again when a compiled module's source changed: compiled.py says whether it did.
export PYVIRTIOFS_COMPILE="${PYVIRTIOFS_COMPILE:-1}"
stale_build() {
  [ "$PYVIRTIOFS_COMPILE" != 0 ] && ! .venv/bin/python src/pyvirtiofs/compiled.py >/dev/null
}
if [ ! -x .venv/bin/python ] || [ requirements-test.txt -nt .venv/.installed ] \
   || [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ] || stale_build; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
  echo "setup: installing pyvirtiofs (PYVIRTIOFS_COMPILE=$PYVIRTIOFS_COMPILE: about a minute to compile)" >&2
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e . \
    || .venv/bin/pip install -q --disable-pip-version-check -e .
  touch .venv/.installed
fi

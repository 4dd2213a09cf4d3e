#!/usr/bin/env bash
# The real kernel the VM tests boot (tests/vm): Debian's linux-image-amd64 and the matching
# headers, fetched with `apt-get download` and unpacked into /var/cache/nbdsink-vm (or
# $NBDSINK_VM_CACHE) -- never installed: the host keeps its own kernel. The headers build
# kmod/dm against it. Idempotent; the logic (each package at its own candidate version) lives in
# tests/vm/kernel_cache.py, which the tests also check against skewed archives.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec /usr/bin/python3 "$repo/tests/vm/kernel_cache.py"

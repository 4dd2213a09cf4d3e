#!/usr/bin/env bash
# Installs everything nbdsink needs on Debian 12, idempotently: Debian packages (nbdkit with
# its Python plugin, libnbd tools, qemu, eBPF toolchain, filesystems), then a virtualenv at
# .venv built from Debian's /usr/bin/python3 -- the same interpreter nbdkit's Python plugin
# embeds, so the packages installed there import inside nbdkit too.
# Safe to run any number of times; quiet when nothing is missing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

. "$repo/scripts/as-root.sh"
become_root "$0" "$@"

APT_PACKAGES=(
    # the server side and the NBD tools the tests and users drive it with
    # (nbdfuse ships in libnbd-bin; fuse3 brings fusermount3 for it)
    nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fuse3 nbd-client nbd-server
    qemu-utils
    # the real kernel in a VM (tests/vm) and what the guest's initramfs is made of
    qemu-system-x86 busybox-static cpio kmod dmsetup
    # LUKS in the guest: the encrypted-at-rest test replicates a dm-crypt container
    cryptsetup-bin
    # Python: venv and headers for the embedded interpreter
    python3 python3-venv python3-dev
    # the eBPF tracker: clang/llvm for CO-RE, libbpf to load it, bpftool for vmlinux.h
    clang llvm libbpf-dev libbpf1 bpftool
    # building the dm target module
    build-essential
    # filesystems and workloads used by tests and benchmarks (a real database among them)
    e2fsprogs xfsprogs btrfs-progs dosfstools fio util-linux postgresql-15
    # TLS certificates for tests
    gnutls-bin openssl
    # misc
    make git ca-certificates rsync
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtualenv: rebuilt only when pyproject.toml changed since the last install.
stamp=.venv/.nbdsink-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(readlink -f .venv/bin/python)" != "$(readlink -f /usr/bin/python3)" ]; then
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing Python packages into .venv" >&2
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi

# Optional extra steps owned by other parts (the VM kernel cache, the BPF object): each
# script in scripts/setup.d/ is run in order and must itself be idempotent.
if [ -d scripts/setup.d ]; then
    for s in scripts/setup.d/*.sh; do
        [ -e "$s" ] || continue
        bash "$s"
    done
fi

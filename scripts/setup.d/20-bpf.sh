#!/usr/bin/env bash
# Builds the eBPF change tracker (kmod/bpf) when the kernel has BTF; make rebuilds only what
# changed, so this is cheap to run again. The loader also builds it on first use.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -e /sys/kernel/btf/vmlinux ]; then
    make -s -C "$repo/kmod/bpf"
fi

#!/usr/bin/env bash
# Install dm-nbdsink through DKMS, so it is rebuilt for every new kernel.
#   deploy/dkms/install.sh             stage /usr/src/nbdsink-<version>, dkms add/build/install
#   deploy/dkms/install.sh --stage DIR only stage the DKMS source tree into DIR
# Needs the dkms package and the running kernel's headers (linux-headers-$(uname -r)).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' "$here/dkms.conf")"

stage() {
    local dest="$1"
    mkdir -p "$dest/dm" "$dest/include"
    cp "$here/dkms.conf" "$dest/"
    cp "$repo/kmod/dm/Kbuild" "$repo/kmod/dm/Makefile" "$repo/kmod/dm/dm-nbdsink.c" "$dest/dm/"
    cp "$repo/kmod/include/nbdsink_dm.h" "$dest/include/"
}

if [ "${1:-}" = "--stage" ]; then
    stage "${2:?--stage needs a directory}"
    exit 0
fi
if ! command -v dkms >/dev/null; then
    echo "install.sh: dkms is not installed (apt-get install dkms)" >&2
    exit 1
fi
src="/usr/src/nbdsink-$version"
if dkms status "nbdsink/$version" | grep -q .; then
    dkms remove "nbdsink/$version" --all
fi
rm -rf "$src"
stage "$src"
dkms add "nbdsink/$version"
dkms build "nbdsink/$version"
dkms install "nbdsink/$version"
echo "dm-nbdsink installed; load it with: modprobe dm-nbdsink"

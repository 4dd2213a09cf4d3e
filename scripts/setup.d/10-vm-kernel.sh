#!/usr/bin/env bash
# The real kernel the VM tests boot (tests/vm): Debian's linux-image-amd64 and the matching
# headers, fetched with `apt-get download` and unpacked with `dpkg -x` into a cache directory
# -- never installed: the host keeps its own kernel. The headers build kmod/dm against it.
# Idempotent: does nothing when the cache already holds the current version.
#
# Layout of $NBDSINK_VM_CACHE (default /var/cache/nbdsink-vm):
#   debs/      the downloaded packages (kept, so a re-unpack needs no network)
#   root/      image + headers + kbuild unpacked: boot/vmlinuz-<rel>, lib/modules/<rel>/{kernel,build}
#   current    the kernel release string (e.g. 6.1.0-56-amd64)
set -euo pipefail
cache="${NBDSINK_VM_CACHE:-/var/cache/nbdsink-vm}"
mkdir -p "$cache/debs"

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
image_pkg="$(resolve)"
if [ -z "$image_pkg" ]; then
    apt-get update -qq
    image_pkg="$(resolve)"
fi
[ -n "$image_pkg" ] || { echo "setup.d/10-vm-kernel: cannot resolve linux-image-amd64" >&2; exit 1; }
release="${image_pkg#linux-image-}"          # 6.1.0-56-amd64
abi="${release%-amd64}"                      # 6.1.0-56
series="$(echo "$release" | cut -d. -f1-2)"  # 6.1
root="$cache/root"
if [ "$(cat "$cache/current" 2>/dev/null)" = "$release" ] \
    && [ -f "$root/boot/vmlinuz-$release" ] \
    && [ -f "$root/lib/modules/$release/modules.dep" ] \
    && [ -f "$root/usr/src/linux-headers-$release/Makefile" ]; then
    exit 0
fi

echo "setup: fetching kernel $release for the VM tests into $cache" >&2
version="$(apt-cache show "$image_pkg" | awk '/^Version:/ {print $2; exit}')"
pkgs=("$image_pkg" "linux-headers-$release" "linux-headers-$abi-common" "linux-kbuild-$series")
for p in "${pkgs[@]}"; do
    if ! ls "$cache/debs/${p}_${version}_"*.deb >/dev/null 2>&1; then
        rm -f "$cache/debs/${p}_"*.deb
        # -o APT::Sandbox::User=root: the cache dir is root's; _apt could not write there.
        (cd "$cache/debs" && apt-get download -qq -o APT::Sandbox::User=root "$p")
    fi
done

rm -rf "$root.new"
mkdir -p "$root.new"
for p in "${pkgs[@]}"; do
    dpkg -x "$(ls "$cache/debs/${p}_${version}_"*.deb | head -n1)" "$root.new"
done
# The packages point at /usr/src/... by absolute path (build/source links, the arch headers'
# Makefile). Make them relative to the unpacked tree so Kbuild works from the cache.
mods="$root.new/lib/modules/$release"
ln -sfn "../../../usr/src/linux-headers-$release" "$mods/build"
ln -sfn "../../../usr/src/linux-headers-$abi-common" "$mods/source"
sed -i "s#^include /usr/src/#include $root/usr/src/#" "$root.new/usr/src/linux-headers-$release/Makefile"
depmod -b "$root.new" "$release"
rm -rf "$root"
mv "$root.new" "$root"
echo "$release" > "$cache/current"

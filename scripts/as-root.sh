# Sourced by the scripts that need root: as root, nothing happens; otherwise the calling
# script runs again under sudo (keeping the variables named in NBDSINK_SUDO_KEEP), or, where
# sudo is not installed, stops with one line saying to run it as root.
# Usage: become_root "$0" "$@"
become_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    if ! command -v sudo >/dev/null 2>&1; then
        echo "$(basename "$1"): needs root, and sudo is not installed: run it as root" >&2
        exit 1
    fi
    exec sudo --preserve-env="${NBDSINK_SUDO_KEEP:-NBDSINK_REQUIRE_ALL,NBDSINK_STORE,CI}" "$@"
}

#!/usr/bin/env bash
# The main job, on the embedded default: scripts/demo.sh [DEVICE] (as root, or it asks sudo)
#
#   1. installs what is missing (scripts/setup.sh),
#   2. serves a store inside the repository (./var/store) on a unix socket (./var/nbdsink.sock),
#   3. without DEVICE: makes a 512 MiB demo disk (a loop device over ./var/demo/disk.img) with
#      ext4 on it, mounted at ./var/demo/mnt, and runs a small workload writing, renaming
#      and deleting files there;
#   4. replicates the device continuously (every 5 s, freezing the filesystem for a moment
#      when it is mounted, so each version is the filesystem at one instant),
#   5. shows the versions as they are committed, and how to attach one.
#
# Ctrl-C stops it: the workload, the sender (cleanly), the mount, the tracker, the loop device
# and the server are all torn down. Running it again picks up where it left off (the demo disk
# and the store are kept in ./var; delete ./var to start from scratch). Leftovers of a run that
# was killed hard are cleaned up first.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. "$repo/scripts/as-root.sh"
become_root "$0" "$@"
scripts/setup.sh

nbdsink() { "$repo/.venv/bin/nbdsink" "$@"; }
VAR="$repo/var"
STORE="$VAR/store"
SOCK="$VAR/nbdsink.sock"
DEMO="$VAR/demo"
IMG="$DEMO/disk.img"
MNT="$DEMO/mnt"
STATE="$DEMO/sender-state"
LOGS="$DEMO/logs"
mkdir -p "$STORE" "$DEMO" "$LOGS"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# One demo per checkout: a second one would tear down the first one's server, sender and disk.
exec 9>"$VAR/demo.lock"
if ! flock -n 9; then
    echo "demo.sh: a demo is already running from this checkout ($repo); stop it with Ctrl-C first" >&2
    exit 1
fi

# -- teardown (also used to clear what a run killed with SIGKILL left behind) --------------------

stop_pid() {  # stop_pid NAME: SIGTERM the process group recorded in $DEMO/NAME.pid, wait
    # Every background part runs under setsid, so its pid is its process group: signalling
    # the group also stops its children (the workload's sleep and head live in the mount).
    local file="$DEMO/$1.pid" pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if kill -0 -- "-$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 -- "-$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

teardown() {
    stop_pid workload
    stop_pid sender
    if mountpoint -q "$MNT" 2>/dev/null; then
        fsfreeze -u "$MNT" 2>/dev/null || true   # in case a sender died while it was frozen
        umount "$MNT" || umount -l "$MNT"
    fi
    if [ -f "$DEMO/device" ]; then
        local dev
        dev="$(cat "$DEMO/device")"
        nbdsink track stop "$dev" >/dev/null 2>&1 || true
        rm -f "$DEMO/device"
    fi
    local loop
    for loop in $(losetup -j "$IMG" -O NAME -n 2>/dev/null); do
        nbdsink track stop "$loop" >/dev/null 2>&1 || true
        losetup -d "$loop" || true
    done
    # With its tracker stopped, the sender's state cannot be continued, and the next run may
    # get another loop device: it starts afresh and synchronises by comparing digests with
    # what the store already holds, sending only what differs.
    rm -rf "$STATE"
    stop_pid server
}

cleanup() {
    trap - EXIT INT TERM
    # Ctrl-C also ends a `| tee` reading our output; ignore SIGPIPE so that the teardown
    # still runs to the end when its messages have nowhere to go.
    trap '' PIPE
    set +e
    say "stopping: workload, sender, mount, tracker, loop device, server"
    teardown
    echo "stopped; the store and its versions stay in $STORE"
}

teardown  # leftovers of an earlier run
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- the server -------------------------------------------------------------------------------

say "serving $STORE on $SOCK"
setsid "$repo/.venv/bin/nbdsink" serve --store "$STORE" --socket "$SOCK" >"$LOGS/server.log" 2>&1 9>&- &
echo $! >"$DEMO/server.pid"
for _ in $(seq 200); do
    nbdinfo --list "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && break
    kill -0 "$(cat "$DEMO/server.pid")" 2>/dev/null || { cat "$LOGS/server.log"; exit 1; }
    sleep 0.1
done

# -- the device -------------------------------------------------------------------------------

if [ $# -ge 1 ]; then
    DEVICE="$1"
    [ -b "$DEVICE" ] || { echo "demo: $DEVICE is not a block device" >&2; exit 2; }
    VOLUME="$(basename "$(readlink -f "$DEVICE")" | tr -c 'A-Za-z0-9_.-\n' '-')"
    FREEZE="$(findmnt -n -o TARGET --source "$DEVICE" 2>/dev/null | head -1 || true)"
    WORKLOAD=0
else
    if [ ! -f "$IMG" ]; then
        truncate -s 512M "$IMG"
        NEW_FS=1
    else
        NEW_FS=0
    fi
    DEVICE="$(losetup -f --show "$IMG")"
    [ "$NEW_FS" = 1 ] && mkfs.ext4 -q -L nbdsink-demo "$DEVICE"
    mkdir -p "$MNT"
    mount "$DEVICE" "$MNT"
    VOLUME=demo
    FREEZE="$MNT"
    WORKLOAD=1
fi
echo "$DEVICE" >"$DEMO/device"
SIZE="$(blockdev --getsize64 "$DEVICE")"
volumes="$(nbdsink volume list --json --store "$STORE")"
if ! grep -q "\"name\": \"$VOLUME\"" <<<"$volumes"; then
    nbdsink volume create "$VOLUME" --size "$SIZE" --store "$STORE"
fi
URI="nbd+unix:///$VOLUME?socket=$SOCK"

# -- replication and workload -----------------------------------------------------------------

say "replicating $DEVICE to $URI every 5s${FREEZE:+ (freezing $FREEZE for each version)}"
freeze_args=()
[ -n "$FREEZE" ] && freeze_args=(--freeze "$FREEZE" --max-freeze 500ms)
setsid "$repo/.venv/bin/nbdsink" replicate "$DEVICE" "$URI" --state "$STATE" --interval 5s \
    "${freeze_args[@]}" >"$LOGS/sender.log" 2>&1 9>&- &
echo $! >"$DEMO/sender.pid"

if [ "$WORKLOAD" = 1 ]; then
    # A small workload: a file a second, some renamed, some deleted.
    setsid bash -c '
        cd "$1"; mkdir -p work; n=0
        while true; do
            n=$((n + 1))
            head -c $(( (RANDOM % 64 + 1) * 4096 )) /dev/urandom > "work/file-$n"
            [ $((n % 3)) = 0 ] && mv "work/file-$((n - 1))" "work/renamed-$n" 2>/dev/null
            [ $((n % 5)) = 0 ] && rm -f "work/file-$((n - 4))"
            date -u +%FT%T.%3NZ > last-write
            sleep 1
        done' workload "$MNT" >"$LOGS/workload.log" 2>&1 9>&- &
    echo $! >"$DEMO/workload.pid"
fi

cat <<EOF

Logs: $LOGS/{server,sender,workload}.log    Stop with Ctrl-C.

Attach a version read-only on this host (N from the list below):
    mkdir -p /tmp/v && nbdfuse -r /tmp/v 'nbd+unix:///$VOLUME@N?socket=$SOCK' &
    dev=\$(losetup -r -f --show /tmp/v/nbd) && mount -o ro,noload \$dev /mnt
  or, on a kernel with the nbd driver:
    nbd-client -unix $SOCK /dev/nbd0 -N '$VOLUME@N' -readonly -b 4096 && mount -o ro,noload /dev/nbd0 /mnt
  or copy it out:  nbdcopy 'nbd+unix:///$VOLUME@latest?socket=$SOCK' restored.img
EOF

# The monitoring commands run in their own session so that Ctrl-C (which the terminal sends
# to the whole foreground group) interrupts only this loop, which then tears everything down.
quiet() { setsid -w "$@" </dev/null; }
while true; do
    sleep 10
    kill -0 "$(cat "$DEMO/sender.pid")" 2>/dev/null || { say "the sender stopped:"; tail -5 "$LOGS/sender.log"; exit 1; }
    say "$(date -u +%T) versions of $VOLUME (newest last)"
    listing="$(quiet "$repo/.venv/bin/nbdsink" versions "$VOLUME" --store "$STORE")"
    printf '%s\n' "$listing" | head -1
    printf '%s\n' "$listing" | tail -n +2 | tail -5
    grep ' cycle version=' "$LOGS/sender.log" | tail -1 | sed 's/^.*cycle /last cycle: /' || true
    quiet "$repo/.venv/bin/nbdsink" status --state "$STATE" | grep -E '^(behind|pending|last error)' || true
done

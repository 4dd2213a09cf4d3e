"""Freezing a mounted filesystem (FIFREEZE/FITHAW) so a version equals the device at one instant.

FIFREEZE flushes the filesystem and blocks new writes until FITHAW; while frozen, the
device holds a clean, consistent image (the journal is checkpointed). The state directory
records the frozen mountpoint *before* freezing, so if the sender dies while the filesystem
is frozen, the next start thaws it (:func:`thaw_leftover`) instead of leaving applications
blocked.

While frozen, nothing may write to that filesystem: not the state directory, not a log
file. The sender only reads the device into memory during the freeze.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os

import trio

from nbdsink.sender.errors import FreezeError
from nbdsink.sender.hooks import run_hook
from nbdsink.sender.state import StateDir

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def _ioctl(mountpoint: str, request: int) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def freeze(mountpoint: str) -> None:
    """Freeze the filesystem mounted at ``mountpoint`` (blocking: it flushes first)."""
    try:
        _ioctl(mountpoint, FIFREEZE)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FreezeError(f"{mountpoint} is already frozen (by another program?)") from exc
        if exc.errno == errno.EOPNOTSUPP:
            raise FreezeError(f"the filesystem at {mountpoint} cannot be frozen") from exc
        raise FreezeError(f"cannot freeze {mountpoint}: {exc.strerror}") from exc


def sync(mountpoint: str) -> None:
    """syncfs(2): write the filesystem's dirty data and metadata to the device, unfrozen.

    Dirty pages in the page cache are invisible to a block-level tracker until written back
    (xfs may hold them for half a minute); syncing first lets the cycle see and send them
    while applications run, leaving less for the freeze to flush.
    """
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise FreezeError(f"cannot sync {mountpoint}: {os.strerror(err)}")
    finally:
        os.close(fd)


def thaw(mountpoint: str) -> bool:
    """Thaw ``mountpoint``; returns False if it was not frozen."""
    try:
        _ioctl(mountpoint, FITHAW)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise FreezeError(f"cannot thaw {mountpoint}: {exc.strerror}") from exc
    return True


def thaw_leftover(state_dir: StateDir) -> str | None:
    """Thaw a filesystem a previous sender froze and never thawed (it was killed).

    Returns the mountpoint that was thawed, or None when there was nothing to do.
    """
    mountpoint = state_dir.frozen_mountpoint()
    if mountpoint is None:
        return None
    thawed = False
    if os.path.isdir(mountpoint):
        thawed = thaw(mountpoint)
    if thawed:
        log.warning("thawed %s, left frozen by a sender that did not finish", mountpoint)
    state_dir.clear_frozen()
    return mountpoint if thawed else None


def mount_source(mountpoint: str) -> tuple[int, int]:
    """The (major, minor) of the device mounted at ``mountpoint``, from /proc/self/mountinfo.

    The last matching line wins: it is the mount on top, the one a path resolves to.
    """
    target = os.path.realpath(mountpoint)
    found: tuple[int, int] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                major, minor = fields[2].split(":")
                found = (int(major), int(minor))
    if found is None:
        raise FreezeError(f"{mountpoint} is not a mountpoint")
    return found


def stacked_on(upper: tuple[int, int], lower: tuple[int, int], sys_root: str = "/sys") -> bool:
    """Is block device ``upper`` (major, minor) ``lower``, or built on it through layers?

    A filesystem in a LUKS container or an LVM volume sits on a device-mapper device whose
    ``slaves`` in sysfs lead down to the replicated partition. Freezing that filesystem
    flushes every layer in between (the freeze waits for its writes, which complete only
    once each layer wrote the device under it), so the replicated device is then at rest
    too: replicating the container keeps the backup ciphertext and still point-in-time.
    """
    seen: set[tuple[int, int]] = set()
    todo = [upper]
    while todo:
        dev = todo.pop()
        if dev == lower:
            return True
        if dev in seen:
            continue
        seen.add(dev)
        slaves = os.path.join(sys_root, "dev", "block", f"{dev[0]}:{dev[1]}", "slaves")
        try:
            names = os.listdir(slaves)
        except OSError:
            continue  # no layer under it (a disk, a partition, a loop device)
        for name in names:
            try:
                with open(os.path.join(slaves, name, "dev")) as f:
                    major, minor = f.read().strip().split(":")
            except (OSError, ValueError):
                continue
            todo.append((int(major), int(minor)))
    return False


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\"
    )


FREEZE_LOCK_DIR = "/run/nbdsink/freeze"


class FreezeLock:
    """One freeze of a filesystem at a time among nbdsink senders.

    Two replications of one device (two backup targets) both freeze its filesystem; a second
    FIFREEZE while the first holds it fails with EBUSY. Each sender takes this lock (an
    ``flock`` on a file named after the filesystem's device, outside any filesystem that gets
    frozen) from just before freezing until after thawing, so they take turns. The kernel
    drops the lock of a sender that dies, so nobody waits for a dead one.
    """

    def __init__(self, mountpoint: str) -> None:
        major, minor = mount_source(mountpoint)
        self.path = os.path.join(FREEZE_LOCK_DIR, f"{major}:{minor}.lock")
        self._fd: int | None = None

    async def acquire(self) -> None:
        os.makedirs(FREEZE_LOCK_DIR, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        waited = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.info("waiting for another sender's freeze of the same filesystem")
                        waited = True
                    await trio.sleep(0.01)  # polled, so a cancellation is never stuck here
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class FsFreezer:
    """The real :class:`~nbdsink.sender.cycle.Freezer`: hooks, the marker file, the ioctls."""

    def __init__(
        self,
        mountpoint: str,
        state_dir: StateDir,
        *,
        pre_hook: str | None = None,
        post_hook: str | None = None,
        frozen_hook: str | None = None,
        hook_timeout: float = 60.0,
    ) -> None:
        self.mountpoint = mountpoint
        self.state_dir = state_dir
        self.pre_hook = pre_hook
        self.post_hook = post_hook
        self.frozen_hook = frozen_hook
        self.hook_timeout = hook_timeout
        self._env = {"NBDSINK_MOUNTPOINT": mountpoint}
        self._lock = FreezeLock(mountpoint)

    async def sync(self) -> None:
        await trio.to_thread.run_sync(sync, self.mountpoint)

    async def before(self) -> None:
        if self.pre_hook:
            await run_hook(self.pre_hook, phase="pre", timeout=self.hook_timeout, env=self._env)
        await self._lock.acquire()
        try:
            # Recorded before freezing (and outside the freeze window: it fsyncs the state
            # directory), so that a sender killed while frozen leaves a trace the next start
            # reads.
            self.state_dir.mark_frozen(self.mountpoint)
        except BaseException:
            self._lock.release()
            raise

    async def freeze(self) -> None:
        await trio.to_thread.run_sync(freeze, self.mountpoint)

    async def while_frozen(self, frozen_at: str) -> None:
        if self.frozen_hook:
            await run_hook(self.frozen_hook, phase="frozen", timeout=self.hook_timeout,
                           env={**self._env, "NBDSINK_FROZEN_AT": frozen_at})

    async def thaw(self) -> None:
        await trio.to_thread.run_sync(thaw, self.mountpoint)

    async def after(self) -> None:
        # Thawed (or never frozen, if freeze() failed): the marker can go.
        try:
            self.state_dir.clear_frozen()
        finally:
            self._lock.release()
        if self.post_hook:
            await run_hook(self.post_hook, phase="post", timeout=self.hook_timeout, env=self._env)

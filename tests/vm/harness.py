"""Run commands inside a real Linux kernel: Debian's linux-image-amd64 under qemu (TCG).

The host kernel cannot load modules and has neither nbd nor device-mapper, so everything
that needs them runs in a guest:

* the kernel, its modules and its headers come from ``scripts/setup.d/10-vm-kernel.sh``
  (``apt-get download`` + ``dpkg -x`` into ``$NBDSINK_VM_CACHE``, default
  ``/var/cache/nbdsink-vm``; fetched once, then reused);
* a busybox initramfs loads the virtio/9p/overlay modules, mounts the host's root read-only
  over 9p, puts a tmpfs overlay on top (the guest may write anywhere; nothing reaches the
  host) and ``chroot``s into it, so the guest runs the host's own python, nbdkit,
  nbd-client, dmsetup, mkfs ...;
* a second, writable 9p share carries the command in and its output and exit status out.

``run("command")`` boots, runs the command under ``/bin/sh`` in the repository, powers off
and returns a :class:`VmResult`. ``boot(script)`` instead hands PID 1 to ``script`` (a
second-stage init, which may ``switch_root`` into another root) and returns the console. A
missing qemu or kernel raises :class:`VmError`: never a silent skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NBDSINK_VM_CACHE", "/var/cache/nbdsink-vm"))
KERNEL_SETUP = REPO / "scripts" / "setup.d" / "10-vm-kernel.sh"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")

GUEST_SHARE = "/run/vm"
"""Where the writable share (the command, its output, anything a test passes out) appears."""

# Loaded by the initramfs (with their dependencies) before the root can be mounted.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

_INIT = r"""#!/bin/busybox sh
# nbdsink test guest: host root over 9p + tmpfs overlay, then run /run/vm/cmd.sh in it.
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "nbdsink-vm: $*"; poweroff -f; }
mkdir -p /proc /sys /dev /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do insmod "/modules/$m" || fail "insmod $m"; done
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose host /lower \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "cannot mount the overlay root"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/vm /newroot/run/lock
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /newroot/run/vm \
    || fail "cannot mount the result share"
# Host folders that the tmpfs mounts above hide (a checkout under /tmp, say) come back as
# overlays of their own, writable in the guest like the rest.
n=0
for path in $(cat /newroot/run/vm/overlays 2>/dev/null); do
    n=$((n + 1))
    mkdir -p "/upper/o$n/data" "/upper/o$n/work" "/newroot$path"
    mount -t overlay -o "lowerdir=/lower$path,upperdir=/upper/o$n/data,workdir=/upper/o$n/work" \
        overlay "/newroot$path" || fail "cannot overlay $path"
done
# Give the guest's own kernel its modules (the host has none), so modprobe works in it.
release=$(uname -r)
mkdir -p /newroot/usr/lib/modules
ln -sfn "$(cat /modules.root)/lib/modules/$release" "/newroot/usr/lib/modules/$release"
# The kernel's own module requests (crypto algorithms, ...) run /sbin/modprobe in init's
# root, which is this initramfs: forward them into the chroot.
mkdir -p /sbin
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot /sbin/modprobe "$@"\n' > /sbin/modprobe
chmod 755 /sbin/modprobe
# boot(): a script that runs as PID 1 from here on (a second-stage init: it may
# switch_root away and never come back), instead of a command in the chroot.
if [ -f /newroot/run/vm/init.sh ]; then
    echo "nbdsink-vm: handing PID 1 to init.sh"
    . /newroot/run/vm/init.sh
    fail "init.sh returned"
fi
echo "nbdsink-vm: running"
chroot /newroot /bin/sh -c '. /run/vm/cmd.sh' >/newroot/run/vm/output 2>&1
echo $? > /newroot/run/vm/status
sync
umount /newroot/run/vm
echo "nbdsink-vm: done"
poweroff -f
"""


GUEST_TMPFS = ("/tmp", "/run", "/dev/shm")
"""Where the guest mounts fresh tmpfs over the host's root, hiding what the host has there."""


def _hidden_paths(cwd: str | Path) -> list[str]:
    """The repository and ``cwd`` when a guest tmpfs would hide them (a clone in /tmp)."""
    out: list[str] = []
    for path in (REPO.resolve(), Path(cwd).resolve()):
        text = str(path)
        hidden = any(text == t or text.startswith(t + "/") for t in GUEST_TMPFS)
        if hidden and not any(text == o or text.startswith(o + "/") for o in out):
            out.append(text)
    return out


class VmError(Exception):
    """The guest could not be prepared, booted or finished: the message says why."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel: image, modules, headers."""

    release: str
    root: Path

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def build(self) -> Path:
        """The Kbuild tree to build out-of-tree modules against."""
        return self.root / "usr" / "src" / f"linux-headers-{self.release}"


@dataclass(frozen=True)
class VmResult:
    """What a command run in the guest left: exit status, its output, the serial console."""

    returncode: int
    output: str
    console: str
    crashed: bool = False
    """The guest went down (panic, reset) before the command finished (``returncode`` -1)."""

    def check(self) -> VmResult:
        """Raise :class:`VmError` with the output when the command failed."""
        if self.returncode != 0:
            raise VmError(
                f"guest command exited {self.returncode}\n--- output ---\n{self.output}"
                f"\n--- console (tail) ---\n{self.console[-3000:]}"
            )
        return self


def kernel() -> Kernel:
    """The cached kernel, fetched first (``scripts/setup.d/10-vm-kernel.sh``) if needed."""
    current = CACHE / "current"
    if not _kernel_ready(current):
        proc = subprocess.run(
            ["bash", str(KERNEL_SETUP)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not _kernel_ready(current):
            raise VmError(
                f"cannot provide the VM kernel ({KERNEL_SETUP} exited {proc.returncode}):\n"
                f"{proc.stderr[-2000:]}"
            )
    return Kernel(current.read_text().strip(), CACHE / "root")


def _kernel_ready(current: Path) -> bool:
    if not current.is_file():
        return False
    k = Kernel(current.read_text().strip(), CACHE / "root")
    return k.image.is_file() and (k.modules / "modules.dep").is_file()


def module_closure(k: Kernel, names: tuple[str, ...]) -> list[str]:
    """Paths (relative to the modules dir) of ``names`` and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (k.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.removesuffix(".ko").replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists the full closure, nearest first; load the farthest first.
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in names:
        module = by_name.get(name.replace("-", "_"))
        if module is None:
            builtin = (k.modules / "modules.builtin").read_text()
            if f"/{name}.ko" in builtin:
                continue
            raise VmError(f"kernel {k.release} has no module {name}")
        visit(module)
    return order


def initramfs(k: Kernel) -> Path:
    """The busybox initramfs for ``k``, built once per (kernel, init script) and cached."""
    if not BUSYBOX.is_file():
        raise VmError(f"{BUSYBOX} is missing: install busybox-static (scripts/setup.sh)")
    if shutil.which("cpio") is None:
        raise VmError("cpio is missing: install it (scripts/setup.sh)")
    mods = module_closure(k, INITRAMFS_MODULES)
    key = hashlib.sha256(
        "\n".join([k.release, _INIT, *mods, str(BUSYBOX.stat().st_mtime)]).encode()
    ).hexdigest()[:16]
    out = CACHE / f"initramfs-{k.release}-{key}.cpio"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        staging = Path(tmp) / "root"
        for d in ("bin", "modules"):
            (staging / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, staging / "bin" / "busybox")
        (staging / "init").write_text(_INIT)
        (staging / "init").chmod(0o755)
        for m in mods:
            shutil.copy2(k.modules / m, staging / "modules" / Path(m).name)
        (staging / "modules.list").write_text("\n".join(Path(m).name for m in mods) + "\n")
        (staging / "modules.root").write_text(f"{k.root}\n")
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
        part = Path(tmp) / "initramfs.cpio"
        with part.open("wb") as f:
            subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                input="\n".join(files).encode(),
                stdout=f,
                cwd=staging,
                check=True,
            )
        part.replace(out)
    return out


def build_dm_module(k: Kernel) -> Path:
    """Build ``kmod/dm`` against ``k``'s headers (warnings are errors); cached by source."""
    dm_dir = REPO / "kmod" / "dm"
    sources = [
        REPO / "kmod" / "include" / "nbdsink_dm.h",
        *sorted(p for p in dm_dir.iterdir() if p.name in ("Kbuild", "Makefile") or p.suffix in (".c", ".h")),
    ]
    digest = hashlib.sha256(k.release.encode())
    for p in sources:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    build = CACHE / f"build-dm-{digest.hexdigest()[:16]}"
    ko = build / "dm" / "dm-nbdsink.ko"
    if ko.is_file():
        return ko
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise VmError("make and gcc are needed to build kmod/dm (build-essential)")
    if not (k.build / "Makefile").is_file():
        raise VmError(f"no kernel headers at {k.build}: run {KERNEL_SETUP}")
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="build-dm-tmp-"))
    try:
        shutil.copytree(REPO / "kmod" / "dm", tmp / "dm", ignore=shutil.ignore_patterns("*.o", "*.ko", ".*", "*.mod*"))
        shutil.copytree(REPO / "kmod" / "include", tmp / "include")
        proc = subprocess.run(
            ["make", "-C", str(tmp / "dm"), f"KDIR={k.build}", "KCFLAGS=-Werror"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not (tmp / "dm" / "dm-nbdsink.ko").is_file():
            raise VmError(f"building kmod/dm failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        # Another run may have finished the same build meanwhile: either copy is good.
        with contextlib.suppress(OSError):
            tmp.rename(build)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ko


def run(
    command: str,
    *,
    timeout: float = 600,
    memory_mb: int = 1536,
    cpus: int = 2,
    env: Mapping[str, str] | None = None,
    cwd: str | Path = REPO,
    console_log: Path | None = None,
    drives: Sequence[Path] = (),
    expect_crash: bool = False,
) -> VmResult:
    """Boot the guest, run ``command`` (``/bin/sh`` syntax) in ``cwd``, return its result.

    ``env`` is exported in the guest (``NBDSINK_IN_VM=1`` and ``NBDSINK_VM_SHARE`` always
    are); files written under ``$NBDSINK_VM_SHARE`` are readable from ``VmResult`` callers
    only through the output, so print what the host needs. The guest is killed after
    ``timeout`` seconds (:class:`VmError`, with the console's tail).

    ``drives`` are raw image files attached as virtio disks (``/dev/vda``, ``/dev/vdb`` ...;
    load ``virtio_blk`` first); what the guest writes to them stays, so a later boot sees it.
    With ``expect_crash`` a guest that goes down before the command ends (a panic, as
    ``echo c > /proc/sysrq-trigger`` makes) is a result (``crashed``), not an error.
    """
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} is missing: install qemu-system-x86 (scripts/setup.sh)")
    k = kernel()
    ramfs = initramfs(k)
    guest_env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        # No udev in the guest: libdevmapper makes the /dev/mapper nodes itself.
        "DM_DISABLE_UDEV": "1",
        **(env or {}),
        "NBDSINK_IN_VM": "1",
        "NBDSINK_VM_SHARE": GUEST_SHARE,
    }
    with tempfile.TemporaryDirectory(prefix="nbdsink-vm-") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        script = "".join(f"export {key}={shlex.quote(val)}\n" for key, val in guest_env.items())
        script += f"cd {shlex.quote(str(cwd))} || exit 125\n{command}\n"
        (share / "cmd.sh").write_text(script)
        (share / "overlays").write_text("".join(f"{p}\n" for p in _hidden_paths(cwd)))
        console = console_log or Path(tmp) / "console.log"
        argv = _qemu_argv(k, ramfs, share, console, memory_mb=memory_mb, cpus=cpus, drives=drives)
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise VmError(
                f"guest did not finish within {timeout:.0f}s\n--- output ---\n"
                f"{_read(share / 'output')}\n--- console (tail) ---\n{_read(console)[-3000:]}"
            ) from exc
        elapsed = time.monotonic() - start
        status = _read(share / "status").strip()
        if expect_crash and proc.returncode == 0 and not status:
            return VmResult(-1, _read(share / "output"), _read(console), crashed=True)
        if proc.returncode != 0 or not status.isdigit():
            raise VmError(
                f"guest failed after {elapsed:.0f}s (qemu exit {proc.returncode}, "
                f"no exit status from the command)\n{proc.stderr[-2000:]}\n"
                f"--- output ---\n{_read(share / 'output')[-3000:]}\n"
                f"--- console (tail) ---\n{_read(console)[-3000:]}"
            )
        return VmResult(int(status), _read(share / "output"), _read(console))


STORE_SERVER_STAGE = r"""
# A program of the host's root, run in it with an ordinary environment (PID 1 has PATH=/bin).
host() {
    chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 TMPDIR=/tmp "$@"
}

# -- the backup host: nbdsink serve on the store disk (/dev/vda)
host modprobe -a virtio_blk nbd crc32c_generic ext4 || fail "modprobe"
i=0
until [ -b /newroot/dev/vda ]; do
    i=$((i + 1)); [ $i -lt 100 ] || fail "no /dev/vda"; sleep 0.1
done
mkdir -p /newroot/srv/backup
host mount /dev/vda /srv/backup || fail "cannot mount the store disk"
host __NBDSINK__ serve --store /srv/backup/store --socket /run/nbdsink.sock \
    > /newroot/run/nbdsink-serve.log 2>&1 &
i=0
until [ -S /newroot/run/nbdsink.sock ]; do
    i=$((i + 1))
    [ $i -lt 1200 ] || fail "nbdsink serve did not start: $(cat /newroot/run/nbdsink-serve.log)"
    sleep 0.1
done
"""


def store_server_stage() -> str:
    """The start of a ``boot`` init for a backup host: ``host CMD`` runs CMD in the host root,
    the first drive (ext4, the store in ``store/``) is mounted at ``/srv/backup``, and
    ``nbdsink serve`` listens on ``/run/nbdsink.sock`` (its log in
    ``/newroot/run/nbdsink-serve.log``)."""
    nbdsink = REPO / ".venv" / "bin" / "nbdsink"
    return STORE_SERVER_STAGE.replace("__NBDSINK__", shlex.quote(str(nbdsink)))


_APPEND = "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off random.trust_cpu=on"
"""The kernel command line: the console on the serial port, a panic ends the boot at once."""


def _qemu_argv(
    k: Kernel,
    ramfs: Path,
    share: Path,
    console: Path,
    *,
    memory_mb: int,
    cpus: int,
    drives: Sequence[Path],
    append: str = "",
) -> list[str]:
    """The qemu command line: TCG, the host root and ``share`` over 9p, ``drives`` as virtio."""
    argv = [
        QEMU,
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(k.image),
        "-initrd", str(ramfs),
        "-append", f"{_APPEND} {append}".strip(),
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=none,multidevs=remap",
    ]  # fmt: skip
    for drive in drives:
        argv += ["-drive", f"file={drive},format=raw,if=virtio,cache=writeback"]
    return argv


def boot(
    init: str,
    *,
    timeout: float = 600,
    memory_mb: int = 1536,
    cpus: int = 2,
    drives: Sequence[Path] = (),
    append: str = "",
    console_log: Path | None = None,
) -> str:
    """Boot the guest and hand PID 1 to ``init``; return the serial console once it is off.

    ``init`` is sourced by the initramfs's busybox ``sh`` (``PATH=/bin``: busybox applets)
    as PID 1, after the usual set-up: the host root (tmpfs overlay) is at ``/newroot``, with
    ``/newroot/proc``, ``/sys``, ``/dev`` mounted and ``chroot /newroot modprobe`` working;
    ``fail MESSAGE`` prints the message and powers off. It is a second-stage init: it may ``switch_root`` into a root of its own and never
    return; the guest ends when something powers it off (or PID 1 dies: a panic, which
    ``panic=-1`` turns into the end of the boot). Nothing comes back but the console (and
    whatever was written to ``drives``), so ``init`` and what it starts print what the
    caller checks. ``append`` is added to the kernel command line, where ``init`` and any
    later init read it from ``/proc/cmdline``. A qemu failure or a guest that outlives
    ``timeout`` raises :class:`VmError` with the console's tail.
    """
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} is missing: install qemu-system-x86 (scripts/setup.sh)")
    k = kernel()
    ramfs = initramfs(k)
    with tempfile.TemporaryDirectory(prefix="nbdsink-vm-") as tmp:
        share = Path(tmp) / "share"
        share.mkdir()
        (share / "init.sh").write_text(init)
        (share / "overlays").write_text("".join(f"{p}\n" for p in _hidden_paths(REPO)))
        console = console_log or Path(tmp) / "console.log"
        argv = _qemu_argv(
            k, ramfs, share, console, memory_mb=memory_mb, cpus=cpus, drives=drives, append=append
        )
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise VmError(
                f"guest did not power off within {timeout:.0f}s\n--- console (tail) ---\n"
                f"{_read(console)[-3000:]}"
            ) from exc
        if proc.returncode != 0:
            raise VmError(
                f"qemu exited {proc.returncode}\n{proc.stderr[-2000:]}\n--- console (tail) ---\n"
                f"{_read(console)[-3000:]}"
            )
        return _read(console)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


if __name__ == "__main__":  # pragma: no cover - a developer's entry: run one command
    import sys

    result = run(" ".join(sys.argv[1:]) or "uname -a")
    sys.stdout.write(result.output)
    sys.exit(result.returncode)

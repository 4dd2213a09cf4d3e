"""Fetch the real kernel the VM tests boot into a cache directory, never installing it.

Run as ``/usr/bin/python3 tests/vm/kernel_cache.py`` (``scripts/setup.d/10-vm-kernel.sh`` does);
standard library only, so it works before the virtualenv exists.

Debian's archive does not move in lock-step: the image, the headers, the common headers and
``linux-kbuild-X.Y`` are separate source uploads that can each carry their own version (a
kbuild-only rebuild gives ``linux-kbuild-6.1`` 6.1.192-3 beside an image at 6.1.192-2), and the
headers of a new ABI can appear after its image. So every package is resolved to its *own*
candidate version, the headers' dependencies are read from the archive rather than assumed,
and when the newest image has no complete set of headers yet, the newest kernel release that
has one is taken instead (with a warning).

Layout of the cache (``$NBDSINK_VM_CACHE``, default ``/var/cache/nbdsink-vm``)::

    debs/      the downloaded packages (kept, so a re-unpack needs no network)
    root/      image + headers + kbuild unpacked: boot/vmlinuz-<rel>, lib/modules/<rel>/{kernel,build}
    current    the kernel release string (e.g. 6.1.0-56-amd64)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Runs ``apt-cache`` with these arguments and returns its standard output ("" on failure).
AptCache = Callable[[list[str]], str]

META_PACKAGE = "linux-image-amd64"
_RELEASE_RE = re.compile(r"^linux-image-(\d+\.\d+\.\d+-\d+)-amd64$")


class KernelFetchError(Exception):
    """What stops the fetch, as one line that names the package concerned."""


@dataclass(frozen=True)
class Package:
    """A Debian package pinned to the version to download."""

    name: str
    version: str

    def deb_glob(self) -> str:
        """The file name pattern ``apt-get download`` gives this package (epoch ``:`` quoted)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_*.deb"


@dataclass(frozen=True)
class KernelPlan:
    """One kernel release and every package needed to boot it and build modules against it."""

    release: str  # 6.1.0-56-amd64
    packages: tuple[Package, ...]
    warning: str | None = None  # set when the newest release had to be passed over

    @property
    def headers_dir(self) -> str:
        return f"usr/src/linux-headers-{self.release}"


def _candidate(apt: AptCache, package: str) -> str | None:
    """The version apt would install of ``package``, or None when it has none."""
    for line in apt(["policy", package]).splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            return None if version in ("", "(none)") else version
    return None


def _depends(apt: AptCache, package: str) -> list[str]:
    """Names of ``package``'s direct dependencies (alternatives and virtuals included as named)."""
    names = []
    for line in apt(["depends", package]).splitlines():
        m = re.match(r"^\s*\|?Depends:\s*<?([^\s>]+)>?", line)
        if m:
            names.append(m.group(1))
    return names


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def _plan_for(apt: AptCache, release: str) -> tuple[KernelPlan | None, str | None]:
    """The plan for one release, or (None, the package that is missing)."""
    image = f"linux-image-{release}"
    headers = f"linux-headers-{release}"
    names = [image, headers]
    # The headers package names what it needs to build a module: the common headers of its
    # ABI and the kbuild tools of its series. Only those two kinds matter here; the compiler
    # dependency is the host's gcc, installed by setup.sh.
    names += [d for d in _depends(apt, headers) if d.startswith(("linux-headers-", "linux-kbuild-"))]
    packages = []
    for name in names:
        version = _candidate(apt, name)
        if version is None:
            return None, name
        packages.append(Package(name, version))
    if not any(p.name.startswith("linux-kbuild-") for p in packages):
        return None, f"linux-kbuild (a dependency of {headers})"
    return KernelPlan(release, tuple(packages)), None


def resolve(apt: AptCache) -> KernelPlan:
    """Choose the kernel release and the exact version of each package to download.

    The release ``linux-image-amd64`` points at is preferred; when one of its packages has no
    candidate, the newest other release with a complete set is chosen and the plan carries a
    warning naming what was missing.
    """
    preferred = None
    for dep in _depends(apt, META_PACKAGE):
        m = _RELEASE_RE.match(dep)
        if m:
            preferred = m.group(1) + "-amd64"
            break
    others = sorted(
        {m.group(1) + "-amd64" for n in apt(["pkgnames", "linux-image-"]).split() if (m := _RELEASE_RE.match(n))},
        key=_release_key,
        reverse=True,
    )
    order = ([preferred] if preferred else []) + [r for r in others if r != preferred]
    if not order:
        raise KernelFetchError(f"apt knows no kernel image package (no {META_PACKAGE}, no linux-image-X.Y.Z-N-amd64)")
    first_missing = None
    for release in order:
        plan, missing = _plan_for(apt, release)
        if plan is not None:
            if release == order[0]:
                return plan
            return KernelPlan(
                plan.release,
                plan.packages,
                warning=f"kernel {order[0]} has no candidate for {first_missing}; using {release} instead",
            )
        if first_missing is None:
            first_missing = missing
    raise KernelFetchError(
        f"no kernel release has a complete set of packages; for {order[0]} the Debian package "
        f"{first_missing} has no candidate version"
    )


# -- the real archive and the cache -----------------------------------------------------------


def _apt_cache(args: list[str]) -> str:
    proc = subprocess.run(["apt-cache", *args], capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else ""


def _apt_update() -> None:
    print("setup: apt-get update (the package lists do not name a usable kernel)", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False)


def _ready(cache: Path, release: str) -> bool:
    root = cache / "root"
    return (
        (cache / "current").is_file()
        and (cache / "current").read_text().strip() == release
        and (root / f"boot/vmlinuz-{release}").is_file()
        and (root / f"lib/modules/{release}/modules.dep").is_file()
        and (root / f"usr/src/linux-headers-{release}/Makefile").is_file()
    )


def _download(debs: Path, package: Package) -> Path:
    have = sorted(debs.glob(package.deb_glob()))
    if have:
        return have[0]
    for stale in debs.glob(f"{package.name}_*.deb"):
        stale.unlink()
    # -o APT::Sandbox::User=root: the cache is root's; the _apt user could not write there.
    proc = subprocess.run(
        ["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", f"{package.name}={package.version}"],
        cwd=debs,
        capture_output=True,
        text=True,
        check=False,
    )
    have = sorted(debs.glob(package.deb_glob()))
    if proc.returncode != 0 or not have:
        why = (proc.stderr.strip().splitlines() or ["no .deb file appeared"])[-1]
        raise KernelFetchError(f"cannot download Debian package {package.name}={package.version}: {why}")
    return have[0]


def _unpack(cache: Path, plan: KernelPlan, debs: list[Path]) -> None:
    root = cache / "root"
    new = cache / "root.new"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for deb in debs:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(new)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelFetchError(f"cannot unpack {deb.name}: {proc.stderr.strip()}")
    release = plan.release
    abi = release.removesuffix("-amd64")
    mods = new / f"lib/modules/{release}"
    if not (new / f"boot/vmlinuz-{release}").is_file() or not mods.is_dir():
        raise KernelFetchError(f"package linux-image-{release} did not contain boot/vmlinuz-{release}")
    headers = new / plan.headers_dir
    if not (headers / "Makefile").is_file():
        raise KernelFetchError(f"package linux-headers-{release} did not contain {plan.headers_dir}/Makefile")
    # The packages point at /usr/src/... by absolute path (the build/source links, the arch
    # headers' Makefile); point them into the cache so Kbuild works from there.
    for link, target in (("build", f"linux-headers-{release}"), ("source", f"linux-headers-{abi}-common")):
        (mods / link).unlink(missing_ok=True)
        (mods / link).symlink_to(f"../../../usr/src/{target}")
    makefile = headers / "Makefile"
    makefile.write_text(re.sub(r"(?m)^include /usr/src/", f"include {root}/usr/src/", makefile.read_text()))
    proc = subprocess.run(["depmod", "-b", str(new), release], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KernelFetchError(f"depmod failed for {release}: {proc.stderr.strip()}")
    shutil.rmtree(root, ignore_errors=True)
    new.rename(root)
    (cache / "current").write_text(release + "\n")


def fetch(cache: Path, apt: AptCache = _apt_cache) -> str:
    """Make ``cache`` hold the kernel to boot; returns its release. Idempotent."""
    try:
        plan = resolve(apt)
    except KernelFetchError:
        _apt_update()
        plan = resolve(apt)
    if _ready(cache, plan.release):
        return plan.release
    if plan.warning:
        print(f"setup: warning: {plan.warning}", file=sys.stderr)
    print(f"setup: fetching kernel {plan.release} for the VM tests into {cache}", file=sys.stderr)
    debs_dir = cache / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    try:
        debs = [_download(debs_dir, p) for p in plan.packages]
    except KernelFetchError:
        # The lists may be older than the mirror (the version was superseded and removed):
        # refresh them once and resolve again before giving up.
        _apt_update()
        plan = resolve(apt)
        debs = [_download(debs_dir, p) for p in plan.packages]
    _unpack(cache, plan, debs)
    return plan.release


def main() -> int:
    cache = Path(os.environ.get("NBDSINK_VM_CACHE", "/var/cache/nbdsink-vm"))
    try:
        fetch(cache)
    except KernelFetchError as e:
        print(f"setup: the VM tests' kernel: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

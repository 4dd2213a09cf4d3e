"""The VM kernel fetch (tests/vm/kernel_cache.py): version resolution against archives whose
packages moved apart, and the real fetch from an empty cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vm import kernel_cache
from vm.kernel_cache import KernelFetchError, Package, resolve

HERE = Path(__file__).resolve().parent


def _policy(candidate: str | None) -> str:
    shown = candidate or "(none)"
    return f"pkg:\n  Installed: (none)\n  Candidate: {shown}\n  Version table:\n"


class FakeArchive:
    """apt-cache answering from captured output: ``versions`` maps package -> candidate."""

    def __init__(self, meta_release: str, versions: dict[str, str | None],
                 depends: dict[str, list[str]]) -> None:
        self.meta_release = meta_release
        self.versions = versions
        self.depends = depends

    def __call__(self, args: list[str]) -> str:
        cmd, name = args[0], args[1]
        if cmd == "policy":
            if name not in self.versions:
                return ""  # apt-cache policy of an unknown package prints nothing
            return _policy(self.versions[name])
        if cmd == "depends":
            if name == "linux-image-amd64":
                return f"linux-image-amd64\n  Depends: linux-image-{self.meta_release}\n"
            deps = self.depends.get(name)
            if deps is None:
                return ""
            return name + "\n" + "".join(f"  Depends: {d}\n" for d in deps)
        if cmd == "pkgnames":
            names = [n for n in self.versions if n.startswith(name)]
            names += [n + "-dbg" for n in names] + [n.replace("-amd64", "-rt-amd64") for n in names]
            return "\n".join(names) + "\n"
        raise AssertionError(args)


def _abi(abi: str, image: str | None, headers: str | None, common: str | None,
         kbuild: str | None = None) -> tuple[dict[str, str | None], dict[str, list[str]]]:
    series = ".".join(abi.split(".")[:2])
    versions = {
        f"linux-image-{abi}-amd64": image,
        f"linux-headers-{abi}-amd64": headers,
        f"linux-headers-{abi}-common": common,
    }
    if kbuild is not None:
        versions[f"linux-kbuild-{series}"] = kbuild
    depends = {
        f"linux-headers-{abi}-amd64": [
            f"linux-headers-{abi}-common", f"linux-kbuild-{series}", "linux-compiler-gcc-12-x86",
        ]
    }
    return versions, depends


def _archive(meta: str, *abis: tuple[dict[str, str | None], dict[str, list[str]]]) -> FakeArchive:
    versions: dict[str, str | None] = {}
    depends: dict[str, list[str]] = {}
    for v, d in abis:
        versions.update(v)
        depends.update(d)
    return FakeArchive(meta, versions, depends)


def test_kbuild_only_rebuild_takes_kbuilds_own_version() -> None:
    # The skew of 2026-11-29: image and headers at 6.1.192-2, kbuild rebuilt as 6.1.192-3.
    apt = _archive("6.1.0-56-amd64", _abi("6.1.0-56", "6.1.192-2", "6.1.192-2", "6.1.192-2", "6.1.192-3"))
    plan = resolve(apt)
    assert plan.release == "6.1.0-56-amd64"
    assert plan.warning is None
    assert set(plan.packages) == {
        Package("linux-image-6.1.0-56-amd64", "6.1.192-2"),
        Package("linux-headers-6.1.0-56-amd64", "6.1.192-2"),
        Package("linux-headers-6.1.0-56-common", "6.1.192-2"),
        Package("linux-kbuild-6.1", "6.1.192-3"),
    }


def test_abi_bump_follows_the_meta_package() -> None:
    apt = _archive(
        "6.1.0-57-amd64",
        _abi("6.1.0-56", "6.1.192-2", "6.1.192-2", "6.1.192-2"),
        _abi("6.1.0-57", "6.1.199-1", "6.1.199-1", "6.1.199-1", "6.1.199-1"),
    )
    plan = resolve(apt)
    assert plan.release == "6.1.0-57-amd64"
    assert Package("linux-headers-6.1.0-57-common", "6.1.199-1") in plan.packages


def test_headers_that_lag_the_image_fall_back_to_the_newest_complete_release() -> None:
    apt = _archive(
        "6.1.0-57-amd64",
        _abi("6.1.0-55", "6.1.190-1", "6.1.190-1", "6.1.190-1"),
        _abi("6.1.0-56", "6.1.192-2", "6.1.192-2", "6.1.192-2", "6.1.192-3"),
        _abi("6.1.0-57", "6.1.199-1", None, None),
    )
    plan = resolve(apt)
    assert plan.release == "6.1.0-56-amd64"
    assert plan.warning is not None and "linux-headers-6.1.0-57-amd64" in plan.warning


def test_no_complete_release_names_the_missing_package() -> None:
    apt = _archive("6.1.0-57-amd64", _abi("6.1.0-57", "6.1.199-1", "6.1.199-1", "6.1.199-1"))
    # no linux-kbuild-6.1 at all
    with pytest.raises(KernelFetchError, match=r"linux-kbuild-6\.1 has no candidate"):
        resolve(apt)


def test_deb_file_name_quotes_an_epoch() -> None:
    assert Package("linux-kbuild-6.1", "1:6.1.192-3").deb_glob() == "linux-kbuild-6.1_1%3a6.1.192-3_*.deb"


def test_the_real_archive_resolves() -> None:
    # Today's lists on this machine: a plan whose every package apt can name.
    plan = resolve(kernel_cache._apt_cache)
    assert plan.release.endswith("-amd64")
    assert any(p.name.startswith("linux-kbuild-") for p in plan.packages)


@pytest.mark.root
@pytest.mark.slow
def test_real_fetch_from_an_empty_cache(tmp_path: Path) -> None:
    """The real step, from nothing (so a fetch that the archive broke cannot pass by a warm
    cache), then again to show it is idempotent."""
    if os.geteuid() != 0:
        pytest.skip("apt-get download into a root-owned cache needs root")
    env = dict(os.environ, NBDSINK_VM_CACHE=str(tmp_path))
    script = str(HERE / "kernel_cache.py")
    first = subprocess.run(["/usr/bin/python3", script], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    release = (tmp_path / "current").read_text().strip()
    root = tmp_path / "root"
    assert (root / f"boot/vmlinuz-{release}").stat().st_size > 1 << 20
    assert (root / f"lib/modules/{release}/modules.dep").is_file()
    assert (root / f"lib/modules/{release}/build/Makefile").is_file()  # the link resolves
    assert list((root / f"lib/modules/{release}/kernel/drivers/block").glob("nbd.ko*"))
    again = subprocess.run(["/usr/bin/python3", script], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "fetching" not in again.stderr


@pytest.mark.root
def test_an_undownloadable_package_is_one_clear_line(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("apt-get download into a root-owned cache needs root")
    real = kernel_cache._apt_cache

    def skewed(args: list[str]) -> str:
        out = real(args)
        if args[0] == "policy" and args[1].startswith("linux-image-"):
            return _policy("9.9.9-9")
        return out

    with pytest.raises(KernelFetchError) as info:
        kernel_cache.fetch(tmp_path, apt=skewed)
    message = str(info.value)
    assert "\n" not in message
    assert "linux-image-" in message and "=9.9.9-9" in message
    assert not (tmp_path / "current").exists()

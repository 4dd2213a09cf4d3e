"""On the host: the module builds (plainly and as DKMS would), the uapi header and the Python
backend agree on the ioctl ABI, and the VM harness passes exit status and keeps the host safe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import nbdsink
from nbdsink.tracker import dm
from vm import harness

HEADER = harness.REPO / "kmod" / "include" / "nbdsink_dm.h"

_ABI_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include "nbdsink_dm.h"
int main(void)
{
    printf("%zu %zu %lu %lu %zu %zu %zu %llx\n",
           sizeof(struct nbdsink_dm_info), sizeof(struct nbdsink_dm_bitmap),
           (unsigned long)NBDSINK_DM_IOC_INFO, (unsigned long)NBDSINK_DM_IOC_BITMAP,
           offsetof(struct nbdsink_dm_info, target_sectors),
           offsetof(struct nbdsink_dm_bitmap, dirty),
           sizeof(struct nbdsink_dm_meta_header), (unsigned long long)NBDSINK_DM_META_MAGIC);
    return 0;
}
"""


def test_uapi_header_matches_the_python_backend(tmp_path: Path) -> None:
    src = tmp_path / "probe.c"
    src.write_text(_ABI_PROBE)
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-I", str(HEADER.parent), "-o", str(tmp_path / "probe"), str(src)],
        check=True,
    )
    out = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout.split()
    info, bitmap, ioc_info, ioc_bitmap, off_target, off_dirty, meta, magic = out
    assert int(info) == dm._INFO.size
    assert int(bitmap) == dm._BITMAP.size
    assert int(ioc_info) == dm.IOC_INFO
    assert int(ioc_bitmap) == dm.IOC_BITMAP
    assert int(off_target) == 4 * 4 + 8 * 8  # the 13th field of the info struct
    assert int(off_dirty) == 4 * 4 + 8 * 4
    assert int(meta) <= 4096
    # The magic reads "NBDKSDM1" in the little-endian header.
    assert int(magic, 16) == dm._META_MAGIC == int.from_bytes(b"NBDKSDM1", "little")


def test_module_builds_without_warnings_against_debian_headers() -> None:
    k = harness.kernel()
    ko = harness.build_dm_module(k)  # KCFLAGS=-Werror
    info = {
        field: subprocess.run(["modinfo", "-F", field, str(ko)], capture_output=True, text=True, check=True).stdout.strip()
        for field in ("vermagic", "license", "depends")
    }
    assert info["vermagic"].split()[0] == k.release
    assert info["license"] == "GPL"
    assert "dm-mod" in info["depends"].split(",")


def test_dkms_tree_builds_as_dkms_would(tmp_path: Path) -> None:
    """Stage the DKMS source tree and run dkms.conf's MAKE line against the 6.1 headers."""
    k = harness.kernel()
    tree = tmp_path / "nbdsink-src"
    subprocess.run([str(harness.REPO / "deploy" / "dkms" / "install.sh"), "--stage", str(tree)], check=True)
    script = (
        f"kernel_source_dir={k.build}\n. ./dkms.conf\n"
        'echo "$PACKAGE_VERSION $BUILT_MODULE_LOCATION $BUILT_MODULE_NAME"\neval "${MAKE[0]}" >&2\n'
    )
    run = subprocess.run(["bash", "-c", script], cwd=tree, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    version, location, name = run.stdout.split()
    assert version == nbdsink.__version__
    assert (tree / location / f"{name}.ko").is_file()
    assert "warning:" not in run.stderr


def test_harness_reports_a_missing_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "QEMU", "qemu-system-nbdsink-missing")
    with pytest.raises(harness.VmError, match="missing"):
        harness.run("true")


def test_harness_runs_in_a_real_kernel_and_keeps_the_host_safe(tmp_path: Path) -> None:
    """Exit status and output come back; writes in the guest never reach the host."""
    probe = harness.REPO / "tests" / "vm" / ".guest-write-probe"
    k = harness.kernel()
    result = harness.run(
        f"uname -r; touch {probe} && echo wrote; cat /proc/sys/kernel/tainted; dmesg | grep -c 'WARNING:'; exit 7",
        timeout=300,
    )
    lines = result.output.split()
    assert result.returncode == 7
    assert lines[0] == k.release
    assert lines[1] == "wrote", "the overlay root should be writable inside the guest"
    assert lines[3] == "0", result.console[-2000:]
    assert not probe.exists(), "a write in the guest reached the host"
    assert shutil.which(harness.QEMU)

"""``pip install .`` (not editable) into a fresh virtualenv gives a working ``nbdsink serve``:
the nbdkit plugin ships inside the package, nothing is looked up in a checkout."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_an_installed_nbdsink_serves(tmp_path: Path) -> None:
    src = tmp_path / "src"
    # A copy without the checkout's virtualenv, so nothing can be found by accident.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "var", "*.o"))
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(src)], capture_output=True,
                         text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)  # the installed package must stand alone
    nbdsink = str(venv / "bin/nbdsink")
    store, sock = tmp_path / "store", tmp_path / "nbd.sock"
    subprocess.run([nbdsink, "volume", "create", "v", "--size", "1M", "--store", str(store)],
                   check=True, cwd=tmp_path)
    server = subprocess.Popen([nbdsink, "serve", "--store", str(store), "--socket", str(sock)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        listing = None
        while time.monotonic() < deadline:
            listing = subprocess.run(["nbdinfo", "--list", f"nbd+unix:///?socket={sock}"],
                                     capture_output=True, text=True)
            if listing.returncode == 0:
                break
            time.sleep(0.2)
        assert listing is not None and 'export="v"' in listing.stdout, listing
        data = tmp_path / "data"
        data.write_bytes(bytes(range(256)) * 4096)
        subprocess.run(["nbdcopy", "--flush", str(data), f"nbd+unix:///v?socket={sock}"],
                       check=True)
        back = tmp_path / "back"
        subprocess.run(["nbdcopy", f"nbd+unix:///v@1?socket={sock}", str(back)], check=True)
        assert back.read_bytes() == data.read_bytes()
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0]
    assert b"Traceback" not in out, out.decode(errors="replace")

"""Bad input on the command line: one clear line and exit 1 or 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    ["volume", "create", "v", "--size", "12QB"],
    ["volume", "create", "v", "--size", "0x100000"],
    ["volume", "create", "v", "--size", "nan"],
    ["volume", "create", "v", "--size", "inf"],
    ["volume", "create", "v", "--size", "1e6"],
    ["volume", "create", "v", "--size", "8E"],
    ["volume", "create", "v", "--size", "1M", "--block-size", "-4096"],
    ["volume", "create", "v", "--size", "1M", "--block-size", "3000"],
    ["serve", "--batch-size", "junk", "--socket", "SOCK"],
    ["serve", "--listen", "127.0.0.1:99999"],
    ["replicate", "/dev/null", "nbd+unix:///v?socket=/nonexistent", "--interval", "soon"],
    ["prune", "v", "--keep-last", "-3"],
    ["pin", "v@one"],
    ["verify", "nosuchvolume"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str]) -> None:
    store = tmp_path / "store"
    subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "volume", "create", "v",
                    "--size", "1M", "--store", str(store)], check=True, capture_output=True)
    argv = [a.replace("SOCK", str(tmp_path / "s.sock")) for a in args]
    if argv[0] not in ("replicate",):
        argv += ["--store", str(store)]
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", *argv],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode in (1, 2), run
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and ("error" in lines[-1]), run.stderr


def test_a_store_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "volume", "create", "v",
                          "--size", "1M", "--store", str(afile)], capture_output=True, text=True)
    assert run.returncode == 1 and "is a file" in run.stderr and "Traceback" not in run.stderr


def test_config_files(tmp_path: Path) -> None:
    """The examples in deploy/ are valid; a flag on the command line wins over the file."""
    from nbdsink.cli.main import apply_config_file, build_parser

    repo = Path(__file__).resolve().parents[1]
    for command, example in (("serve", "serve.toml.example"),
                             ("replicate", "replicate.toml.example")):
        parser = build_parser()
        path = repo / "deploy" / "systemd" / example
        apply_config_file(parser, [command, "--config", str(path)])
        args = parser.parse_args([command, "--config", str(path)])
        if command == "serve":
            assert args.listen == "0.0.0.0:10809" and args.max_connections == 64
        else:
            assert args.device == "/dev/vg0/root" and args.max_freeze == 2.0
            assert args.interval == 30.0
    config = tmp_path / "r.toml"
    config.write_text('device = "/dev/sdz"\nuri = "nbd://h/v"\ninterval = "30s"\n')
    parser = build_parser()
    argv = ["replicate", "--config", str(config), "--interval", "5s"]
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    assert args.interval == 5.0 and args.device == "/dev/sdz"

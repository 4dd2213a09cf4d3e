"""Soak of continuous replication with --freeze against ground truth.

The same experiment as ``tests/sender/test_e2e_ground_truth.py``, for longer: ext4 on a loop
device under fio (random 4-64 KiB writes with fsyncs, 1 MiB sequential overwrites with
fdatasyncs), ``nbdsink replicate --freeze`` every second, a frozen hook that hashes the device
(O_DIRECT, blake3 per 64 KiB chunk) while it is frozen, and (unless ``--no-inject``) the
kernel made to skip the tracker's completion programs for ~0.2 s every ~2 s. At the end every
frozen version is compared, chunk by chunk, with the device at its freeze.

Prints the cycles, versions checked, chunks compared, skips injected, shortfalls the audit
against the kernel's I/O accounting found, and every mismatched chunk; exit status 1 if any.

    .venv/bin/python bench/soak_ground_truth.py --minutes 10 [--no-inject]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from sender.ground_truth import run_ground_truth  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--no-inject", action="store_true",
                        help="do not make the kernel skip the tracker's programs")
    parser.add_argument("--size", type=int, default=256, help="device size in MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbdsink-soak-") as tmp:
        outcome = run_ground_truth(Path(tmp), args.minutes * 60, inject=not args.no_inject,
                                   size=args.size << 20)
    print(f"versions {outcome.versions}, frozen versions checked {outcome.checked}, "
          f"chunks compared {outcome.chunks_compared}")
    print(f"skips injected {outcome.skips_injected}, shortfalls found {outcome.unseen_events} "
          f"({outcome.unseen_sectors} sectors)")
    print(f"mismatched chunks {len(outcome.mismatched)}")
    for version, chunk in outcome.mismatched[:50]:
        print(f"  version {version} chunk {chunk} (offset {chunk * 65536:#x})")
    return 1 if outcome.mismatched else 0


if __name__ == "__main__":
    sys.exit(main())

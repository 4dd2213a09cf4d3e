"""fio random 4 KiB writes through the nbdsink target against dm-linear, in one VM run.

Both tables map the same RAM disk (brd: no device latency hides the target's cost). Short
runs alternate linear / nbdsink (ABBA) many times so drift of the emulated machine and load
on the host hit both alike; the result is the median of the per-round ratios
(target: >= 0.95). The reference is the dm-linear run of the same invocation; absolute
numbers under TCG mean little, and on a shared host single rounds vary by +-30%.

    .venv/bin/python bench/bench_dm.py [--rounds 12] [--runtime 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from vm import harness  # noqa: E402

DISK_MIB = 512
CHUNK_SECTORS = 128  # 64 KiB chunks

_GUEST = r"""
set -e
modprobe dm-mod
modprobe brd rd_nr=1 rd_size={disk_kib}
insmod {ko}
sectors=$(blockdev --getsz /dev/ram0)
run() {{
    fio --name=bench --filename=$1 --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=32 --runtime={runtime} --time_based --ramp_time=1 --size={disk_mib}M \
        --randrepeat=0 --norandommap --output-format=json > /tmp/fio.json
    python3 -c 'import json; print(json.load(open("/tmp/fio.json"))["jobs"][0]["write"]["iops"])'
}}
# Touch every page of the RAM disk once so neither table pays for brd's allocation.
dd if=/dev/zero of=/dev/ram0 bs=1M count={disk_mib} oflag=direct status=none
one() {{
    dmsetup create bench --table "0 $sectors $2"
    echo "$1 $(run /dev/mapper/bench)"
    dmsetup remove bench
}}
# ABBA order within each round, so drift during a round hits both tables alike.
for round in $(seq {rounds}); do
    if [ $((round % 2)) = 1 ]; then
        one linear "linear /dev/ram0 0"; one nbdsink "nbdsink /dev/ram0 {chunk}"
    else
        one nbdsink "nbdsink /dev/ram0 {chunk}"; one linear "linear /dev/ram0 0"
    fi
done
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--runtime", type=int, default=3, help="seconds per fio run")
    args = parser.parse_args()
    k = harness.kernel()
    ko = harness.build_dm_module(k)
    script = _GUEST.format(
        ko=ko, runtime=args.runtime, rounds=args.rounds, chunk=CHUNK_SECTORS,
        disk_mib=DISK_MIB, disk_kib=DISK_MIB * 1024,
    )  # fmt: skip
    result = harness.run(script, timeout=120 + args.rounds * 2 * (args.runtime + 15)).check()
    iops: dict[str, list[float]] = {"linear": [], "nbdsink": []}
    for line in result.output.splitlines():
        name, _, value = line.partition(" ")
        if name in iops:
            iops[name].append(float(value))
    if not iops["linear"] or len(iops["linear"]) != len(iops["nbdsink"]):
        print(result.output, file=sys.stderr)
        return 1
    lin, nbs = statistics.median(iops["linear"]), statistics.median(iops["nbdsink"])
    pairs = [a / b for a, b in zip(iops["nbdsink"], iops["linear"], strict=True)]
    print(json.dumps({"runs": iops}, indent=None))
    print(f"per-round ratios: {' '.join(f'{r:.3f}' for r in pairs)}")
    print(f"dm-linear  median {lin:10.0f} IOPS (reference)")
    print(f"nbdsink    median {nbs:10.0f} IOPS")
    print(f"ratio of medians: {nbs / lin:.3f}")
    # Adjacent runs share the host's momentary load: their ratio is the steadier figure.
    print(f"ratio nbdsink / dm-linear (median of per-round ratios): {statistics.median(pairs):.3f} "
          "(target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

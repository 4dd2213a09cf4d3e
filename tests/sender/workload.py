"""A small file workload for the end-to-end tests: writes, renames and deletes files.

    python workload.py MOUNTPOINT LOGFILE SECONDS SEED

Operations run one after another, and each changes the tree in one atomic step: new
content is written to a scratch file under ``.tmp/`` (left out of every tree comparison)
and renamed into place, so a freeze can never catch a half-made change. Each is logged (to LOGFILE, which must not be on the
filesystem under test: that one gets frozen) as a JSON line with the wall-clock times just
before it started and just after it returned, and what it did, so the test can rebuild the
file tree as it was at any instant: every operation that returned before a freeze is in the
frozen image, none that started after it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time


def content(seed: int, n: int, size: int) -> bytes:
    rnd = random.Random(seed * 1_000_003 + n)
    return rnd.randbytes(size)


def main() -> None:
    root, log_path, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(seed)
    files: list[str] = []
    n = 0
    deadline = time.time() + seconds
    with open(log_path, "a", buffering=1) as log:
        while time.time() < deadline:
            n += 1
            kind = rnd.choices(["write", "rename", "delete", "rewrite"], [5, 2, 1, 2])[0]
            if kind != "write" and not files:
                kind = "write"
            entry: dict[str, object] = {"n": n, "op": kind}
            if kind in ("write", "rewrite"):
                name = f"d{rnd.randrange(4)}/f{n}" if kind == "write" else rnd.choice(files)
                sizes = [0, 1000, 4096, 70_000, 300_000] if kind == "write" else [10, 5000]
                data = content(seed, n, rnd.choice(sizes))
                os.makedirs(os.path.join(root, ".tmp"), exist_ok=True)
                os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
                scratch = os.path.join(root, ".tmp", str(n))
                with open(scratch, "wb") as f:
                    f.write(data)
                t0 = time.time()
                os.rename(scratch, os.path.join(root, name))
                if kind == "write":
                    files.append(name)
                entry.update(path=name, sha=hashlib.sha256(data).hexdigest())
            elif kind == "rename":
                old = rnd.choice(files)
                new = f"d{rnd.randrange(4)}/r{n}"
                os.makedirs(os.path.join(root, os.path.dirname(new)), exist_ok=True)
                t0 = time.time()
                os.rename(os.path.join(root, old), os.path.join(root, new))
                files[files.index(old)] = new
                entry.update(path=old, to=new)
            else:
                name = rnd.choice(files)
                t0 = time.time()
                os.unlink(os.path.join(root, name))
                files.remove(name)
                entry.update(path=name)
            entry.update(t0=t0, t1=time.time())
            log.write(json.dumps(entry) + "\n")
            time.sleep(rnd.uniform(0, 0.02))


def replay(entries: list[dict[str, object]]) -> dict[str, str]:
    """The tree (path -> sha256) after the given operations, in order."""
    tree: dict[str, str] = {}
    for e in entries:
        path = str(e["path"])
        if e["op"] in ("write", "rewrite"):
            tree[path] = str(e["sha"])
        elif e["op"] == "rename":
            tree[str(e["to"])] = tree.pop(path)
        else:
            del tree[path]
    return tree


if __name__ == "__main__":
    main()

"""Making the kernel skip the bpf tracker's programs, as it was measured doing on a busy host:
the tracepoints' other probes run (tracefs sees every event) and these programs do not, and
none of their counters moves. Detaching the programs' links does exactly that."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from nbdsink.tracker import bpf


def detach(name: str, hooks: list[str]) -> list[Path]:
    """Detach both copies of ``hooks`` of the tracking of device ``name``; returns the links
    to give :func:`reattach`. The kernel releases a link from a workqueue a moment later."""
    links = [bpf.PIN_ROOT / name / f"link_{h}_{c}" for h in hooks for c in "ab"]
    for link in links:
        link.unlink()
    return links


def reattach(links: list[Path]) -> None:
    """Attach the pinned programs of ``links`` again (copy a before copy b, as the loader)."""
    lib = bpf.libbpf.lib()
    for link in links:
        prog = link.with_name(link.name.replace("link_", "prog_", 1))
        with bpf.libbpf.opened(str(prog)) as prog_fd:
            fd = lib.bpf_raw_tracepoint_open(None, prog_fd)
            if fd < 0:
                raise OSError(-fd, f"re-attaching {prog.name}")
            try:
                if lib.bpf_obj_pin(fd, str(link).encode()) != 0:
                    raise OSError(f"pinning {link}")
            finally:
                os.close(fd)


class SkipInjector:
    """A thread that, every ``every`` seconds on average, makes the kernel skip the completion
    programs of device ``name`` for about ``window`` seconds."""

    def __init__(self, name: str, every: float = 2.0, window: float = 0.2, seed: int = 1) -> None:
        self.name = name
        self.every = every
        self.window = window
        self.rng = random.Random(seed)
        self.skips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="skip-injector")

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.5, 1.5) * self.every):
            links = detach(self.name, ["on_rq_complete"])
            try:
                self._stop.wait(self.rng.uniform(0.5, 1.5) * self.window)
            finally:
                reattach(links)
            self.skips += 1

    def __enter__(self) -> SkipInjector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

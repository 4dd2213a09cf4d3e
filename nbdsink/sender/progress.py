"""Progress of long work: a live line on a terminal, structured log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from nbdsink.sender.units import format_duration, format_size

log = logging.getLogger("nbdsink.sender.progress")


class Progress:
    """Counts bytes done out of a known total and reports rate and ETA now and then.

    On a terminal the report is one line rewritten in place (every ``tty_every`` seconds);
    otherwise it is a ``progress`` log line with key=value fields every ``log_every``
    seconds, which a log collector can parse.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        tty_every: float = 0.5,
        log_every: float = 10.0,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = self.stream.isatty()
        self.every = tty_every if self.is_tty else log_every
        self.started = time.monotonic()
        self._last_report = self.started
        self._printed = False

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self._last_report >= self.every:
            self._last_report = now
            self._report()

    def fields(self) -> dict[str, object]:
        eta = self.eta
        return {
            "done": self.done,
            "total": self.total,
            "rate": int(self.rate),
            "eta": round(eta, 1) if eta is not None else None,
        }

    def _report(self) -> None:
        if self.is_tty:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            eta = self.eta
            line = (
                f"\r{self.label}: {format_size(self.done)} / {format_size(self.total)} "
                f"({pct:.1f}%), {format_size(self.rate)}/s, "
                f"ETA {format_duration(eta) if eta is not None else '?'}   "
            )
            self.stream.write(line)
            self.stream.flush()
            self._printed = True
        else:
            log.info(
                "progress %s %s",
                self.label,
                " ".join(f"{k}={v}" for k, v in self.fields().items()),
            )

    def finish(self) -> None:
        """End the live line (terminal) so the next log line starts on its own row."""
        if self.is_tty and self._printed:
            self.stream.write("\n")
            self.stream.flush()

"""The sender's state directory: what the remote has acknowledged, kept with atomic renames.

``state.json`` is the one source of truth for a restart. It is replaced, never edited in
place: written to a temporary file, fsynced, renamed over the old one, and the directory
fsynced, so a crash at any moment leaves either the old or the new state, both valid.

``pending`` is the part that makes converging before a freeze safe: chunks that were sent
to the remote head but not yet committed by a FLUSH, and whose tracker generation was
already acknowledged (so the tracker forgot them). They are recorded here *before* the
tracker forgets them, and resent by the next attempt if the commit never happened.

A ``lock`` file held with ``flock`` keeps two senders off one state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbdsink.sender.errors import StateError
from nbdsink.sender.plan import Extent

FORMAT = 1
STATE_FILE = "state.json"
LOCK_FILE = "lock"
FROZEN_FILE = "frozen"


@dataclass
class CycleRecord:
    """What the last finished cycle did, for ``nbdsink status`` and the logs."""

    finished_at: str
    version: int | None
    bytes_sent: int
    bytes_zeroed: int
    duration: float
    freeze_seconds: float | None
    lag_seconds: float


@dataclass
class SenderState:
    """Everything a restarted sender needs to carry on without losing a write."""

    device: str
    uri: str
    volume: str
    size: int
    chunk_size: int
    tracker: str
    synced: bool = False
    """True once a complete image of the device was committed (the first sync is done)."""
    acked_generation: int | None = None
    pending: list[Extent] = field(default_factory=list)
    last_version: int | None = None
    last_captured_at: str | None = None
    """The instant whose device content the last version holds (freeze or checkpoint time)."""
    last_commit_at: str | None = None
    last_consistency: str | None = None
    last_cycle: CycleRecord | None = None
    last_error: str | None = None
    verify: dict[str, Any] | None = None
    """The last comparison of the device with the replica (chunks compared, differed, at)."""
    device_id: str | None = None
    """What the device said about itself (sender/identity.py) when this replication last
    accepted it: a device whose identity differs is refused. None: unknown (a device that
    says nothing stable, or a state written before identities were kept)."""
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["pending"] = [[o, n] for o, n in self.pending]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SenderState:
        if data.get("format") != FORMAT:
            raise StateError(f"state format {data.get('format')!r} is not {FORMAT}")
        data = dict(data)
        data["pending"] = [(int(o), int(n)) for o, n in data.get("pending", [])]
        cycle = data.get("last_cycle")
        data["last_cycle"] = CycleRecord(**cycle) if cycle else None
        try:
            return cls(**data)
        except TypeError as exc:
            raise StateError(f"state file has unexpected fields: {exc}") from exc


class StateDir:
    """The directory: load, atomic save, the single-sender lock and the freeze marker."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def frozen_file(self) -> Path:
        return self.path / FROZEN_FILE

    def load(self) -> SenderState | None:
        """The saved state, or None when this directory never saw a sender."""
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.state_file}: {exc.strerror}") from exc
        try:
            return SenderState.from_json(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise StateError(f"{self.state_file} is not a valid state file: {exc}") from exc

    def save(self, state: SenderState, *, durable: bool = True) -> None:
        """Replace the state atomically and, unless ``durable`` is False, durably.

        Either way the new file's content is on disk before the rename, so a crash never
        leaves a torn or empty state. ``durable=False`` skips the directory fsync that makes
        the rename itself survive a crash: for a save whose loss only means redoing work
        (the state after a commit: a lost one resends its pending chunks), not one that
        must outlive the tracker forgetting chunks (the pending list before an acknowledge).
        """
        self._write_atomic(
            self.state_file, json.dumps(state.to_json(), indent=1) + "\n", durable=durable
        )

    def _write_atomic(self, target: Path, text: str, *, durable: bool = True) -> None:
        tmp = target.with_name(target.name + ".tmp")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, target)
            if durable:
                self._fsync_dir()
        except OSError as exc:
            raise StateError(f"cannot write {target}: {exc.strerror}") from exc

    def _fsync_dir(self) -> None:
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- the freeze marker: written before FIFREEZE, removed after FITHAW -----------------

    def mark_frozen(self, mountpoint: str) -> None:
        """Record that ``mountpoint`` is about to be frozen, durably, before freezing it.

        A sender killed while the filesystem is frozen leaves this file behind; the next
        start reads it and thaws the filesystem (see :mod:`nbdsink.sender.freeze`).
        """
        self._write_atomic(self.frozen_file, json.dumps({"mountpoint": mountpoint}) + "\n")

    def frozen_mountpoint(self) -> str | None:
        """The mountpoint a previous sender froze and did not thaw, if any."""
        try:
            data = json.loads(self.frozen_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {self.frozen_file}: {exc}") from exc
        mountpoint = data.get("mountpoint") if isinstance(data, dict) else None
        return str(mountpoint) if mountpoint else None

    def clear_frozen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.frozen_file.unlink()
            self._fsync_dir()

    # -- one sender per directory ------------------------------------------------------

    def lock(self) -> None:
        """Take the directory's lock, or fail saying which process holds it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateError(
                f"another sender (pid {holder}) is using state directory {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[StateDir]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

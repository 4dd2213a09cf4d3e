"""The nbdkit plugin of nbdsink: an adapter from nbdkit callbacks to nbdsink.server.session.

    nbdkit python /path/to/nbdsink/server/nbdkit_plugin.py store=/var/lib/nbdsink

(``nbdsink serve`` runs exactly that; ``plugins/nbdsink_plugin.py`` in a checkout is a shim
that loads this module.) All logic lives in the ``nbdsink`` package. nbdkit adds neither this
folder nor a virtualenv to ``sys.path``, so the package's location comes from
NBDSINK_SITE_DIRS (set by ``nbdsink serve``) or, failing that, from this file's own place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import site
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import nbdkit


def _add_site_dirs() -> None:
    dirs = [d for d in os.environ.get("NBDSINK_SITE_DIRS", "").split(os.pathsep) if d]
    package_root = Path(__file__).resolve().parents[2]  # the folder holding nbdsink/
    dirs += [str(package_root), *map(str, package_root.glob(".venv/lib/python3*/site-packages"))]
    for d in dirs:
        if d not in sys.path and os.path.isdir(d):
            site.addsitedir(d)


_add_site_dirs()

from nbdsink import metrics  # noqa: E402
from nbdsink.errors import NbdsinkError  # noqa: E402
from nbdsink.server import nbdkit_c  # noqa: E402
from nbdsink.server.access import READ, AccessRules, describe  # noqa: E402
from nbdsink.server.exports import SCRATCH_VIEW, parse_export_name  # noqa: E402
from nbdsink.server.maintenance import run_maintenance  # noqa: E402
from nbdsink.server.session import Heads, Session, export_list  # noqa: E402
from nbdsink.store import Store  # noqa: E402
from nbdsink.store.serve_lock import take_serve_lock  # noqa: E402

API_VERSION = 2

_config: dict[str, str] = {}
_store: Store | None = None
_heads: Heads | None = None
_lock_fd: int | None = None
_access: AccessRules | None = None
_stop = threading.Event()


# -- how errors reach nbdkit's log --------------------------------------------------------------
#
# nbdkit 1.32's python plugin logs every exception a callback raises with one nbdkit_error
# holding "".join(traceback.format_exception(type, value, tb)) (check_python_failure and
# print_python_traceback in plugins/python/errors.c): a traceback of several lines, for an
# unknown export as much as for a bug. And a client such as nbdinfo asks for the same export
# twice on one connection (NBD_OPT_INFO, then NBD_OPT_GO), each time calling open. So:
#
# - A refused export name does not raise. open returns a _Refused handle, logs one line
#   itself (once per connection and name), and get_size, the first callback nbdkit calls
#   after open, returns -1: nbdkit then fails the option without a message of its own
#   (server/protocol-handshake.c, protocol_common_open: "if (size == -1) return -1;") and
#   replies NBD_REP_ERR_UNKNOWN, exactly as to an open that raised, then closes the handle.
# - An unexpected exception in open (a bug) propagates: nbdkit logs its full traceback, once
#   per connection and name (the second ask of the same connection gets a _Refused).
# - A request on an open export can only fail by raising, so an expected error there (a
#   write to a version, a full disk, a damaged chunk) raises ExpectedError, which the hook
#   below formats as its message alone; any other exception keeps its whole traceback.


class ExpectedError(Exception):
    """An error that is the client's or the environment's, not the plugin's: nbdkit logs its
    message alone, on one line (see _format_expected_errors)."""


def _format_expected_errors() -> None:
    """Make ``traceback.format_exception`` render an ExpectedError as its message alone.

    nbdkit looks the function up in the ``traceback`` module each time a callback fails, so
    wrapping it there is the one way to shape that log line. Only ExpectedError changes;
    every other exception is formatted as before, with its full traceback.
    """
    original = traceback.format_exception
    if getattr(original, "_nbdsink_expected", False):
        return  # already wrapped (the module was loaded twice)

    def format_exception(exc: Any, /, *args: Any, **kwargs: Any) -> list[str]:
        value = args[0] if args else kwargs.get("value", exc)
        if isinstance(value, ExpectedError):
            return [" ".join(str(value).splitlines())]
        result: list[str] = original(exc, *args, **kwargs)
        return result

    format_exception._nbdsink_expected = True  # type: ignore[attr-defined]
    traceback.format_exception = format_exception


_format_expected_errors()

ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
"""An OSError with one of these is the machine's trouble (a full or failing disk), not a bug."""


def _is_expected(exc: BaseException) -> bool:
    return isinstance(exc, NbdsinkError) or (
        isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS)


def _request_failed(h: Session, what: str, exc: Exception) -> None:
    """Give the client the error's errno; raise an ExpectedError (one log line) for an
    expected error. For anything else return, and the caller re-raises the original: nbdkit
    logs its whole traceback, which a bug needs."""
    if _is_expected(exc):
        nbdkit.set_error(getattr(exc, "errno", None) or errno.EIO)
        raise ExpectedError(f"export {h.export!r}: {what}: {exc}") from None
    nbdkit.set_error(errno.EIO)


class _Refused:
    """The handle of an open that was refused without an exception: get_size fails it."""

    __slots__ = ("shown",)

    def __init__(self, shown: str) -> None:
        self.shown = shown


_reported_lock = threading.Lock()
_reported: dict[int, set[str]] = {}
"""Per connection (its nbdkit thread: the handshake of one connection runs in one thread,
preconnect included), the export names whose refusal or failure was already logged."""
_REPORTED_CONNECTIONS = 4096


def preconnect(readonly: bool) -> None:
    """A new connection starts on this thread: what an earlier one on it reported is
    forgotten (threads, and so their ids, are reused)."""
    with _reported_lock:
        _reported.pop(threading.get_native_id(), None)


def _first_report(shown: str) -> bool:
    """True the first time ``shown`` is reported on this connection."""
    tid = threading.get_native_id()
    with _reported_lock:
        names = _reported.setdefault(tid, set())
        if shown in names:
            return False
        names.add(shown)
        while len(_reported) > _REPORTED_CONNECTIONS:
            del _reported[next(iter(_reported))]  # the oldest connection's
        return True


def _refuse(shown: str, reason: str, err: int) -> _Refused:
    """Refuse an export with one line in the log, naming it and the reason."""
    nbdkit.set_error(err)
    message = " ".join(f"export {shown} refused: {reason}".splitlines())
    if _first_report(shown):
        if not nbdkit_c.log_error(message):
            _log(message)
    else:
        nbdkit.debug(f"{message} (again on this connection)")
    return _Refused(shown)


def _export_name() -> tuple[str | None, str]:
    """The export name (None when it is not UTF-8) and how the log shows it."""
    try:
        name: str = nbdkit.export_name()
    except UnicodeDecodeError as exc:
        raw = nbdkit_c.export_name_bytes()
        return None, repr(raw) if raw is not None else f"(bytes {exc.object!r})"
    return name, repr(name)


def _reason(exc: BaseException, name: str) -> str:
    """The error's message, without the "export NAME: " its text may start with (the log
    line names the export already)."""
    return str(exc).removeprefix(f"export {name!r}: ")

def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    if key not in ("store", "map_size", "batch_size", "metrics", "access"):
        raise RuntimeError(
            f"unknown parameter {key!r}: expected store=DIR [map_size=SIZE] [batch_size=SIZE] "
            "[metrics=HOST:PORT] [access=FILE]"
        )
    _config[key] = value


def config_complete() -> None:
    global _access
    if "store" not in _config:
        raise RuntimeError("missing store=DIR")
    if "access" in _config:
        # `nbdsink serve` checked the file already; this is for nbdkit run by hand.
        _access = AccessRules.load(_config["access"])


# glibc mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
HEAP_KEEP = 256 << 20
"""Free memory at the top of the heap that glibc keeps instead of returning it to the kernel:
about two batches of chunks plus one commit's dirty pages."""
MMAP_ABOVE = 32 << 20
"""Only allocations this large get their own mapping (glibc's upper limit): every chunk and
request buffer, up to nbdkit's 32 MiB requests, comes from the heap."""


def _tune_malloc() -> None:
    """Keep the heap's memory in the process, and in one arena.

    Every batch allocates its chunks (one per block) and LMDB allocates a commit's dirty
    pages, then both are freed at once. By default glibc hands that memory back to the
    kernel when it is freed and faults fresh zeroed pages in for the next batch, which made
    the puts of a 64 MiB batch six times slower than with the memory kept (measured: 0.9 s
    against 0.16 s of puts per GiB). With an arena per thread, memory freed by the saving
    thread would also be no use to the threads that receive the next batch. Allocations
    are few (one per block), so the one arena's lock is not contended.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: only slower
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)


def _raise_open_files_limit() -> None:
    """Segment environments take two descriptors each: allow as many as the system lets."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def after_fork() -> None:
    # LMDB must not be opened before nbdkit forks into the background, so open here.
    global _store, _heads, _lock_fd
    _raise_open_files_limit()
    # Before nbdkit starts the threads that serve connections, so they all use it.
    _tune_malloc()
    path = Path(_config["store"])
    _lock_fd = take_serve_lock(path)
    kwargs: dict[str, Any] = {}
    if "map_size" in _config:
        kwargs["map_size"] = int(nbdkit.parse_size(_config["map_size"]))
    _store = Store(path, create=True, serving=True, **kwargs)
    batch = int(nbdkit.parse_size(_config["batch_size"])) if "batch_size" in _config else None
    _heads = Heads(_store, batch_bytes=batch)
    threading.Thread(target=_heads.run_idle_saver, args=(_stop,), daemon=True,
                     name="nbdsink-idle-saver").start()
    threading.Thread(target=run_maintenance, args=(_store, _heads, _stop, _log), daemon=True,
                     name="nbdsink-maintenance").start()
    if "metrics" in _config:
        metrics.REGISTRY.register(metrics.StoreCollector(_store))
        metrics.serve_metrics(_config["metrics"])


def _log(message: str) -> None:
    """A line in the server's log (nbdkit's stderr), whatever nbdkit's verbosity."""
    print(f"nbdsink: {message}", file=sys.stderr, flush=True)


def cleanup() -> None:
    """Save pending writes and close the store, then end the process.

    nbdkit's unload step finalizes the embedded interpreter, and with a client still
    connected that never returns (SIGTERM would then hang until every client left). Nothing
    is left to do after this point, so exit here, with the store already closed cleanly.
    """
    status = 0
    _stop.set()
    try:
        if _heads is not None:
            _heads.save_all()
        if _store is not None:
            _store.sync()
            _store.close()
    except Exception as exc:
        nbdkit.debug(f"cleanup: pending writes not saved: {exc}")
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    assert _store is not None
    exports = export_list(_store)
    if _access is None:
        return exports
    # A client sees only the volumes it may open (names never hold '@' or ';').
    peer = nbdkit_c.peer()
    return [(name, text) for name, text in exports
            if _access.grant(peer, name.partition("@")[0]) is not None]


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


def open(readonly: bool) -> Session | _Refused:  # nbdkit's callback name shadows the builtin
    """A Session for the export the client asked for, or a _Refused (see the top of this
    module for why a refusal is not an exception)."""
    assert _store is not None and _heads is not None
    name, shown = _export_name()
    if name is None:
        return _refuse(shown, "the name is not valid UTF-8", errno.ENOENT)
    try:
        if _access is not None:
            readonly = _apply_access(name, readonly)
        return Session(_store, _heads, name, readonly)
    except _AccessRefused as exc:
        return _refuse(shown, str(exc), errno.EACCES)
    except NbdsinkError as exc:
        return _refuse(shown, _reason(exc, name), getattr(exc, "errno", None) or errno.ENOENT)
    except Exception:
        if not _first_report(shown):
            nbdkit.debug(f"export {shown}: failed again on this connection (the traceback "
                         "is above)")
            return _Refused(shown)
        nbdkit.set_error(errno.EIO)
        raise  # a bug: nbdkit logs the whole traceback


class _AccessRefused(Exception):
    """--access gives this client nothing on the volume."""


def _apply_access(name: str, readonly: bool) -> bool:
    """Check --access for this client; the ``readonly`` the export is opened with."""
    assert _access is not None
    parsed = parse_export_name(name)  # a malformed name is refused as such
    peer = nbdkit_c.peer()
    grant = _access.grant(peer, parsed.volume)
    if grant is None:
        raise _AccessRefused(f"{describe(peer)} has no access to volume {parsed.volume!r} "
                             f"(--access {_access.path})")
    # Read access serves every export read-only, except a scratch view, whose writes
    # live only for the connection and never reach the store.
    return readonly or (grant == READ and parsed.view != SCRATCH_VIEW)


def close(h: Session | _Refused) -> None:
    if isinstance(h, Session):
        h.close()



def export_description(h: Session) -> str:
    return h.description


def get_size(h: Session | _Refused) -> int:
    if isinstance(h, _Refused):
        return -1  # fails the NBD option quietly: the refusal is logged already
    return h.size


def block_size(h: Session) -> tuple[int, int, int]:
    return h.block_size


def can_write(h: Session) -> bool:
    return not h.readonly


def can_flush(h: Session) -> bool:
    return True


def can_trim(h: Session) -> bool:
    return not h.readonly


def can_zero(h: Session) -> bool:
    return not h.readonly


def can_fast_zero(h: Session) -> bool:
    return not h.readonly


def can_fua(h: Session) -> int:
    return int(nbdkit.FUA_NATIVE) if not h.readonly else int(nbdkit.FUA_NONE)


def can_multi_conn(h: Session) -> bool:
    return True


def can_extents(h: Session) -> bool:
    return True


def can_cache(h: Session) -> int:
    return int(nbdkit.CACHE_EMULATE)


def is_rotational(h: Session) -> bool:
    return False


def pread(h: Session, buf: memoryview, offset: int, flags: int) -> None:
    try:
        h.pread(memoryview(buf), offset)
    except Exception as exc:
        _request_failed(h, f"read of {len(buf)} bytes at {offset}", exc)
        raise


def pwrite(h: Session, buf: memoryview, offset: int, flags: int) -> None:
    # buf is a view of nbdkit's own buffer, valid only during this call: Head.write copies.
    try:
        h.pwrite(memoryview(buf), offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _request_failed(h, f"write of {len(buf)} bytes at {offset}", exc)
        raise


def zero(h: Session, count: int, offset: int, flags: int) -> None:
    try:
        h.zero(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _request_failed(h, f"zero of {count} bytes at {offset}", exc)
        raise


def trim(h: Session, count: int, offset: int, flags: int) -> None:
    try:
        h.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _request_failed(h, f"trim of {count} bytes at {offset}", exc)
        raise


def flush(h: Session, flags: int) -> None:
    try:
        info = h.flush()
        if info is not None:
            nbdkit.debug(f"committed {info.volume}@{info.version}")
    except Exception as exc:
        _request_failed(h, "flush", exc)
        raise


def extents(h: Session, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        return h.extents(count, offset)
    except Exception as exc:
        _request_failed(h, f"block status of {count} bytes at {offset}", exc)
        raise

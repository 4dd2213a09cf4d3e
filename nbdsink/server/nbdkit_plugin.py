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
from nbdsink.server.maintenance import run_maintenance  # noqa: E402
from nbdsink.server.session import Heads, Session, export_list  # noqa: E402
from nbdsink.store import Store  # noqa: E402
from nbdsink.store.serve_lock import take_serve_lock  # noqa: E402

API_VERSION = 2

_config: dict[str, str] = {}
_store: Store | None = None
_heads: Heads | None = None
_lock_fd: int | None = None
_stop = threading.Event()


class PluginError(Exception):
    """What the plugin raises to nbdkit: only the message, without the traceback that nbdkit
    would otherwise log for every expected error (an unknown export, a full disk)."""


def _fail(exc: BaseException) -> None:
    """Report an exception to the client with its errno (EIO when it carries none)."""
    nbdkit.set_error(getattr(exc, "errno", None) or errno.EIO)
    raise PluginError(f"{type(exc).__name__}: {exc}").with_traceback(None) from None


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    if key not in ("store", "map_size", "batch_size", "metrics"):
        raise RuntimeError(
            f"unknown parameter {key!r}: expected store=DIR [map_size=SIZE] [batch_size=SIZE] "
            "[metrics=HOST:PORT]"
        )
    _config[key] = value


def config_complete() -> None:
    if "store" not in _config:
        raise RuntimeError("missing store=DIR")


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
    return export_list(_store)


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


def open(readonly: bool) -> Session:  # nbdkit's callback name shadows the builtin
    assert _store is not None and _heads is not None
    name = "?"
    try:
        name = nbdkit.export_name()
        return Session(_store, _heads, name, readonly)
    except UnicodeDecodeError:
        nbdkit.set_error(errno.ENOENT)
        raise PluginError("the export name is not valid UTF-8") from None
    except Exception as exc:
        nbdkit.debug(f"open {name!r}: {exc}")
        _fail(exc)
        raise


def close(h: Session) -> None:
    h.close()


def export_description(h: Session) -> str:
    return h.description


def get_size(h: Session) -> int:
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
        _fail(exc)


def pwrite(h: Session, buf: memoryview, offset: int, flags: int) -> None:
    # buf is a view of nbdkit's own buffer, valid only during this call: Head.write copies.
    try:
        h.pwrite(memoryview(buf), offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)


def zero(h: Session, count: int, offset: int, flags: int) -> None:
    try:
        h.zero(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)


def trim(h: Session, count: int, offset: int, flags: int) -> None:
    try:
        h.trim(count, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as exc:
        _fail(exc)


def flush(h: Session, flags: int) -> None:
    try:
        info = h.flush()
        if info is not None:
            nbdkit.debug(f"committed {info.volume}@{info.version}")
    except Exception as exc:
        _fail(exc)


def extents(h: Session, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        return h.extents(count, offset)
    except Exception as exc:
        _fail(exc)
        raise

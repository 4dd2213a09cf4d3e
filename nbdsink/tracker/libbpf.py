"""The few libbpf (``libbpf.so.1``) calls the eBPF tracker needs, through ctypes.

Every call that fails raises :class:`~nbdsink.tracker.base.TrackerError` with the errno's
text and, for a failed load, the last lines libbpf logged (the verifier's complaint).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from nbdsink.tracker.base import TrackerError

_c_ptr = ctypes.c_void_p


class _OpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts as of libbpf 1.1; ``sz`` tells libbpf how much we pass.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
    ]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _c_ptr),
        ("data_out", _c_ptr),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", _c_ptr),
        ("ctx_out", _c_ptr),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _c_ptr)
_log: list[str] = []
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _c_ptr]


def _print_py(level: int, fmt: bytes, args: int) -> int:
    # Keep libbpf's messages (warnings and the verifier log) for error reports, not stderr.
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    _log.append(buf.value.decode(errors="replace"))
    del _log[:-200]
    return 0


# Kept at module level: libbpf holds this pointer for the life of the process.
_print = _PRINT_FN(_print_py)


def lib() -> ctypes.CDLL:
    """libbpf, loaded once, with argument types declared."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        l = ctypes.CDLL("libbpf.so.1", use_errno=True)  # noqa: E741
    except OSError as exc:
        raise TrackerError(f"libbpf.so.1 is not installed (Debian package libbpf1): {exc}") from None
    sigs: dict[str, tuple[list[object], object]] = {
        "bpf_object__open_file": ([ctypes.c_char_p, ctypes.POINTER(_OpenOpts)], _c_ptr),
        "bpf_object__load": ([_c_ptr], ctypes.c_int),
        "bpf_object__close": ([_c_ptr], None),
        "bpf_object__find_map_by_name": ([_c_ptr, ctypes.c_char_p], _c_ptr),
        "bpf_object__find_program_by_name": ([_c_ptr, ctypes.c_char_p], _c_ptr),
        "bpf_map__set_max_entries": ([_c_ptr, ctypes.c_uint32], ctypes.c_int),
        "bpf_map__set_initial_value": ([_c_ptr, _c_ptr, ctypes.c_size_t], ctypes.c_int),
        "bpf_map__pin": ([_c_ptr, ctypes.c_char_p], ctypes.c_int),
        "bpf_map__fd": ([_c_ptr], ctypes.c_int),
        "bpf_program__set_autoload": ([_c_ptr, ctypes.c_bool], ctypes.c_int),
        "bpf_program__attach": ([_c_ptr], _c_ptr),
        "bpf_program__pin": ([_c_ptr, ctypes.c_char_p], ctypes.c_int),
        "bpf_link__pin": ([_c_ptr, ctypes.c_char_p], ctypes.c_int),
        "bpf_link__destroy": ([_c_ptr], ctypes.c_int),
        "bpf_obj_get": ([ctypes.c_char_p], ctypes.c_int),
        "bpf_obj_get_info_by_fd": ([ctypes.c_int, _c_ptr, ctypes.POINTER(ctypes.c_uint32)], ctypes.c_int),
        "bpf_prog_test_run_opts": ([ctypes.c_int, ctypes.POINTER(_TestRunOpts)], ctypes.c_int),
        "bpf_map_lookup_elem": ([ctypes.c_int, _c_ptr, _c_ptr], ctypes.c_int),
        "libbpf_num_possible_cpus": ([], ctypes.c_int),
        "libbpf_set_print": ([_PRINT_FN], _c_ptr),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(l, name)
        fn.argtypes = argtypes
        fn.restype = restype
    l.libbpf_set_print(_print)
    _lib = l
    return l


def _fail(what: str, err: int) -> TrackerError:
    err = abs(err) or ctypes.get_errno() or errno.EIO
    tail = "; ".join(line.strip() for line in _log[-6:] if line.strip())
    msg = f"{what}: {os.strerror(err)}"
    if err == errno.EPERM:
        msg += " (loading eBPF programs needs root or CAP_BPF + CAP_PERFMON)"
    return TrackerError(f"{msg}{' [libbpf: ' + tail + ']' if tail else ''}")


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise _fail(what, rc)
    return rc


def _nonnull(ptr: int | None, what: str) -> int:
    if not ptr:
        raise _fail(what, ctypes.get_errno())
    return ptr


class BpfObject:
    """An opened (then loaded) BPF object file; :meth:`close` releases what was not pinned."""

    def __init__(self, path: str, btf_custom_path: str | None = None) -> None:
        l = lib()  # noqa: E741
        _log.clear()
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts))
        if btf_custom_path is not None:
            opts.btf_custom_path = btf_custom_path.encode()
        self._obj = _nonnull(l.bpf_object__open_file(path.encode(), ctypes.byref(opts)), f"opening {path}")
        self._links: list[int] = []

    def map(self, name: str) -> int:
        return _nonnull(lib().bpf_object__find_map_by_name(self._obj, name.encode()), f"map {name}")

    def program(self, name: str) -> int:
        return _nonnull(lib().bpf_object__find_program_by_name(self._obj, name.encode()), f"program {name}")

    def set_max_entries(self, map_name: str, n: int) -> None:
        _check(lib().bpf_map__set_max_entries(self.map(map_name), n), f"sizing map {map_name}")

    def set_rodata(self, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        _check(lib().bpf_map__set_initial_value(self.map(".rodata"), buf, len(data)), "setting .rodata")

    def set_autoload(self, prog: str, on: bool) -> None:
        _check(lib().bpf_program__set_autoload(self.program(prog), on), f"autoload {prog}")

    def load(self) -> None:
        _check(lib().bpf_object__load(self._obj), "loading the BPF object")

    def pin_map(self, name: str, path: str) -> None:
        _check(lib().bpf_map__pin(self.map(name), path.encode()), f"pinning map {name} at {path}")

    def pin_program(self, name: str, path: str) -> None:
        _check(lib().bpf_program__pin(self.program(name), path.encode()), f"pinning {name} at {path}")

    def attach_and_pin(self, prog: str, path: str) -> None:
        """Attach ``prog`` and pin its link, so it stays attached after this process ends."""
        link = _nonnull(lib().bpf_program__attach(self.program(prog)), f"attaching {prog}")
        self._links.append(link)
        _check(lib().bpf_link__pin(link, path.encode()), f"pinning link of {prog} at {path}")

    def close(self) -> None:
        # Destroying a pinned link only closes our descriptor: the pin keeps it attached.
        for link in self._links:
            lib().bpf_link__destroy(link)
        self._links.clear()
        if self._obj:
            lib().bpf_object__close(self._obj)
            self._obj = 0


def obj_get(path: str) -> int:
    """A new file descriptor for the pinned object at ``path``."""
    return _check(lib().bpf_obj_get(path.encode()), f"opening pinned {path}")


def obj_id(fd: int) -> int:
    """The kernel's id of a BPF map or program (the second u32 of its info struct)."""
    info = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(len(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "reading object info")
    return int.from_bytes(info.raw[4:8], "little")


def recursion_misses(prog_fd: int) -> int:
    """How many times the kernel skipped this program because it was already running on
    the CPU (a nested tracepoint hit in interrupt context): each skip may be a lost write."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    size = ctypes.c_uint32(len(info))
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)), "reading program info")
    if size.value < _RECURSION_MISSES_OFFSET + 8:
        raise TrackerError("the kernel does not report BPF recursion misses (too old)")
    return int.from_bytes(info.raw[_RECURSION_MISSES_OFFSET : _RECURSION_MISSES_OFFSET + 8], "little")


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(total run time in ns, number of runs) of a program; counted only while the sysctl
    ``kernel.bpf_stats_enabled`` is 1 (benchmarks)."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    size = ctypes.c_uint32(len(info))
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)), "reading program info")
    ns, cnt = struct.unpack_from("<QQ", info.raw, _RUN_TIME_OFFSET)
    return int(ns), int(cnt)


# struct bpf_prog_info (linux/bpf.h): run_time_ns, run_cnt, then recursion_misses (5.12+).
_RUN_TIME_OFFSET = 192
_RECURSION_MISSES_OFFSET = 208
_PROG_INFO_SIZE = 232


def percpu_values(map_fd: int, key: int, value_size: int) -> list[bytes]:
    """The value of ``key`` (a u32) in a per-CPU map, one ``bytes`` per possible CPU."""
    ncpus = _check(lib().libbpf_num_possible_cpus(), "counting possible CPUs")
    stride = -(-value_size // 8) * 8  # the kernel rounds each CPU's value up to 8 bytes
    buf = ctypes.create_string_buffer(stride * ncpus)
    k = ctypes.c_uint32(key)
    _check(lib().bpf_map_lookup_elem(map_fd, ctypes.byref(k), buf), "reading a per-CPU map")
    return [buf.raw[i * stride : i * stride + value_size] for i in range(ncpus)]


def test_run(prog_fd: int) -> int:
    """Run a ``syscall`` program once; its return value."""
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "running the flip program")
    return int(opts.retval)


@contextmanager
def opened(path: str) -> Iterator[int]:
    """A pinned object's descriptor for the duration of a ``with`` block."""
    fd = obj_get(path)
    try:
        yield fd
    finally:
        os.close(fd)

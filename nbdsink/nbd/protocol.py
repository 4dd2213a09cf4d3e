"""NBD wire constants and fixed-layout encoders, shared by the client and server roles.

Names and values follow the NBD protocol document (``doc/proto.md`` of the nbd project).
Everything on the wire is big-endian. Only what this package uses is defined here.
"""

from __future__ import annotations

import struct

# --- handshake ----------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x0003E889045565A9

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# transmission flags (16 bits, sent with the export size)
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# --- transmission -------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

NBD_REPLY_FLAG_DONE = 1 << 0

NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_FLAG_ERROR | 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_FLAG_ERROR | 2

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# base:allocation status bits
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# --- limits -------------------------------------------------------------------------------

MAX_STRING = 4096
"""Longest name or description the protocol allows (and the longest we accept)."""
MAX_OPTION_REPLY = 64 * 1024
"""Longest option reply payload accepted; real replies are a few hundred bytes."""
MAX_OPTION_DATA = 64 * 1024
"""Longest option request payload the server role accepts."""
MAX_EXTENTS_PAYLOAD = 8 * 1024 * 1024
"""Longest block-status chunk accepted (a million extents)."""
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
"""Payload limit when the server states none: the spec's safe default (and qemu-nbd's)."""

# --- fixed layouts ------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then 124 zeroes)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
ERROR_CHUNK = struct.Struct(">IH")  # errno, message length
EXTENT = struct.Struct(">II")  # length, status flags


def encode_option(option: int, data: bytes = b"") -> bytes:
    """A client option request."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """A server option reply."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def encode_string(text: str) -> bytes:
    """A 32-bit length-prefixed UTF-8 string, as used in option payloads."""
    raw = text.encode()
    return U32.pack(len(raw)) + raw


# --- names for messages -------------------------------------------------------------------

_OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}
_REPLY_NAMES = {
    NBD_REP_ACK: "ACK",
    NBD_REP_SERVER: "SERVER",
    NBD_REP_INFO: "INFO",
    NBD_REP_META_CONTEXT: "META_CONTEXT",
    NBD_REP_ERR_UNSUP: "unsupported",
    NBD_REP_ERR_POLICY: "forbidden by policy",
    NBD_REP_ERR_INVALID: "invalid",
    NBD_REP_ERR_PLATFORM: "unsupported on this platform",
    NBD_REP_ERR_TLS_REQD: "TLS required",
    NBD_REP_ERR_UNKNOWN: "unknown export",
    NBD_REP_ERR_SHUTDOWN: "server shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
    NBD_REP_ERR_TOO_BIG: "request too big",
}
_COMMAND_NAMES = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
}


def option_name(option: int) -> str:
    """Human-readable name of an option number."""
    return _OPTION_NAMES.get(option, f"option {option}")


def reply_type_name(reply_type: int) -> str:
    """Human-readable name of an option reply type."""
    return _REPLY_NAMES.get(reply_type, f"reply type {reply_type:#x}")


def command_name(command: int) -> str:
    """Human-readable name of a command number."""
    return _COMMAND_NAMES.get(command, f"command {command}")

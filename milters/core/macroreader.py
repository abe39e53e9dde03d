"""The MTA's macros for one connection, read from libmilter's context without smfi_getsymval.

Why not smfi_getsymval: libmilter (8.14 to 8.17, engine.c dec_argv) stores each
SMFIC_MACRO packet as a NULL-terminated char*[] of its NUL-separated strings, and
smfi_getsymval walks it two at a time (name, value) until it sees NULL. A packet
with an odd number of strings (a NUL inside a value does it) makes that walk step
over the terminating NULL and read past the malloc'd array; for any name it does
not find first, whatever lies there is taken as a string pointer: SIGSEGV. Any
process that reaches the socket could kill a worker with one packet, and every
list stays in the context for the connection, so each later lookup hits it too.
(pymilter's getsymval also decodes values as strict UTF-8 and raises on 8-bit.)

So we never call it. We read the lists ourselves, through /proc/self/mem: a read
at a bad address there is an EIO error, never a fault, so nothing this module
does can crash the process, even if the layout below were wrong. The layout is
`struct smfi_str` of libmilter/libmilter.h (sendmail 8.14 to 8.17, LP64):

    offset   0  sthread_t ctx_id          offset  56  unsigned long ctx_pflags
             8  socket_t ctx_sd, ctx_dbg          64  unsigned long ctx_pflags2mta
            16  time_t ctx_timeout                72  int ctx_prot_vers2mta
            24  int ctx_state                     80  char **ctx_mac_ptr[7]
            32  smfiDesc_ptr ctx_smfi            136  char *ctx_mac_buf[7]
            40  int ctx_prot_vers                192  char *ctx_mac_list[7]
            48  unsigned long ctx_aflags         248  char *ctx_reply
                                                 256  void *ctx_privdata

and pymilter's context object is `{PyObject_HEAD; SMFICTX *ctx; ...}` (the
pointer at offset 16). Every read checks that layout against facts we know
independently before trusting a pointer: ctx_privdata is the pymilter context
object itself (pymilter keeps it there with smfi_setpriv), ctx_timeout is the
timeout we configured, and each stored list's first entry points one byte past
the start of its packet buffer (dec_argv is given a_buf + 1, after the stage
letter). If any check fails the reader says so (LayoutError) and the adapter
refuses the connection with a tempfail: we never guess at memory.

A list with an odd number of strings is a protocol violation (no MTA sends one:
each macro is a name and a value); the caller refuses the connection.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Any, Protocol

# pymilter's milter_ContextObject: PyObject_HEAD (refcount, type) then SMFICTX *ctx.
PYMILTER_CTX_OFFSET = 16

CTX_STATE = 24
CTX_TIMEOUT = 16
CTX_MAC_PTR = 80
CTX_MAC_BUF = 136
CTX_PRIVDATA = 256
MAX_MACROS_ENTRIES = 7  # CI_CONN, CI_HELO, CI_MAIL, CI_RCPT, CI_DATA, CI_EOM, CI_EOH
CTX_SIZE = CTX_PRIVDATA + 8

# The stage each list holds (libmilter's CI_* order), for log lines.
STAGE_NAMES = ("connect", "helo", "mail", "rcpt", "data", "eom", "eoh")

# Bounds: libmilter refuses packets above its maximum data size (we raise it to
# 1 MB, adapter.MAX_PACKET); a list can never hold more strings or bytes than that.
MAX_LIST_BYTES = 1024 * 1024
POINTER_CHUNK = 64  # pointers read per pread while looking for the NULL
PAGE = os.sysconf("SC_PAGE_SIZE")


class LayoutError(Exception):
    """libmilter's context does not look as expected; its macros cannot be read safely."""


@dataclass(frozen=True)
class Macros:
    """The macros the MTA sent so far on one connection."""

    values: dict[str, str]
    # Stages whose macro list had an odd number of strings (a protocol violation).
    odd_lists: tuple[str, ...] = ()

    def get(self, name: str) -> str:
        return self.values.get(normalize(name), "")


def normalize(name: str) -> str:
    """smfi_getsymval treats `{i}` and `i` as one name (one-letter macros only)."""
    if len(name) == 3 and name[0] == "{" and name[2] == "}":
        return name[1]
    return name


def context_pointer(ctx_object: object) -> int:
    """The SMFICTX* inside a pymilter context object (read from the live Python
    object, whose layout is fixed by pymilter's miltermodule.c)."""
    return int(ctypes.c_void_p.from_address(id(ctx_object) + PYMILTER_CTX_OFFSET).value or 0)


class MacroSource(Protocol):
    """Where the adapter reads an MTA connection's macros and its libmilter state:
    MacroReader for libmilter's contexts, core/pyserver.py's for its own."""

    def read(self, ctx_object: Any) -> Macros: ...

    def state(self, ctx_object: Any) -> int: ...


class MacroReader:
    """Reads macro lists out of libmilter contexts of this process.

    Open it in the process that serves (after fork): /proc/self/mem names the
    process that opened it.
    """

    def __init__(self, timeout: int) -> None:
        self.timeout = timeout
        self._mem = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._mem)

    def _read(self, address: int, size: int) -> bytes:
        if address <= 0 or size <= 0:
            raise LayoutError(f"bad address {address:#x}")
        try:
            data = os.pread(self._mem, size, address)
        except OSError as exc:  # EIO: not mapped; the layout is not what we think
            raise LayoutError(f"cannot read {size} bytes at {address:#x}: {exc}") from None
        if len(data) != size:
            raise LayoutError(f"short read at {address:#x}")
        return data

    def state(self, ctx_object: object) -> int:
        """libmilter's ctx_state (ST_* of engine.c) for this connection."""
        ctx = self._checked_context(ctx_object)
        return int(struct.unpack_from("<i", ctx, CTX_STATE)[0])

    def _checked_context(self, ctx_object: object) -> bytes:
        address = context_pointer(ctx_object)
        if not address:
            raise LayoutError("pymilter context has no SMFICTX")
        ctx = self._read(address, CTX_SIZE)
        (privdata,) = struct.unpack_from("<Q", ctx, CTX_PRIVDATA)
        (timeout,) = struct.unpack_from("<q", ctx, CTX_TIMEOUT)
        if privdata != id(ctx_object):
            raise LayoutError("ctx_privdata is not the pymilter context object")
        if timeout != self.timeout:
            raise LayoutError(f"ctx_timeout is {timeout}, not the configured {self.timeout}")
        return ctx

    def read(self, ctx_object: object) -> Macros:
        """Every macro sent so far; later stages win, as in smfi_getsymval."""
        ctx = self._checked_context(ctx_object)
        ptrs = struct.unpack_from(f"<{MAX_MACROS_ENTRIES}Q", ctx, CTX_MAC_PTR)
        bufs = struct.unpack_from(f"<{MAX_MACROS_ENTRIES}Q", ctx, CTX_MAC_BUF)
        values: dict[str, str] = {}
        odd: list[str] = []
        for index in range(MAX_MACROS_ENTRIES):
            ptr, buf = ptrs[index], bufs[index]
            if not ptr and not buf:
                continue
            if not ptr or not buf:
                raise LayoutError(f"macro list {index} has a pointer array or a buffer, not both")
            strings = self._strings(ptr, buf)
            if len(strings) % 2:
                odd.append(STAGE_NAMES[index])
                continue
            found: dict[str, str] = {}
            for i in range(0, len(strings), 2):
                # Within one list the first occurrence wins (getsymval stops there).
                found.setdefault(normalize(_text(strings[i])), _text(strings[i + 1]))
            values.update(found)  # a later stage's list overrides an earlier one
        return Macros(values, tuple(odd))

    def _strings(self, ptr: int, buf: int) -> list[bytes]:
        """The strings of one dec_argv list, checked against its packet buffer."""
        pointers: list[int] = []
        offset = 0
        if ptr % 8:
            raise LayoutError("macro list pointer is not aligned")
        while True:
            address = ptr + offset
            size = min(POINTER_CHUNK * 8, PAGE - address % PAGE)  # never past its page
            chunk = struct.unpack(f"<{size // 8}Q", self._read(address, size))
            for p in chunk:
                if p == 0:
                    return self._split(pointers, buf)
                pointers.append(p)
            offset += size
            if offset > MAX_LIST_BYTES * 8:
                raise LayoutError("macro list without its terminating NULL")

    def _split(self, pointers: list[int], buf: int) -> list[bytes]:
        if not pointers:
            return []
        first = buf + 1  # dec_argv(a_buf + 1, ...): after the stage letter
        if pointers[0] != first:
            raise LayoutError("macro list does not start in its packet buffer")
        last = pointers[-1]
        if not first <= last < first + MAX_LIST_BYTES:
            raise LayoutError("macro list points outside its packet buffer")
        # dec_argv lists only NUL-terminated strings, laid end to end: read up to
        # the NUL that ends the last one.
        span = self._read(first, last - first) if last > first else b""
        # The tail is read a page at a time: the string lies in mapped memory,
        # and no read crosses into a page it does not reach.
        tail = b""
        while b"\0" not in tail:
            if len(tail) >= MAX_LIST_BYTES:
                raise LayoutError("last macro string has no NUL")
            address = last + len(tail)
            tail += self._read(address, PAGE - address % PAGE)
        data = span + tail[: tail.index(b"\0")]
        strings = data.split(b"\0")
        # Each pointer must be exactly where the split says the string starts.
        position = first
        for p, s in zip(pointers, strings, strict=False):
            if p != position:
                raise LayoutError("macro list pointers do not match its buffer")
            position += len(s) + 1
        if len(strings) != len(pointers):
            raise LayoutError("macro list pointers do not match its buffer")
        return strings


def _text(raw: bytes) -> str:
    # Macro values are whatever the MTA (or anyone on the socket) sent: keep the
    # bytes recoverable rather than raise on 8-bit.
    return raw.decode("utf-8", "surrogateescape")

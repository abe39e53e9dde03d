"""The macro reader against a context laid out in memory as libmilter lays it out.

A ctypes array stands in for `struct smfi_str`: a ctypes object keeps the address
of its buffer where pymilter's context object keeps its SMFICTX* (offset 16), so
the reader finds this fake context the way it finds the real one. The point of
these tests is the fail-safe: wrong layouts and wild pointers give LayoutError,
never a crash (the reader goes through /proc/self/mem). The real layout is
checked against real libmilter in tests/protocol/test_hostile_protocol.py.
"""

from __future__ import annotations

import ctypes
import timeit

import pytest

from milters.core import macroreader
from milters.core.macroreader import LayoutError, MacroReader

TIMEOUT = 37
WORDS = macroreader.CTX_SIZE // 8


class FakeContext:
    """A struct smfi_str with macro lists built as engine.c's dec_argv builds them."""

    def __init__(self) -> None:
        self.ctx = (ctypes.c_uint64 * WORDS)()
        self.keep: list[object] = []
        self.ctx[macroreader.CTX_TIMEOUT // 8] = TIMEOUT
        self.ctx[macroreader.CTX_PRIVDATA // 8] = id(self.ctx)

    def set_list(self, index: int, packet: bytes) -> None:
        """`packet`: the SMFIC_MACRO data, stage letter first."""
        buf = ctypes.create_string_buffer(packet, len(packet) + 1)
        base = ctypes.addressof(buf)
        data = packet[1:]
        nelem = data.count(b"\0")
        argv = (ctypes.c_uint64 * (nelem + 1))()
        argv[0] = base + 1
        elem = 0
        for i, byte in enumerate(data):
            if byte == 0 and elem < nelem:
                elem += 1
                argv[elem] = base + 1 + i + 1 if i + 1 < len(data) else 0
        argv[elem] = 0
        self.keep += [buf, argv]
        self.ctx[macroreader.CTX_MAC_PTR // 8 + index] = ctypes.addressof(argv)
        self.ctx[macroreader.CTX_MAC_BUF // 8 + index] = base


@pytest.fixture
def reader() -> MacroReader:
    r = MacroReader(TIMEOUT)
    yield r  # type: ignore[misc]
    r.close()


CONNECT = b"Cj\0mx.example\0{daemon_name}\0ORIGINATING\0_\0client [192.0.2.1]\0"


def test_reads_pairs_and_later_stages_win(reader: MacroReader) -> None:
    fake = FakeContext()
    fake.set_list(0, CONNECT)
    fake.set_list(2, b"M{i}\0ABC123\0{auth_authen}\0alice\0j\0mail-stage\0")
    macros = reader.read(fake.ctx)
    assert not macros.odd_lists
    assert macros.get("{daemon_name}") == "ORIGINATING"
    assert macros.get("i") == macros.get("{i}") == "ABC123"
    assert macros.get("j") == "mail-stage"  # the MAIL list is searched first
    assert macros.get("{auth_authen}") == "alice"
    assert macros.get("{absent}") == ""


def test_odd_list_is_reported_not_walked(reader: MacroReader) -> None:
    fake = FakeContext()
    fake.set_list(0, CONNECT)
    fake.set_list(5, b"Ei\0ABC\0with\0nul\0x\0")
    assert reader.read(fake.ctx).odd_lists == ("eom",)


def test_eight_bit_values_are_kept_escaped(reader: MacroReader) -> None:
    fake = FakeContext()
    fake.set_list(2, b"M{auth_authen}\0\xff\xfe\0")
    value = reader.read(fake.ctx).get("{auth_authen}")
    assert value.encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_unterminated_last_string_is_not_listed(reader: MacroReader) -> None:
    fake = FakeContext()
    fake.set_list(0, b"Cj\0mx\0tail-without-nul")
    assert reader.read(fake.ctx).values == {"j": "mx"}


@pytest.mark.parametrize("damage", [
    "timeout", "privdata", "wild pointer", "unmapped pointer", "buffer mismatch",
    "pointer without buffer",
])
def test_wrong_layout_is_an_error_not_a_crash(reader: MacroReader, damage: str) -> None:
    fake = FakeContext()
    fake.set_list(0, CONNECT)
    ptr = macroreader.CTX_MAC_PTR // 8
    buf = macroreader.CTX_MAC_BUF // 8
    if damage == "timeout":
        fake.ctx[macroreader.CTX_TIMEOUT // 8] = TIMEOUT + 1
    elif damage == "privdata":
        fake.ctx[macroreader.CTX_PRIVDATA // 8] = 12345
    elif damage == "wild pointer":
        fake.ctx[ptr + 3] = 0x10  # page zero: never mapped
        fake.ctx[buf + 3] = 0x18
    elif damage == "unmapped pointer":
        fake.ctx[ptr + 3] = 0x7FFF_FFFF_F000 - 0x1000_0000  # far from any mapping
        fake.ctx[buf + 3] = 0x7FFF_FFFF_F000 - 0x1000_0000
    elif damage == "buffer mismatch":
        fake.ctx[buf] += 8
    else:
        fake.ctx[buf] = 0
    with pytest.raises(LayoutError):
        reader.read(fake.ctx)


def test_reading_costs_microseconds(reader: MacroReader) -> None:
    """Postfix's default lists at connect and MAIL: one read per callback is cheap
    next to the callback itself (about a millisecond per message in total)."""
    fake = FakeContext()
    fake.set_list(0, CONNECT + b"{client_addr}\0192.0.2.1\0{client_name}\0client\0")
    fake.set_list(2, b"M{auth_type}\0PLAIN\0{auth_authen}\0alice\0{mail_addr}\0a@b\0")
    per_read = min(timeit.repeat(lambda: reader.read(fake.ctx), number=200, repeat=3)) / 200
    assert per_read < 0.001, per_read

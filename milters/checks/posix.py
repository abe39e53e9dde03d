"""POSIX regular expressions as Postfix's `regexp:` tables run them: glibc's
regcomp(3)/regexec(3), called through ctypes.

Postfix's dict_regexp.c compiles each pattern with regcomp(REG_EXTENDED | REG_ICASE,
each toggled by the `x` and `i` flags, REG_NEWLINE by `m`) and matches with regexec
in the C locale (Postfix never calls setlocale() for its tables). Calling the same
functions gives the same answers where a translation to Python cannot: leftmost-
longest matching (which text `$1` captures), bracket expressions and classes as
glibc reads them (`\\d` is no digit class), glibc's error texts for what it refuses,
and no backtracking blow-up: `(a+)+$` on 100,000 a's takes about a millisecond.

Locale: the process runs in Python's locale (LC_CTYPE from the environment, often
C.UTF-8), so every regcomp/regexec runs under a per-thread uselocale(): the "C"
locale for byte-exact matching (decode = false, Postfix's way), "C.UTF-8" for decoded
text (decode = true: one character may be several bytes, and `.` is one character).

Threads: regexec on one regex_t from several threads is safe (glibc locks the
pattern's DFA). ctypes calls no Python back, so it needs none of the thread-state
juggling that breaks C extensions in pymilter's threads. Short subjects are matched
with the GIL held (a call takes about a microsecond: releasing and taking the GIL
for it would cost more, and two busy threads would hand it back and forth); long
subjects and patterns with back references (glibc may do real work there) are
matched with the GIL released so other connections go on.

The regex_t is an opaque 64-byte buffer (sizeof(regex_t) with 64-bit glibc, checked
by a unit test with the C compiler); regfree() runs when the compiled pattern is
dropped, e.g. when a reload replaces the tables.
"""

from __future__ import annotations

import ctypes
import re
import sys
import weakref
from dataclasses import dataclass

# <regex.h> in glibc.
REG_EXTENDED = 1
REG_ICASE = 2
REG_NEWLINE = 4
REG_NOSUB = 8
REG_NOMATCH = 1
REGEX_T_SIZE = 64  # sizeof(regex_t), 64-bit glibc
RE_NSUB_OFFSET = 48  # offsetof(regex_t, re_nsub)
_ERRBUF = 256  # dict_regexp_regerror()'s buffer: longer texts are cut there too

# Subjects up to this many bytes are matched with the GIL held (see above).
HELD_LENGTH = 4096

# <locale.h>: every category but LC_ALL (6); LC_COLLATE matters for ranges a-z.
_LC_ALL_MASK = sum(1 << category for category in range(13) if category != 6)
# A back reference (\1 .. \9), in extended or basic syntax.
_BACKREF = re.compile(rb"\\[1-9]")


class PosixError(ValueError):
    """regcomp() refused the pattern; the text is glibc's regerror()."""


class RegMatch(ctypes.Structure):
    """regmatch_t: byte offsets, -1 for a group that took no part."""

    _fields_ = [("rm_so", ctypes.c_int), ("rm_eo", ctypes.c_int)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.regcomp.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.regcomp.restype = ctypes.c_int
    lib.regexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_int]
    lib.regexec.restype = ctypes.c_int
    lib.regerror.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.regerror.restype = ctypes.c_size_t
    lib.regfree.argtypes = [ctypes.c_void_p]
    lib.regfree.restype = None
    lib.uselocale.argtypes = [ctypes.c_void_p]
    lib.uselocale.restype = ctypes.c_void_p
    lib.newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    lib.newlocale.restype = ctypes.c_void_p
    return lib


@dataclass(frozen=True)
class _Libc:
    """The C library twice: calls that release the GIL and calls that keep it, and
    the two locales patterns run in. Made once at import, never changed."""

    released: ctypes.CDLL
    held: ctypes.CDLL
    c_locale: int
    utf8_locale: int


def _open() -> _Libc:
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise ImportError("regexp: tables need 64-bit Linux with glibc (regcomp/regexec)")
    released = _bind(ctypes.CDLL("libc.so.6"))
    held = _bind(ctypes.PyDLL("libc.so.6"))
    c_locale = released.newlocale(_LC_ALL_MASK, b"C", None)
    utf8_locale = released.newlocale(_LC_ALL_MASK, b"C.UTF-8", None)
    if not c_locale or not utf8_locale:
        raise ImportError("newlocale(C / C.UTF-8) failed")
    return _Libc(released, held, c_locale, utf8_locale)


_LIBC = _open()


def _regfree(buffer: ctypes.Array[ctypes.c_char]) -> None:
    _LIBC.released.regfree(buffer)


class PosixRegex:
    """One compiled pattern. Immutable once made, so threads share it."""

    def __init__(self, source: bytes, flags: int, *, utf8: bool = False,
                 nmatch: int = 0) -> None:
        self.source = source
        self.flags = flags
        self.utf8 = utf8
        # The regmatch_t slots each search hands regexec(), as dict_regexp.c does:
        # 1 + the largest $N of the rule's result, 0 without one (it then compiles
        # with REG_NOSUB too). glibc's answer can depend on it with back
        # references: `((b\>#)\.b:\2Ab)+a` finds `B#.b:B#abb#.b:b#ABA` with 0 or 2
        # slots but not with 3.
        self.nmatch = nmatch
        self._locale = _LIBC.utf8_locale if utf8 else _LIBC.c_locale
        self._encoding = "utf-8" if utf8 else "latin-1"
        buffer = ctypes.create_string_buffer(REGEX_T_SIZE)
        lib = _LIBC.held
        previous = lib.uselocale(self._locale)
        try:
            error = lib.regcomp(buffer, source, flags)
        finally:
            lib.uselocale(previous)
        if error:
            text = ctypes.create_string_buffer(_ERRBUF)
            lib.regerror(error, buffer, text, _ERRBUF)
            # glibc frees what a failed regcomp() allocated.
            raise PosixError(text.value.decode("latin-1"))
        self._buffer = buffer
        # regfree() when this object goes (a reload drops the old tables).
        self._finalizer = weakref.finalize(self, _regfree, buffer)
        self.groups = ctypes.c_size_t.from_buffer(buffer, RE_NSUB_OFFSET).value
        self._backrefs = bool(_BACKREF.search(source))

    def with_flags(self, flags: int) -> PosixRegex:
        """The same source compiled with other flags."""
        return PosixRegex(self.source, flags, utf8=self.utf8)

    def freed(self) -> bool:
        return not self._finalizer.alive

    def _exec(self, subject: bytes, nmatch: int, spans: ctypes.Array[RegMatch] | None) -> bool:
        lib = _LIBC.held if len(subject) <= HELD_LENGTH and not self._backrefs \
            else _LIBC.released
        # regexec() reads the thread's locale too (toupper() for REG_ICASE, mbrtowc()
        # for UTF-8), not only what regcomp() stored.
        previous = lib.uselocale(self._locale)
        try:
            error = lib.regexec(self._buffer, subject, nmatch, spans, 0)
        finally:
            lib.uselocale(previous)
        if error and error != REG_NOMATCH:
            raise PosixError(f"regexec() failed with error {error}")  # REG_ESPACE
        return not error

    def search(self, subject: str) -> PosixMatch | None:
        """Match `subject` (a str in the table's text mode) as regexec() does.

        Like Postfix, with `nmatch` slots for the groups: the spans a $N takes come
        from this same call. Without slots PosixMatch.group() asks again for the
        groups on first use.
        """
        data = subject.encode(self._encoding, "surrogateescape")
        if not self.nmatch:
            if not self._exec(data, 0, None):
                return None
            return PosixMatch(self, data)
        spans = (RegMatch * self.nmatch)()
        if not self._exec(data, self.nmatch, spans):
            return None
        match = PosixMatch(self, data)
        match._spans = tuple((m.rm_so, m.rm_eo) for m in spans)
        return match

    def spans(self, data: bytes) -> tuple[tuple[int, int], ...]:
        """Byte offsets of the whole match and of each group; (-1, -1) for a group
        that took no part."""
        n = self.groups + 1
        spans = (RegMatch * n)()
        if not self._exec(data, n, spans):
            return ()
        return tuple((m.rm_so, m.rm_eo) for m in spans)

    def decode(self, data: bytes) -> str:
        return data.decode(self._encoding, "surrogateescape")


class PosixMatch:
    """A match: the groups' text fetched on first use (see PosixRegex.search).

    Made per lookup and used by the thread that made it.
    """

    __slots__ = ("_data", "_regex", "_spans")

    def __init__(self, regex: PosixRegex, data: bytes) -> None:
        self._regex = regex
        self._data = data
        self._spans: tuple[tuple[int, int], ...] | None = None

    def span(self, index: int = 0) -> tuple[int, int]:
        """Byte offsets of group `index` in the encoded subject."""
        if self._spans is None:
            self._spans = self._regex.spans(self._data)
        return self._spans[index] if index < len(self._spans) else (-1, -1)

    def group(self, index: int = 0) -> str | None:
        start, end = self.span(index)
        if start < 0:
            return None
        return self._regex.decode(self._data[start:end])


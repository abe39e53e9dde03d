"""The glibc engine of regexp: tables (posix.py): regcomp/regexec as Postfix calls them."""

from __future__ import annotations

import gc
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milters.checks.actions import Context
from milters.checks.posix import (
    RE_NSUB_OFFSET,
    REG_EXTENDED,
    REG_ICASE,
    REG_NEWLINE,
    REGEX_T_SIZE,
    PosixError,
    PosixRegex,
)
from milters.checks.tables import UNLIMITED, Maps, TextMode, parse_table

ERE = REG_EXTENDED | REG_ICASE  # dict_regexp.c's default options


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler")
def test_regex_t_layout_is_what_the_binding_assumes(tmp_path: Path) -> None:
    src = tmp_path / "layout.c"
    src.write_text("#include <regex.h>\n#include <stdio.h>\n#include <stddef.h>\n"
                   "int main(void){printf(\"%zu %zu %zu %d %d %d\", sizeof(regex_t), "
                   "offsetof(regex_t, re_nsub), sizeof(regmatch_t), REG_EXTENDED, "
                   "REG_ICASE, REG_NEWLINE); return 0;}\n")
    subprocess.run(["gcc", str(src), "-o", str(tmp_path / "layout")], check=True, timeout=60)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert [int(x) for x in out] == [REGEX_T_SIZE, RE_NSUB_OFFSET, 8, REG_EXTENDED,
                                     REG_ICASE, REG_NEWLINE]


def test_leftmost_longest_and_groups() -> None:
    m = PosixRegex(b"(a|ab)(c|bcd)", ERE).search("abcd")
    assert m is not None and (m.group(0), m.group(1), m.group(2)) == ("abcd", "a", "bcd")
    m = PosixRegex(b"x(a|ab)", ERE).search("xabc")
    assert m is not None and m.group(1) == "ab"  # Python's re says "a"
    m = PosixRegex(b"(a)|(b)", ERE).search("b")
    assert m is not None and m.group(1) is None and m.group(2) == "b"
    assert PosixRegex(b"(a)(b)?", ERE).groups == 2


def test_regerror_texts() -> None:
    with pytest.raises(PosixError, match=r"Unmatched \( or \\\("):
        PosixRegex(b"(", ERE)
    with pytest.raises(PosixError, match="Invalid preceding regular expression"):
        PosixRegex(b"(?i)a", ERE)


def test_bytes_in_the_c_locale() -> None:
    # Case folding and classes are ASCII only, one byte is one character.
    r = PosixRegex("^.é[[:alpha:]]$".encode("latin-1"), ERE)
    assert r.search("xéa") is not None
    assert r.search("xÉa") is None and r.search("xéé") is None
    assert PosixRegex(b"^...$", ERE).search("日".encode().decode("latin-1")) is not None


def test_utf8_for_decoded_text() -> None:
    r = PosixRegex("^.é$".encode(), ERE, utf8=True)
    assert r.search("日é") is not None
    assert r.search("日É") is not None  # REG_ICASE folds é/É in a UTF-8 locale
    m = PosixRegex("(日+)本".encode(), ERE, utf8=True).search("x日日本")
    assert m is not None and m.group(1) == "日日"


def test_catastrophic_pattern_is_linear() -> None:
    r = PosixRegex(b"^Subject: (a+)+$", ERE)
    subject = "Subject: " + "a" * 100_000 + "b"
    assert r.search(subject) is None
    m = r.search(subject[:-1])
    assert m is not None and m.span(1) == (9, 100_009)


def test_newline_flag() -> None:
    assert PosixRegex(b"a.b", ERE).search("a\nb") is not None
    assert PosixRegex(b"a.b", ERE | REG_NEWLINE).search("a\nb") is None
    assert PosixRegex(b"^b", ERE | REG_NEWLINE).search("a\nb") is not None


def test_compiled_patterns_are_freed_when_dropped(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("/^Subject: a(b|c)/ REJECT\n/x{2,3}/ WARN\n")
    table = parse_table(path.read_bytes(), f"regexp:{path}", str(path), "regexp",
                        TextMode.BYTES, context=Context.CONTENT)
    maps = Maps("header_checks", (table,))
    compiled = [p.posix for p in table.all_patterns() if p.posix is not None]
    assert len(compiled) == 2 and not any(c.freed() for c in compiled)
    watched = [c._finalizer for c in compiled]
    del table, maps, compiled
    gc.collect()
    assert not any(f.alive for f in watched)  # regfree() ran (a reload drops the tables)


def test_many_threads_match_one_table_concurrently() -> None:
    """regexec() on shared patterns from many threads (libmilter's pool): every answer
    the same as when matched alone, long subjects (GIL released) and short ones mixed."""
    text = ("/^Subject: (a|ab)(c|bcd)(.*)$/ REPLACE Subject: $1-$2-$3\n"
            "/(x+x+)+y/ REJECT nested\n/([[:digit:]]{3})-\\1/ WARN repeated $1\n"
            "/^Subject: (.*)$/ INFO other $1\n")
    table = parse_table(text.encode(), "regexp:t", "t", "regexp", TextMode.BYTES,
                        context=Context.CONTENT)
    subjects = ["Subject: abcd tail", "Subject: " + "x" * 5000, "Subject: " + "x" * 20 + "y",
                "Subject: 123-123", "Subject: 123-124", "Subject: " + "ab" * 3000 + "cd",
                "Subject: é" * 10]
    expected = [(h.rule.source, h.text) if (h := table.lookup(s)) else None for s in subjects]
    assert expected[0] == ("t:1", "Subject: a-bcd- tail")
    errors: list[str] = []

    def work(offset: int) -> None:
        for i in range(60):
            k = (i + offset) % len(subjects)
            h = table.lookup(subjects[k])
            got = (h.rule.source, h.text) if h else None
            if got != expected[k]:
                errors.append(f"{subjects[k][:30]}: {got} != {expected[k]}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert not any(t.is_alive() for t in threads)


GUARDED = ["/^Subject:.*(viagra|casino bonus)/", "/^(To|Cc):[[:space:]]*x/", "/free  *offer/",
           "/^X-Kind: [[:alpha:]]+$/", "/sIgNaL/i", "/^i(s|ſ)k/", "/é+t/",
           "/[[:alpha:]]+[[:digit:]]/", "/(ab+)-\\1/", "/x{2,3}y/", "/[]a]+b/", "/^.é/",
           "/[^a-z ]{2}$/", "/\\<in[[:punct:]]/", "/[[:upper:]][[:lower:]]/i"]
SUBJECT_TEXT = "SubjectToCcXKind:-viagrcsinobonuxfrofe ıſKéÉtİ\t]12"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=SUBJECT_TEXT, max_size=40), st.sampled_from(list(TextMode)))
def test_tests_in_front_of_glibc_never_say_no_where_glibc_says_yes(subject: str,
                                                                   mode: TextMode) -> None:
    """The re tests in front of glibc (prefixes, needles, the translation itself) only
    rule out lines glibc would not match either, in the C locale and in C.UTF-8
    (ı, ſ, K, İ included)."""
    text = "".join(f"{p} WARN {i}\n" for i, p in enumerate(GUARDED))
    table = parse_table(text.encode(), "regexp:t", "t", "regexp", mode, context=Context.CONTENT)
    assert not table.warnings
    line = mode.from_str(subject)
    patterns = list(table.all_patterns())
    assert sum(p.guard is not None for p in patterns) >= 5
    assert sum(p.free_length >= 40 for p in patterns) >= 10
    for pattern in patterns:
        assert pattern.posix is not None
        alone = pattern.posix.search(line) is not None
        assert (pattern.search(line, UNLIMITED) is not None) == alone, (pattern.posix.source,
                                                                        subject)

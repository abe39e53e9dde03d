"""The bounded RFC 5322 address reader (milters/core/addresses.py): fixed cases, the
bounds, and properties (hypothesis): no text makes it raise, well-formed address
lists give their addresses, and it agrees with email.utils.getaddresses wherever
that one copes."""

from __future__ import annotations

import email.utils
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milters.core.addresses import (
    MAX_ADDRESSES,
    MAX_CHARS,
    MAX_COMMENT_DEPTH,
    AddressList,
    parse_address_list,
    salvage_domains,
)


def addresses(text: str) -> list[str]:
    parsed = parse_address_list(text)
    assert parsed.ok, parsed.error
    return [m.address for m in parsed.mailboxes]


@pytest.mark.parametrize(("text", "expected"), [
    ("a@b.example", ["a@b.example"]),
    ('Joe <joe@x.example>, "A, B" <a@y.example>', ["joe@x.example", "a@y.example"]),
    ("G: a@b.example, c@d.example;, z@q.example",  # RFC 5322 §3.4 group
     ["a@b.example", "c@d.example", "z@q.example"]),
    ("undisclosed-recipients:;", []),
    ("<@r1.example,@r2.example:u@v.example>", ["u@v.example"]),  # §4.4 obs-route
    ("(c) a . b @ (x) example . com", ["a.b@example.com"]),  # §4.4 CFWS around dots
    (", , a@b.example,", ["a@b.example"]),  # §4.4 obs-mbox-list empty elements
    ('"q\\"x"@d.example', ['"q\\"x"@d.example']),
    ("x@[192.0.2.1]", ["x@[192.0.2.1]"]),
    ("=?utf-8?q?J=C3=B6?= <j@k.example>", ["j@k.example"]),  # RFC 2047 left as is
    ("u@bücher.example", ["u@bücher.example"]),  # RFC 6532
    ("A (a (nested (comment))) <a@b.example>", ["a@b.example"]),
    ("a\r\n\t<a@folded.example>", ["a@folded.example"]),
])
def test_fixed_cases(text: str, expected: list[str]) -> None:
    assert addresses(text) == expected


@pytest.mark.parametrize("text", [
    "alice", "a@", "@b.example", "<>", "<a@b.example", "a@b.example>", '"open <a@b.example>',
    "(open a@b.example", "a@b.example)", "G: a@b.example", "a@b.example c@d.example",
    "a\x00@b.example", "x@[1.2.3.4", "a\\b@c.example",
])
def test_malformed_is_unparseable(text: str) -> None:
    parsed = parse_address_list(text)
    assert not parsed.ok and parsed.mailboxes == () and parsed.error


def test_bounds_give_a_defined_answer_fast() -> None:
    """Issue 9: ~1,000 nested comments raised RecursionError in email.utils."""
    deep = "(" * 1000 + "x" + ")" * 1000 + " <ceo@bank.example>"
    with pytest.raises(RecursionError):
        email.utils.getaddresses([deep])  # what the filters used before
    start = time.monotonic()
    for text, why in (
        (deep, "nested deeper"),
        ("(" * (MAX_COMMENT_DEPTH + 1) + ")" * (MAX_COMMENT_DEPTH + 1) + "a@b.example",
         "nested deeper"),
        ("a@b.example (" + "x" * MAX_CHARS + ")", "longer than"),
        (", ".join(f"u{i}@b.example" for i in range(MAX_ADDRESSES + 1)), "more than"),
        ("a@" + "b" * 600 + ".example", "too long"),
    ):
        parsed = parse_address_list(text)
        assert not parsed.ok and why in parsed.error
    ok = "(" * MAX_COMMENT_DEPTH + ")" * MAX_COMMENT_DEPTH + "a@b.example"
    assert addresses(ok) == ["a@b.example"]
    assert time.monotonic() - start < 5  # generous: about a few ms here
    assert salvage_domains(deep, 10) == ("bank.example",)


def test_salvage() -> None:
    text = '((((x@Evil.Example)))) <ceo@bank.example> "junk @ not a domain'
    assert salvage_domains(text, 10) == ("evil.example", "bank.example")
    assert salvage_domains(text, 1) == ("evil.example",)
    assert salvage_domains("no at sign", 10) == ()


# -- properties ----------------------------------------------------------------------

ANY_TEXT = st.text(alphabet=st.characters(codec=None), max_size=400)
# Text made of the characters the grammar cares about: finds structural corner cases
# that random Unicode rarely reaches.
GRAMMAR_SOUP = st.text(alphabet='()<>[]:;@\\,."a b\r\n\t\udcff=?', max_size=200)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(ANY_TEXT, GRAMMAR_SOUP))
def test_never_raises(text: str) -> None:
    parsed = parse_address_list(text)
    assert isinstance(parsed, AddressList)
    assert parsed.ok or not parsed.mailboxes
    assert isinstance(salvage_domains(text, 5), tuple)


ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=2, max_size=4).map(".".join)
local = st.lists(atom, min_size=1, max_size=3).map(".".join)
comment_text = st.text(alphabet="abc xyz,;:<>@", max_size=10)


@st.composite
def comment(draw: st.DrawFn) -> str:
    """A comment, nested up to three deep, with quoted-pairs."""
    depth = draw(st.integers(0, 3))
    inner = draw(comment_text).replace("\\", "")
    for _ in range(depth):
        inner = f"{draw(comment_text)}({inner}){draw(comment_text)}"
    return f"({inner}\\))"


@st.composite
def mailbox(draw: st.DrawFn) -> tuple[str, str]:
    """(text, address): addr-spec or name-addr, with optional comments around."""
    address = f"{draw(local)}@{draw(domain)}"
    kind = draw(st.sampled_from(["bare", "angle", "words", "quoted"]))
    cfws = draw(st.sampled_from(["", " ", " (c) "]))
    if kind == "bare":
        text = address
    elif kind == "angle":
        text = f"<{address}>"
    elif kind == "words":
        text = " ".join(draw(st.lists(atom, min_size=1, max_size=3))) + f" <{address}>"
    else:
        name = draw(st.text(alphabet='abc ,;:<>@()."\\', max_size=12))
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        text = f"{quoted} <{address}>"
    if draw(st.booleans()):
        text = f"{text} {draw(comment())}"
    return f"{cfws}{text}{cfws}", address


@st.composite
def address_list(draw: st.DrawFn) -> tuple[str, list[str], bool]:
    """(field body, its addresses, whether it has a group)."""
    boxes = draw(st.lists(mailbox(), min_size=1, max_size=5))
    texts = [t for t, _ in boxes]
    expected = [a for _, a in boxes]
    group = draw(st.booleans())
    if group:
        cut = draw(st.integers(0, len(texts)))
        name = draw(atom)
        texts = [*texts[:cut], f"{name}: {', '.join(texts[cut:])};"]
    return ", ".join(texts), expected, group


@settings(max_examples=400)
@given(address_list())
def test_well_formed_lists_give_their_addresses(case: tuple[str, list[str], bool]) -> None:
    text, expected, _group = case
    assert addresses(text) == expected


@settings(max_examples=300)
@given(address_list())
def test_agrees_with_getaddresses(case: tuple[str, list[str], bool]) -> None:
    """email.utils.getaddresses on the inputs it handles."""
    text, expected, _group = case
    theirs = [a for _, a in email.utils.getaddresses([text]) if a]
    assert addresses(text) == theirs == expected


# -- the fast path for the common shapes (addresses._simple) --------------------------

def general_reader(text: str) -> AddressList:
    from milters.core.addresses import _read

    return _read(text)


@pytest.mark.parametrize("text", [
    "a@b.example", " Joe Q Public <joe.q@x.example>", "<a@b.example>\r\n",
    "Joe\r\n\t<joe@x.example>", "a.b.c@d-e.example", "x <y@z.example> ",
])
def test_fast_path_takes_the_common_shapes(text: str) -> None:
    from milters.core.addresses import _simple

    fast = _simple(text)
    assert fast is not None
    assert fast == general_reader(text)


@pytest.mark.parametrize("text", [
    "a@b.example (comment)", '"Q" <a@b.example>', "a..b@c.example", "a@b.example.",
    "J. Doe <a@b.example>", "a@[192.0.2.1]", "a@b.example, c@d.example", "é <a@b.example>",
    "<@r.example:a@b.example>", "x" * 129 + "@b.example",
])
def test_fast_path_leaves_the_rest_to_the_reader(text: str) -> None:
    from milters.core.addresses import _simple

    assert _simple(text) is None


@settings(max_examples=500)
@given(st.one_of(GRAMMAR_SOUP, mailbox().map(lambda m: m[0]),
                 st.text(alphabet=ATEXT[:12] + " <>@.\t\r\n", max_size=60)))
def test_fast_path_agrees_with_the_general_reader(text: str) -> None:
    """Whatever the fast path reads, the general reader reads the same way."""
    from milters.core.addresses import _simple

    fast = _simple(text)
    if fast is not None:
        assert fast == general_reader(text)

"""Differential test: the same tables and messages through Postfix 3.7's own
header_checks/body_checks and through the checks filter (decode = false) behind a
Postfix with no checks of its own.

Every case puts its rules, keyed by a token of its own (`tk017`), into one regexp:
and one pcre: table set, so a whole corpus runs in four Postfix passes:
Postfix-regexp, Postfix-pcre, filter-regexp, filter-pcre. Per case we compare the
SMTP answer at end of DATA, every delivered copy (recipient, header fields, body),
and what sits in the hold or deferred queue. Per table we compare the lines
Postfix warns about at load (`postmap -q`) with the filter's load warnings.

A case whose outcome differs by necessity names its entry in the README's
"Differences from Postfix" section (`known=`); the test checks that the entry
exists and that the outcomes do differ (so a stale entry is noticed). The POSIX
cases check that regexp: tables match as glibc's regexec does (leftmost-longest
captures, bracket expressions, back references, no backtracking blow-up).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from milters.checks.actions import Context
from milters.checks.tables import TextMode, parse_table
from tests.e2e.postfix import IN_FLIGHT, PostfixInstance, SendResult
from tests.support.processes import ProcessFactory, add_socket_to_config, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
KINDS = ("regexp", "pcre")
POSTMAP = Path("/usr/sbin/postmap")


@dataclass(frozen=True)
class Case:
    """One message and the rules aimed at it; `{T}` stands for the case's token."""

    name: str
    header_rules: tuple[str, ...] = ()
    body_rules: tuple[str, ...] = ()
    subject: str = "{T} hello"
    headers: tuple[str, ...] = ()
    body: str = "plain line {T}\r\n"
    kinds: tuple[str, ...] = KINDS
    known: str = ""  # the README "Differences from Postfix" entry that explains it
    known_field: str = ""  # a header field that differs for the reason `known` gives


def _cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    S = "/^Subject: {T}"
    # --- every action, with and without text, $1, case-insensitive words --------
    add(Case("reject-plain", (S + "/ REJECT",)))
    add(Case("reject-text", (S + "/ REJECT 5.7.0 go away",)))
    add(Case("reject-4xx", (S + "/ REJECT 4.7.1 try later",)))
    add(Case("reject-2xx-bad-dsn", (S + "/ REJECT 2.0.0 fine",)))
    add(Case("reject-lowercase", (S + "/ reject no thanks",)))
    add(Case("reject-mixedcase", (S + "/ ReJeCt mixed",)))
    add(Case("reject-dollar1", (S + " (\\w+)/ REJECT word $1 refused",),
             subject="{T} spammy"))
    add(Case("reject-dollar-braces", (S + " (\\w+)/ REJECT ${1} and $(1) and $$",),
             subject="{T} twice"))
    add(Case("discard", (S + "/ DISCARD",)))
    add(Case("discard-text", (S + "/ discard gone",)))
    add(Case("hold", (S + "/ HOLD",)))
    add(Case("hold-text", (S + "/ HOLD held for review",)))
    add(Case("ignore", ("/^X-Drop: {T}/ IGNORE",), headers=("X-Drop: {T} x",)))
    add(Case("strip", ("/^X-Drop: {T}/ STRIP",), headers=("X-Drop: {T} x",)))
    add(Case("strip-lowercase", ("/^X-Drop: {T}/ strip with text",),
             headers=("X-Drop: {T} x",)))
    add(Case("prepend", (S + " (\\w+)/ PREPEND X-Added: seen $1",), subject="{T} word"))
    add(Case("prepend-not-a-header", (S + "/ PREPEND not a header",)))
    add(Case("prepend-no-text", (S + "/ PREPEND",)))
    add(Case("replace", (S + " (.*)/ REPLACE Subject: [tagged] $1",)))
    add(Case("replace-other-name", (S + "/ REPLACE X-Was-Subject: yes",)))
    add(Case("replace-not-a-header", (S + "/ REPLACE no colon here",)))
    add(Case("replace-no-text", (S + "/ REPLACE",)))
    add(Case("warn", (S + "/ WARN looked at $$5",)))
    add(Case("info", (S + "/ INFO noted",)))
    add(Case("dunno-shields", (S + "/ DUNNO", S + "/ REJECT")))
    add(Case("ok-shields", (S + "/ OK whatever", S + "/ REJECT")))
    add(Case("pass-stops-body", (S + "/ PASS",), ("/{T} body/ REJECT",),
             body="a {T} body line\r\n"))
    add(Case("redirect", (S + "/ REDIRECT redir-{T}@test.example",),
             known="X-Original-To", known_field="X-Original-To"))
    add(Case("redirect-no-at", (S + "/ REDIRECT nobody",)))
    add(Case("bcc", (S + "/ BCC bcc-{T}@test.example",)))
    add(Case("bcc-then-redirect", ("/^X-Bcc: {T}/ BCC bcc-{T}@test.example",
                                   S + "/ REDIRECT redir-{T}@test.example"),
             headers=("X-Bcc: {T}",), known="X-Original-To", known_field="X-Original-To"))
    add(Case("hold-then-reject", ("/^X-Hold: {T}/ HOLD", S + "/ REJECT"),
             headers=("X-Hold: {T}",)))
    add(Case("hold-then-discard", ("/^X-Hold: {T}/ HOLD", S + "/ DISCARD"),
             headers=("X-Hold: {T}",)))
    add(Case("two-edits", ("/^X-One: {T}/ IGNORE", S + " (.*)/ REPLACE Subject: new $1"),
             headers=("X-One: {T}",)))
    # --- what Postfix 3.7 header/body checks do not know -------------------------
    add(Case("defer", (S + "/ DEFER later",)))
    add(Case("defer-shields-later-reject", (S + "/ DEFER later", S + "/ REJECT")))
    add(Case("code-554", (S + "/ 554 5.7.1 no",)))
    add(Case("code-451", (S + "/ 451 4.7.1 later",)))
    add(Case("frobnicate", (S + "/ FROBNICATE", S + "/ REJECT")))
    add(Case("empty-action", (S + "/", S + "/ REJECT")))
    add(Case("filter-bad-arg", (S + "/ FILTER nocolon",)))
    add(Case("filter", (S + "/ FILTER smtp:[127.0.0.1]:9",), known="FILTER"))
    add(Case("return-path", ("/^Return-Path: <?{T}/ REJECT return path",),
             headers=("Return-Path: <{T}@sender.example>",), known="Return-Path"))
    add(Case("received-by-postfix", ("/^Received: .*for <r{T}@/ REJECT own received",),
             known="Received"))
    # --- lines Postfix skips with a warning: the next rule gets its turn ---------
    add(Case("lone-dollar", (S + "/ REJECT costs 5 $ only", S + "/ WARN after")))
    add(Case("dollar-name", (S + "/ REJECT $foo", S + "/ REJECT 5.7.0 second rule")))
    add(Case("dollar-out-of-range", (S + " (x)?/ REJECT $2", S + "/ HOLD")))
    add(Case("dollar-zero", (S + "/ REJECT $0", S + "/ DISCARD")))
    add(Case("negated-dollar", ("if /^Subject: {T}/", "!/zzz(a)/ REJECT $1", "/./ HOLD",
                                "endif")))
    add(Case("unclosed-brace", (S + "/ REJECT ${1", S + "/ DISCARD")))
    add(Case("unknown-flag", (S + "/q REJECT", S + "/ HOLD")))
    add(Case("no-closing-delimiter", (S + " REJECT", S + "/ DISCARD")))
    add(Case("bad-regex", (S + " (unclosed/ REJECT", S + "/ HOLD")))
    add(Case("unrecognized-request", ("FOO {T}", S + "/ DISCARD")))
    add(Case("endif-without-if", ("endif", S + "/ HOLD")))
    add(Case("if-extra-text", ("if /^Subject: {T}/ junk", "/hello/ REJECT", "endif")))
    add(Case("endif-extra-text", ("if /^Subject: {T}/", "/hello/ DISCARD", "endif junk")))
    # --- matching: folding, if/endif, negation, flags ------------------------------
    add(Case("folded-cross", (S + " a\\s+b/ REJECT folded",), subject="{T} a\r\n b"))
    add(Case("folded-dot", (S + " a.b/ REJECT dot crosses",), subject="{T} a\r\n\tb"))
    add(Case("folded-space-no-match", (S + " a b/ REJECT", S + "/ WARN"),
             subject="{T} a\r\n b"))
    add(Case("folded-replace", (S + " (.*)/ REPLACE Subject: [f] $1",),
             subject="{T} one\r\n two"))
    add(Case("if-block", ("if /^Subject: {T}/", "/money/ REJECT no money", "endif"),
             subject="{T} money"))
    add(Case("if-block-miss", ("if /^Subject: {T}/", "/money/ REJECT", "endif",
                               "/^X-After: {T}/ HOLD"), headers=("X-After: {T}",)))
    add(Case("if-negated", ("if !/^Subject: {T} ok/", "if /^Subject: {T}/", "/./ DISCARD",
                            "endif", "endif"), subject="{T} not-ok"))
    add(Case("if-nested", ("if /^Subject: {T}/", "if /deep/", "/x/ REJECT nested", "endif",
                           "endif"), subject="{T} deep x"))
    add(Case("negated-rule", ("if /^Subject: {T}/", "!/good/ REJECT not good", "endif"),
             subject="{T} bad"))
    add(Case("double-negation", ("!!/^Subject: {T}/ REJECT double",)))
    add(Case("negation-space", ("if /^Subject: {T}/", "! /^Subject: {T} x/ WARN",
                                "endif", S + "/ REJECT")))
    add(Case("case-insensitive-default", ("/^subject: {T} HELLO/ REJECT",)))
    add(Case("i-flag-case-sensitive", ("/^subject: {T}/i REJECT", S + "/ HOLD")))
    add(Case("ii-flag", ("/^subject: {T}/ii REJECT",)))
    add(Case("other-delimiter", ("|^Subject: {T} a/b| REJECT pipe",), subject="{T} a/b"))
    add(Case("escaped-delimiter", ("/^Subject: {T} a\\/b/ REJECT slash",),
             subject="{T} a/b"))
    add(Case("m-flag", (S + " a$/m REJECT line end",), subject="{T} a\r\n b"))
    add(Case("no-m-flag-dollar", (S + " a$/ REJECT", S + "/ WARN"), subject="{T} a\r\n b"))
    add(Case("x-flag-basic", (S + " \\(ab\\)\\{2\\}/x REJECT basic",), subject="{T} abab",
             kinds=("regexp",)))
    add(Case("second-pattern", (S + "/!/spam/ REJECT not spam",), kinds=("regexp",)))
    add(Case("second-pattern-excludes", (S + "/!/spam/ REJECT", S + "/ HOLD"),
             subject="{T} spam", kinds=("regexp",)))
    add(Case("posix-class", (S + " [[:digit:]]+$/ REJECT digits",), subject="{T} 12345"))
    add(Case("pcre-s-flag", (S + " a.b/s REJECT", S + "/ HOLD"), subject="{T} a\r\n b",
             kinds=("pcre",)))
    add(Case("pcre-A-flag", ("/{T}/A REJECT", S + "/ HOLD"), kinds=("pcre",)))
    add(Case("pcre-U-flag", (S + " (a+)/U REPLACE Subject: got $1",), subject="{T} aaa",
             kinds=("pcre",)))
    add(Case("pcre-X-flag", (S + " \\y/X REJECT why",), subject="{T} y", kinds=("pcre",)))
    add(Case("pcre-x-flag", (S + " a b # c/x REJECT extended",), subject="{T} ab",
             kinds=("pcre",)))
    add(Case("pcre-digit", (S + " \\d+/ REJECT number",), subject="{T} 42", kinds=("pcre",)))
    add(Case("pcre-lazy", (S + " (a+?)/ REPLACE Subject: lazy $1",), subject="{T} aaa",
             kinds=("pcre",)))
    # --- body rules ---------------------------------------------------------------
    add(Case("body-reject", (), ("/^bad {T}/ REJECT body refused",), body="bad {T} line\r\n"))
    add(Case("body-discard", (), ("/{T} discard/ DISCARD",), body="x {T} discard\r\n"))
    add(Case("body-hold", (), ("/{T} hold/ HOLD",), body="x {T} hold\r\n"))
    add(Case("body-ignore", (), ("/^drop {T}/ IGNORE",),
             body="keep\r\ndrop {T}\r\nkeep too\r\n"))
    add(Case("body-replace", (), ("/^(.*) {T} (.*)$/ REPLACE [$2] [$1]",),
             body="left {T} right\r\nother\r\n"))
    add(Case("body-prepend", (), ("/^second {T}/ PREPEND inserted line",),
             body="first\r\nsecond {T}\r\n"))
    add(Case("body-warn", (), ("/{T}/ WARN body seen",)))
    add(Case("body-defer-unknown", (), ("/{T}/ DEFER nope", "/{T}/ REJECT")))
    add(Case("body-strip", (), ("/^drop {T}/ STRIP",), body="drop {T}\r\nkeep\r\n"))
    add(Case("body-header-like-line", (), ("/^X-Fake: {T}/ REJECT fake",),
             body="X-Fake: {T}\r\n"))
    add(Case("header-and-body", (S + "/ HOLD",), ("/{T}/ REJECT both",)))
    # --- the pattern engine: PCRE constructs (translated with PCRE's scoping) and
    # POSIX as glibc reads and matches it --------------------------------------------
    add(Case("pcre-inline-flag-mid", ("/^X-Inline: {T} (?-i)EXACT$/ REJECT inline",),
             headers=("X-Inline: {T} exact",), kinds=("pcre",)))
    add(Case("pcre-inline-flag-hit", ("/^X-Inline: {T} (?-i)EXACT$/ REJECT inline",),
             headers=("X-Inline: {T} EXACT",), kinds=("pcre",)))
    add(Case("pcre-quote", ("/^Subject: {T} \\Qa.b*\\E$/ REJECT quoted",),
             subject="{T} a.b*", kinds=("pcre",)))
    add(Case("pcre-atomic", ("/^Subject: {T} (?>a+)b/ REJECT atomic",), subject="{T} aab",
             kinds=("pcre",)))
    add(Case("pcre-named", ("/^Subject: {T} (?<w>x)\\k<w>/ REJECT named",),
             subject="{T} xx", kinds=("pcre",)))
    add(Case("posix-leftmost-longest", ("/^Subject: {T} (a|ab)/ REPLACE Subject: [$1]",),
             subject="{T} abc", kinds=("regexp",)))
    add(Case("posix-longest-first-group", ("/^Subject: {T} (a|ab)(bc|c)/ "
                                           "REPLACE Subject: [$1][$2]",),
             subject="{T} abc", kinds=("regexp",)))
    add(Case("posix-backslash-d", ("/^Subject: {T} \\d/ REJECT letter d",),
             subject="{T} d", kinds=("regexp",)))
    add(Case("posix-backslash-d-case", ("/^Subject: {T} \\d/i REJECT letter d",
                                        S + "/ HOLD"), subject="{T} d", kinds=("regexp",)))
    add(Case("posix-class-alpha", (S + " [[:alpha:]]+[[:digit:]]$/ REJECT alpha",),
             subject="{T} abc7", kinds=("regexp",)))
    add(Case("posix-class-alpha-miss", (S + " [[:alpha:]]+$/ REJECT alpha", S + "/ HOLD"),
             subject="{T} ab_c", kinds=("regexp",)))
    add(Case("posix-bracket-close", (S + " []a]+x$/ REJECT bracket",),
             subject="{T} ]a]x", kinds=("regexp",)))
    add(Case("posix-bracket-backslash", (S + " [\\n]+$/ REJECT backslash",),
             subject="{T} \\n\\", kinds=("regexp",)))
    add(Case("posix-backreference", (S + " (ab+)-\\1$/ REPLACE Subject: twice $1",),
             subject="{T} abb-abb", kinds=("regexp",)))
    add(Case("posix-backreference-miss", (S + " (ab+)-\\1$/ REJECT", S + "/ HOLD"),
             subject="{T} abb-ab", kinds=("regexp",)))
    add(Case("posix-interval", (S + " x{2,3}y/ REJECT interval", S + "/ HOLD"),
             subject="{T} xxxxy", kinds=("regexp",)))
    add(Case("posix-interval-miss", (S + " x{2,3}y/ REJECT interval", S + "/ HOLD"),
             subject="{T} xy", kinds=("regexp",)))
    add(Case("posix-longest-replace", (S + " (a|ab)(c|bcd)(d*)$/ "
                                       "REPLACE Subject: [$1][$2][$3]",),
             subject="{T} abcd", kinds=("regexp",)))
    add(Case("posix-longest-star", (S + " (a*)(ab)*b$/ REPLACE Subject: [$1][$2]",),
             subject="{T} aabb", kinds=("regexp",)))
    add(Case("posix-catastrophic", (S + " (a+)+$/ REJECT nested", S + "/ REPLACE Subject: ok"),
             subject="{T} " + "a" * 900 + "b", kinds=("regexp",)))
    add(Case("posix-8bit-one-byte-dot", (S + " caf.$/ REJECT one", S + " caf..$/ HOLD"),
             subject="{T} caf\u00e9", kinds=("regexp",)))
    return c


CASES = _cases()
# Rules of this case are written first (a logical line starting with whitespace is
# only possible at the very start of a file) and last (an IF without ENDIF runs to
# the end of its file), in the main tables.
LEADING = ("  /^Subject: {T}/ REJECT whitespace", "/^Subject: {T}/ WARN kept")
TRAILING = ("if /^Subject: {T}/", "/unterminated/ REJECT open if")
EXTRA_CASES = [
    Case("leading-whitespace-line", (), subject="{T} hello"),
    Case("if-without-endif", (), subject="{T} unterminated"),
]


def token(index: int) -> str:
    return f"tk{index:03d}"


def _numbered() -> list[tuple[int, Case]]:
    return list(enumerate(CASES + EXTRA_CASES))


def _lines(rules: Iterator[str] | tuple[str, ...], tok: str) -> list[str]:
    return [r.replace("{T}", tok) for r in rules]


def write_tables(directory: Path, kind: str) -> dict[str, list[Path]]:
    """The header and body table of one kind, every case in each."""
    head: list[str] = _lines(LEADING, token(len(CASES)))
    body: list[str] = []
    for i, case in enumerate(CASES):
        if kind not in case.kinds:
            continue
        head += [f"# case {case.name}", *_lines(case.header_rules, token(i))]
        body += [f"# case {case.name}", *_lines(case.body_rules, token(i))]
    head += _lines(TRAILING, token(len(CASES) + 1))
    files: dict[str, list[Path]] = {}
    for part, rules in (("header", head), ("body", body)):
        path = directory / f"{part}_checks.{kind}"
        path.write_bytes(("\n".join(rules) + "\n").encode())
        files[part] = [path]
    return files


def message(index: int, case: Case, kind: str) -> bytes:
    tok = token(index)
    lines = [
        f"From: s{tok}@sender.example",
        f"To: r{tok}@test.example",
        f"Subject: {case.subject.replace('{T}', tok)}",
        *_lines(case.headers, tok),
        "Date: Mon, 23 Nov 2026 10:00:00 +0000",
        f"Message-ID: <id-{tok}-{kind}@sender.example>",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + case.body.replace("{T}", tok)).encode()


@dataclass
class Outcome:
    """What happened to one message: comparable between the two runs."""

    answer: str = ""
    delivered: list[tuple[str, tuple[tuple[str, bytes], ...], bytes]] = field(
        default_factory=list)
    queued: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def normal(self, without: str = "") -> tuple[object, ...]:
        """Everything, in a stable order; `without` leaves out one header field."""
        copies = [(to, tuple(f for f in fields if f[0].lower() != without.lower()), body)
                  for to, fields, body in self.delivered]
        return (self.answer, sorted(copies), sorted(self.queued))


# Header fields the delivery path adds on its own (they differ run to run).
_VOLATILE = frozenset({"received", "delivered-to", "return-path"})


def _answer(result: SendResult) -> str:
    if result.data is None:
        return f"no DATA: {result.rcpts} {result.mail}"
    if result.data.code == 250:
        return "250"
    return f"{result.data.code} {result.data.text}"


def run_pass(postfix: PostfixInstance, kind: str, milters: list[str],
             params: dict[str, str]) -> dict[str, Outcome]:
    """Send every case of `kind` through Postfix as configured; collect outcomes."""
    postfix.reset()
    postfix.set_milters(milters, **params)
    outcomes: dict[str, Outcome] = {}
    for i, case in _numbered():
        if kind not in case.kinds:
            continue
        tok = token(i)
        result = postfix.send(f"s{tok}@sender.example", [f"r{tok}@test.example"],
                              message(i, case, kind))
        outcomes[tok] = Outcome(_answer(result))
    assert wait_until(lambda: not any(m.get("queue_name") in IN_FLIGHT
                                      for m in postfix.queue()), 60, interval=0.1)
    for m in postfix.delivered():
        fields = tuple((n, v) for n, v in m.raw_headers if n.lower() not in _VOLATILE)
        mid = m.get("Message-ID") or ""
        tok = re.search(r"id-(tk\d{3})-", mid)
        assert tok, f"delivered message without a case Message-ID: {m.raw!r}"
        outcomes[tok.group(1)].delivered.append((m.delivered_to or "", fields, m.body))
    for q in postfix.queue():
        sender = str(q.get("sender", ""))
        tok = re.match(r"s(tk\d{3})@", sender)
        assert tok, f"queued message from an unknown sender: {q}"
        listed = q.get("recipients")
        rcpts = tuple(str(r.get("address")) for r in listed if isinstance(r, dict)) \
            if isinstance(listed, list) else ()
        outcomes[tok.group(1)].queued.append((str(q.get("queue_name")), rcpts))
    return outcomes


@dataclass
class Runs:
    directory: Path
    tables: dict[str, dict[str, list[Path]]]
    postfix: dict[str, dict[str, Outcome]]
    milter: dict[str, dict[str, Outcome]]
    postfix_config: Path


@pytest.fixture(scope="module")
def runs(postfix_instance: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Runs]:
    types = subprocess.run(["/usr/sbin/postconf", "-c", str(postfix_instance.config_dir),
                            "-m"], capture_output=True, text=True, timeout=60).stdout.split()
    assert "pcre" in types, "Postfix has no pcre: tables: install postfix-pcre " \
        "(packaging/dev/bootstrap.sh does)"
    directory = tmp_path_factory.mktemp("differential")
    directory.chmod(0o755)  # cleanup (user postfix) reads the tables
    for parent in directory.parents:
        if str(parent).startswith("/tmp/pytest-of-"):
            parent.chmod(0o755)
    tables = {}
    for kind in KINDS:
        sub = directory / kind
        sub.mkdir()
        sub.chmod(0o755)
        tables[kind] = write_tables(sub, kind)
    by_postfix: dict[str, dict[str, Outcome]] = {}
    by_milter: dict[str, dict[str, Outcome]] = {}
    with ProcessFactory() as processes:
        for kind in KINDS:
            spec = {part: ", ".join(f"{kind}:{p}" for p in paths)
                    for part, paths in tables[kind].items()}
            by_postfix[kind] = run_pass(postfix_instance, kind, [], {
                "header_checks": spec["header"], "body_checks": spec["body"]})
            toml = ("[checks]\ndecode = false\n"
                    f"header_checks = {[f'{kind}:{p}' for p in tables[kind]['header']]!r}\n"
                    f"body_checks = {[f'{kind}:{p}' for p in tables[kind]['body']]!r}\n"
                    ).replace("'", '"')
            port = free_port()
            config = directory / f"checks-{kind}.toml"
            config.write_text(add_socket_to_config(toml, "checks", f"inet:{port}@127.0.0.1"))
            proc = processes.start([sys.executable, "-m", "milters", "run", "checks",
                                    "--config", str(config)], port, cwd=REPO_ROOT)
            by_milter[kind] = run_pass(postfix_instance, kind,
                                       [f"inet:127.0.0.1:{port}"], {})
            proc.kill()
    postfix_instance.reset()
    postfix_instance.configure()
    yield Runs(directory, tables, by_postfix, by_milter, postfix_instance.config_dir)


def _readme_differences() -> str:
    text = README.read_text()
    start = text.index("### Differences from Postfix")
    end = text.find("\n## ", start)
    return text[start:end if end > 0 else None]


def _params() -> list[object]:
    params: list[object] = []
    for i, case in _numbered():
        for kind in case.kinds:
            params.append(pytest.param(i, kind, id=f"{kind}-{case.name}"))
    return params


def test_corpus_size() -> None:
    assert len(_params()) >= 100


@pytest.mark.parametrize(("index", "kind"), _params())
def test_same_outcome_as_postfix(runs: Runs, index: int, kind: str) -> None:
    case = _numbered()[index][1]
    tok = token(index)
    ours, theirs = runs.milter[kind][tok], runs.postfix[kind][tok]
    if case.known:
        # A difference by necessity: documented, and still there (else drop the entry).
        assert f"**{case.known}**" in _readme_differences(), case.known
        assert ours.normal() != theirs.normal(), f"{case.known}: no longer differs"
        if not case.known_field:
            return
    assert ours.normal(case.known_field) == theirs.normal(case.known_field)


_WHITESPACE_LINE = "logical line must not start with whitespace"
# What Postfix logs when a rule matches (cleanup_act()), not when it loads the table.
_ACTION_LAYER = re.compile(r"unknown command in|FILTER in|action without text|bad REDIRECT|"
                           r"bad BCC|bad DSN action|from a \$ substitution")


def _postfix_warnings(config_dir: Path, kind: str, path: Path) -> tuple[set[int], int]:
    """Lines `postmap -q` warns about while loading, and its whitespace-line count
    (readllines() names the file but no line number)."""
    out = subprocess.run([str(POSTMAP), "-c", str(config_dir), "-q", "probe", f"{kind}:{path}"],
                         capture_output=True, text=True, timeout=60)
    lines = {int(n) for n in re.findall(rf"{kind} map {re.escape(str(path))}, line (\d+):",
                                        out.stderr)}
    return lines, out.stderr.count(_WHITESPACE_LINE)


def _our_warnings(kind: str, path: Path) -> tuple[set[int], int]:
    table = parse_table(path.read_bytes(), f"{kind}:{path}", str(path), kind, TextMode.BYTES,
                        context=Context.CONTENT)
    loader = [w for w in table.warnings if not _ACTION_LAYER.search(w)]
    lines = {int(m.group(1)) for w in loader if _WHITESPACE_LINE not in w
             if (m := re.match(rf"{re.escape(str(path))}:(\d+):", w))}
    return lines, sum(_WHITESPACE_LINE in w for w in loader)


def _warning_params() -> list[object]:
    params: list[object] = []
    for kind in KINDS:
        for part in ("header", "body"):
            params.append(pytest.param(kind, part, 0, id=f"{kind}-{part}"))
    return params


@pytest.mark.parametrize(("kind", "part", "which"), _warning_params())
def test_same_load_warnings_as_postfix(runs: Runs, kind: str, part: str, which: int) -> None:
    """Lines Postfix's table loader warns about are exactly the lines we warn about."""
    path = runs.tables[kind][part][which]
    theirs = _postfix_warnings(runs.postfix_config, kind, path)
    if which == 0 and part == "header":
        assert theirs[0] and theirs[1] == 1, "the main header table has lines Postfix skips"
    assert _our_warnings(kind, path) == theirs

"""The right-hand side of a table rule: the action, its text, and the `$1` template.

Parsed once at load: an unknown action, FILTER, a lone `$` or a `$name` that is not
a group number is a ConfigError naming file:line. Postfix merely logs a warning and
skips such a rule (a rule that silently never fires); refusing it is stricter and
safer. Action words are case-insensitive as in Postfix (header_body_checks.c uses
strncasecmp). References: header_checks(5), access(5), regexp_table(5), pcre_table(5).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from milters.core.verdict import Reply


class Kind(enum.Enum):
    """What a rule asks for. The comments give the header_checks(5)/access(5) meaning."""

    REJECT = "REJECT"  # refuse the message (or the address, at an SMTP stage)
    DEFER = "DEFER"  # temporary refusal; access(5) only, an extension in content checks
    CODE = "CODE"  # "4NN text" / "5NN text"; access(5) only, an extension in content checks
    DISCARD = "DISCARD"  # accept and silently drop; ends checking
    HOLD = "HOLD"  # keep on the hold queue (our quarantine); checking goes on
    WARN = "WARN"  # log only
    INFO = "INFO"  # log only
    IGNORE = "IGNORE"  # delete the line (header, body line)
    PREPEND = "PREPEND"  # insert a line before the matched one (a header at SMTP stages)
    REPLACE = "REPLACE"  # replace the matched line
    REDIRECT = "REDIRECT"  # send to this address instead; ends all header/body checks
    BCC = "BCC"  # add a recipient
    DUNNO = "DUNNO"  # as if nothing matched; no later rule or table sees this line
    OK = "OK"  # same as DUNNO in content checks; "permit" at SMTP stages
    PASS = "PASS"  # skip all further header and body checks for this message


# Actions that end header/body inspection for the message.
TERMINAL = frozenset({Kind.REJECT, Kind.DEFER, Kind.CODE, Kind.DISCARD})
# Actions that edit the matched line: meaningless outside header/body checks.
LINE_EDITS = frozenset({Kind.IGNORE, Kind.PREPEND, Kind.REPLACE})
NEEDS_TEXT = frozenset({Kind.PREPEND, Kind.REPLACE, Kind.REDIRECT, Kind.BCC})

_CODE_WORD = re.compile(r"^[45]\d\d$")
_DSN = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_HEADER_TEXT = re.compile(r"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)$", re.DOTALL)
# mac_parse(3): "$" then a name of letters, digits and underscores, or ${...} / $(...).
_MACRO = re.compile(r"\$(?:(\$)|\{([^}]*)\}|\(([^)]*)\)|([A-Za-z0-9_]+))")


class ActionError(ValueError):
    """a rule's action text Postfix would not accept, or that we refuse"""


@dataclass(frozen=True)
class Template:
    """Action text with `$1`-style group references, split at load time."""

    parts: tuple[str | int, ...] = ()

    @classmethod
    def parse(cls, text: str, groups: int, negated: bool) -> Template:
        parts: list[str | int] = []
        pos = 0
        for m in _MACRO.finditer(text):
            if "$" in text[pos:m.start()]:
                break
            parts.append(text[pos:m.start()])
            pos = m.end()
            if m.group(1):
                parts.append("$")
                continue
            name = next(g for g in m.groups()[1:] if g is not None)
            if not name.isdigit():
                raise ActionError(
                    f"${name} is not a group number; write $$ for a literal $ "
                    "(Postfix would skip this rule: bad replacement syntax)"
                )
            index = int(name)
            if negated:
                raise ActionError(f"${index} in the text of a negated (!/.../) rule")
            if index > groups:
                raise ActionError(f"${index} but the pattern has only {groups} group(s)")
            parts.append(index)
        if "$" in text[pos:]:
            raise ActionError(
                "lone $ in the action text; write $$ for a literal $ "
                "(Postfix 3.7 skips this rule with a 'bad replacement syntax' warning)"
            )
        parts.append(text[pos:])
        return cls(tuple(p for p in parts if p != ""))

    @property
    def static(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def expand(self, group: Callable[[int], str | None]) -> str:
        return "".join(p if isinstance(p, str) else (group(p) or "") for p in self.parts)


@dataclass(frozen=True)
class RuleAction:
    """A parsed action. `code` is set for CODE (e.g. "450")."""

    kind: Kind
    text: Template = Template()
    code: str = ""


def parse_action(result: str, groups: int, negated: bool) -> RuleAction:
    """Parse a rule's right-hand side: ACTION [text]."""
    word, _, rest = result.strip().partition(" ")
    if "\t" in word:
        word, _, tail = word.partition("\t")
        rest = tail + " " + rest
    rest = rest.strip(" \t")
    if "$" in word:
        raise ActionError("the action word itself cannot come from a $ substitution")
    upper = word.upper()
    if upper == "FILTER":
        raise ActionError(
            "FILTER (choose a content filter transport) has no milter equivalent; "
            "set content_filter in Postfix instead"
        )
    if upper == "STRIP":
        raise ActionError("STRIP is for smtp_header_checks only")
    code = ""
    if _CODE_WORD.match(word):
        kind = Kind.CODE
        code = word
    else:
        try:
            kind = Kind(upper)
        except ValueError:
            raise ActionError(f"unknown action {word!r}") from None
        if kind is Kind.CODE:
            raise ActionError(f"unknown action {word!r}")
    text = Template.parse(rest, groups, negated)
    if kind in NEEDS_TEXT and not text.parts:
        raise ActionError(f"{kind.value} needs text")
    if kind in (Kind.CODE, Kind.DEFER, Kind.REJECT) and text.static:
        # Check an explicit enhanced status code now rather than at the first match.
        content_reply(RuleAction(kind, text, code), text.expand(lambda _: ""))
    return RuleAction(kind, text, code)


def split_dsn(text: str) -> tuple[str, str]:
    """`5.7.0 go away` -> ("5.7.0", "go away"); no leading code -> ("", text)."""
    m = _DSN.match(text)
    if not m:
        return "", text
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end():]


def content_reply(action: RuleAction, text: str) -> Reply:
    """The SMTP reply for a header/body check that refuses the message.

    Postfix (cleanup): REJECT without text is `550 5.7.1 message content rejected`;
    a leading enhanced status code is kept and a 4.x.x one makes the reply 451.
    DEFER and NNN are our extension (Postfix 3.7 ignores them in header_checks).
    """
    dsn, rest = split_dsn(text)
    if action.kind is Kind.REJECT:
        if not dsn:
            return Reply("550", "5.7.1", rest or "message content rejected")
        if dsn[0] == "2":
            raise ActionError(f"REJECT with success status {dsn}")
        return Reply("451" if dsn[0] == "4" else "550", dsn, rest or "message content rejected")
    if action.kind is Kind.DEFER:
        return _coded("450", dsn, rest or "message content deferred")
    return _coded(action.code, dsn, rest or "message content rejected")


def _coded(code: str, dsn: str, text: str) -> Reply:
    dsn = dsn or f"{code[0]}.7.1"
    if dsn[0] != code[0]:
        raise ActionError(f"reply code {code} and status {dsn} disagree")
    return Reply(code, dsn, text)


def header_text(text: str) -> tuple[str, str] | None:
    """`Name: value` -> (name, value without the space after the colon), else None."""
    m = _HEADER_TEXT.match(text)
    if not m:
        return None
    return m.group(1), m.group(2).lstrip(" \t")

"""The right-hand side of a table rule: the action, its text, and the `$1` template.

Parsed once at load, in two layers as in Postfix:
- The table layer (dict_regexp.c / dict_pcre.c with mac_parse.c): a lone `$`, a
  `$name` that is not a group number, `$0`, a `$N` beyond the pattern's groups or in
  a negated rule make Postfix skip the rule with a warning; so do we (SkipRule).
- The action layer. In header/body checks (Context.CONTENT) we act as Postfix's
  cleanup_act() in cleanup_message.c: it knows REJECT WARN INFO FILTER PASS DISCARD
  HOLD PREPEND REPLACE REDIRECT BCC STRIP IGNORE DUNNO OK, case-insensitively
  (strncasecmp); any other word (DEFER, `554 text`...) is logged as "unknown command
  in header_checks map" when the rule matches and the message goes on untouched.
  DEFER and NNN replies are accepted only with `access_style_actions = true`. In
  access-style tables (Context.ACCESS: client/helo/sender/recipient/filename checks)
  a bad action is still a ConfigError.
References: header_checks(5), access(5), regexp_table(5), pcre_table(5).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

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
    # Content checks only: matched, logged with a warning, no effect (the line is
    # shielded from later rules and tables, as Postfix's first match answers).
    FILTER = "FILTER"  # choose a content filter: must stay in Postfix (see README)
    UNKNOWN = "UNKNOWN"  # "unknown command in header_checks map", or a malformed action


class Context(enum.Enum):
    """Which Postfix code would act on a table's results."""

    CONTENT = "content"  # header_checks & co: cleanup_message.c cleanup_act()
    ACCESS = "access"  # check_*_access: smtpd_check.c (and our filename_checks)


# cleanup_act() in Postfix 3.7 cleanup_message.c: the words header/body checks know.
CONTENT_WORDS = frozenset({
    "REJECT", "WARN", "INFO", "FILTER", "PASS", "DISCARD", "HOLD", "PREPEND", "REPLACE",
    "REDIRECT", "BCC", "STRIP", "IGNORE", "DUNNO", "OK",
})


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


class SkipRule(ValueError):
    """a rule Postfix's table loader skips with a warning (the text says why)"""


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
            if not name.isascii() or not name.isdigit():
                # dict_regexp.c/dict_pcre.c prescan: "non-numeric replacement index"
                raise SkipRule(f"non-numeric replacement index \"{name}\": bad replacement "
                               "syntax: skipping this rule (write $$ for a literal $)")
            index = int(name)
            if index < 1:
                raise SkipRule(f"out-of-range replacement index \"{name}\": bad "
                               "replacement syntax: skipping this rule")
            if negated:
                raise SkipRule("$number found in negative match replacement text: "
                               "skipping this rule")
            if index > groups:
                raise SkipRule(f"out of range replacement index \"{index}\": skipping "
                               f"this rule (the pattern has {groups} group(s))")
            parts.append(index)
        if "$" in text[pos:]:
            # mac_parse.c: "empty macro name" (a lone $) or "truncated macro reference"
            raise SkipRule("bad replacement syntax: skipping this rule (a lone $ or an "
                           "unclosed ${; write $$ for a literal $)")
        parts.append(text[pos:])
        return cls(tuple(p for p in parts if p != ""))

    @property
    def static(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def expand(self, group: Callable[[int], str | None]) -> str:
        return "".join(p if isinstance(p, str) else (group(p) or "") for p in self.parts)


@dataclass(frozen=True)
class RuleAction:
    """A parsed action. `code` is set for CODE (e.g. "450").

    `warning` is what Postfix would log about this action (at load for us, when the
    rule matches for Postfix); for FILTER and UNKNOWN it is also logged at each match.
    """

    kind: Kind
    text: Template = Template()
    code: str = ""
    warning: str = ""
    # The whole right-hand side, action word included: what Postfix's dict lookup
    # returns for the rule (after $N substitution), before cleanup reads it.
    result: Template = Template()


def _split_word(result: str) -> tuple[str, str]:
    """cleanup_act(): the command ends at the first space or tab; skip ISSPACE after."""
    cut = len(result)
    for sep in " \t":
        at = result.find(sep)
        if at >= 0:
            cut = min(cut, at)
    return result[:cut], result[cut:].lstrip(" \t\n\v\f\r")


def parse_action(
    result: str,
    groups: int,
    negated: bool,
    context: Context = Context.ACCESS,
    key: str = "header_checks",
    access_style: bool = False,
) -> RuleAction:
    """Parse a rule's right-hand side: ACTION [text].

    Raises SkipRule for what Postfix's table loader skips, and (in Context.ACCESS
    only) ActionError for an action we refuse. In Context.CONTENT every other
    right-hand side loads, as in Postfix; what cleanup_act() would not act on
    becomes UNKNOWN (or FILTER) with the warning Postfix logs.
    """
    # The table layer first: mac_parse over the whole result, as dict_*_prescan does.
    whole = Template.parse(result, groups, negated)
    return replace(_parse_action(result, groups, negated, context, key, access_style),
                   result=whole)


def _parse_action(
    result: str, groups: int, negated: bool, context: Context, key: str, access_style: bool,
) -> RuleAction:
    word, rest = _split_word(result)
    if context is Context.CONTENT:
        return _content_action(result, word, rest, groups, negated, key, access_style)
    if not word:
        raise ActionError("missing action after the pattern")
    if "$" in word:
        raise ActionError("the action word itself cannot come from a $ substitution")
    upper = word.upper()
    if upper in ("FILTER", "STRIP"):
        raise ActionError(f"{upper} cannot be used in an access table")
    code = ""
    if _CODE_WORD.match(word):
        kind = Kind.CODE
        code = word
    else:
        try:
            kind = Kind(upper)
        except ValueError:
            raise ActionError(f"unknown action {word!r}") from None
        if kind in (Kind.CODE, Kind.FILTER, Kind.UNKNOWN):
            raise ActionError(f"unknown action {word!r}")
    text = Template.parse(rest, groups, negated)
    if kind in NEEDS_TEXT and not text.parts:
        raise ActionError(f"{kind.value} needs text")
    if kind in (Kind.CODE, Kind.DEFER, Kind.REJECT) and text.static:
        # Check an explicit enhanced status code now rather than at the first match.
        static = text.expand(lambda _: "")
        if kind is Kind.REJECT and split_dsn(static)[0][:1] == "2":
            raise ActionError(f"REJECT with success status {split_dsn(static)[0]}")
        content_reply(RuleAction(kind, text, code), static)
    return RuleAction(kind, text, code)


def _content_action(
    result: str, word: str, rest: str, groups: int, negated: bool, key: str,
    access_style: bool,
) -> RuleAction:
    """cleanup_act() of Postfix 3.7 cleanup_message.c, decided at load where we can."""
    text = Template.parse(rest, groups, negated)
    static = text.expand(lambda _: "") if text.static else None
    upper = word.upper()

    def unknown(why: str) -> RuleAction:
        return RuleAction(Kind.UNKNOWN, Template.parse(result, groups, negated), warning=why)

    if not result:
        # maps.c maps_find(): an empty result is a table error ("returns an empty
        # string result"); cleanup sets CLEANUP_STAT_WRITE and the message is deferred.
        return RuleAction(Kind.CODE, Template(("4.3.0 Error: queue file write error",)), "451",
                          warning=f"{key} lookup returns an empty string result: Postfix "
                          "defers every message this rule matches (map lookup problem)")
    if "$" in word:
        # Postfix would read the command from the expanded text; we do not.
        return unknown(f"action word {word!r} from a $ substitution is not supported here "
                       "(the rule matches and does nothing)")
    if _CODE_WORD.match(word) or upper == "DEFER":
        if not access_style:
            # cleanup_message.c: msg_warn("unknown command in %s map: %s")
            return unknown(f"unknown command in {key} map: {result} (DEFER and NNN "
                           "replies are access(5) actions; see access_style_actions)")
        kind = Kind.CODE if _CODE_WORD.match(word) else Kind.DEFER
        action = RuleAction(kind, text, word if kind is Kind.CODE else "")
        if static is not None:
            content_reply(action, static)  # a code and status that disagree: refuse
        return action
    if upper not in CONTENT_WORDS:
        return unknown(f"unknown command in {key} map: {result}")
    if upper == "FILTER":
        # A milter cannot choose the content filter transport (cleanup's FILTER
        # sets state->filter); leave the rule in Postfix's own header_checks.
        return RuleAction(Kind.FILTER, text, warning=(
            f"FILTER in {key} has no milter equivalent: keep this rule in Postfix's "
            "own header_checks/body_checks (here it matches and does nothing)"))
    if upper == "STRIP":
        # Postfix 3.7 cleanup_act(): STRIP drops the line, as IGNORE (logged "strip").
        return RuleAction(Kind.IGNORE, text)
    kind = Kind(upper)
    if kind in (Kind.PREPEND, Kind.REPLACE) and not text.parts:
        return unknown(f"{kind.value} action without text in {key} map")
    if kind in (Kind.REDIRECT, Kind.BCC) and static is not None and "@" not in static:
        what = "REDIRECT target" if kind is Kind.REDIRECT else "BCC address"
        return unknown(f"bad {what} \"{static}\" in {key} map -- need user@domain")
    if kind is Kind.REJECT and static is not None and split_dsn(static)[0][:1] == "2":
        # cleanup_act(): a 2.x.x status becomes 4.x.x and the message is deferred.
        return RuleAction(kind, text, warning=(
            f"bad DSN action in {static} -- need 4.x.x or 5.x.x (deferred with 4.x.x, "
            "as Postfix does)"))
    return RuleAction(kind, text)


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
            dsn = "4" + dsn[1:]  # cleanup_act(): "bad DSN action ... need 4.x.x or 5.x.x"
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

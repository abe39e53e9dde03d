"""The checks filter: Postfix header/body checks and access tables as one milter.

Built once from settings (every table compiled, every problem a ConfigError with
file:line), then immutable: check() keeps its per-message state in a fresh
_Decision object, so libmilter threads can share one filter.

How actions combine (checked against Postfix 3.7, notes/postfix-checks-semantics.md):
each header and body line is matched on its own, in message order, after the SMTP
stage tables. REJECT, DEFER, NNN and DISCARD end checking and decide; REDIRECT ends
checking but the message is accepted (redirected, earlier BCCs dropped); PASS ends
checking; HOLD, BCC, WARN, INFO and the line edits go on.

Time: all matching for one message shares a Budget of `match_timeout` seconds
(tables.py). A rule that runs over it ends the check with on_error and a log line
naming the rule's file:line. We do not treat it as "not matching" (PCRE's answer
to its match limit): a hostile line placed before the spam would then switch
every later rule off for the message. Postfix itself defers a message whose table
lookup fails; on_error = tempfail does the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from milters.checks import shadow
from milters.checks.actions import (
    LINE_EDITS,
    Context,
    Kind,
    RuleAction,
    content_reply,
    header_text,
)
from milters.checks.message import (
    DecodedLine,
    Item,
    Loc,
    MessageWalker,
    RawLines,
    TopHeader,
    Where,
    printable,
)
from milters.checks.rewrite import LineEdit, rewrite_body, set_charset
from milters.checks.settings import ChecksSettings
from milters.checks.stages import (
    SmtpStage,
    StageLookup,
    client_subjects,
    lookup_stage,
    sender_subject,
    stage_reply,
)
from milters.checks.tables import Budget, Hit, Maps, MatchOverrun, TextMode, load_maps
from milters.core.config import FilterSettings
from milters.core.errors import ConfigError
from milters.core.filter import Env, Filter, Stage
from milters.core.model import Connection, Transaction, unbracket
from milters.core.verdict import REPLY_INTERNAL_ERROR, Action, EditKind, HeaderEdit, Verdict

log = logging.getLogger(__name__)

# Actions that make no sense where there is no line to edit.
_NO_LINE = frozenset(LINE_EDITS)
_STAGE_FORBIDDEN = frozenset({Kind.IGNORE, Kind.REPLACE, Kind.PASS})
_REFUSALS = frozenset({Kind.REJECT, Kind.DEFER, Kind.CODE})
_LOG_WORD = MappingProxyType({Kind.WARN: "warning", Kind.INFO: "info"})


@dataclass(frozen=True)
class _Tables:
    header: Maps
    mime_header: Maps
    nested_header: Maps
    body: Maps
    filename: Maps
    stage: dict[SmtpStage, Maps]

    by_where: Mapping[Where, Maps] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_where", MappingProxyType({
            Where.HEADER: self.header,
            Where.MIME_HEADER: self.mime_header,
            Where.NESTED_HEADER: self.nested_header,
            Where.BODY: self.body,
            Where.FILENAME: self.filename,
        }))

    def all_maps(self) -> list[Maps]:
        return [self.header, self.mime_header, self.nested_header, self.body, self.filename,
                *self.stage.values()]


class ChecksFilter(Filter):
    """Postfix header_checks/body_checks and check_*_access tables, decoded."""

    name = "checks"
    default_port = 8895
    settings_class = ChecksSettings
    stages = Stage.CONNECT | Stage.HELO | Stage.MAIL | Stage.RCPT | Stage.HEADER | Stage.BODY
    may_change_headers = True
    may_change_recipients = True  # REDIRECT, BCC
    may_replace_body = True  # body and MIME-part line edits
    may_quarantine = True  # HOLD
    decides_stages_again = True  # run_stages() at end of message

    def __init__(self, settings: FilterSettings, env: Env) -> None:
        if not isinstance(settings, ChecksSettings):
            raise TypeError("ChecksFilter needs ChecksSettings")
        super().__init__(settings, env)
        self.checks: ChecksSettings = settings
        self.mode = TextMode.TEXT if settings.decode else TextMode.BYTES
        self.tables = self._load(settings)
        self._warnings = self._collect_warnings()
        for line in self._warnings:
            log.warning("checks: %s", line)
        self.on_error = settings.on_error or env.global_.on_error

    def budget(self) -> Budget:
        """A fresh matching budget: one per message, one per SMTP stage."""
        return Budget(self.checks.match_timeout or None)

    def overrun(self, exc: MatchOverrun, key: str) -> Verdict:
        """on_error for a message whose matching ran over match_timeout."""
        if not key:
            what = exc.source  # reading the message
        elif exc.source:
            what = f"{key} table {exc.source}"
        else:
            what = f"{key} matching, line after line,"
        note = (f"warning: {what} ran over match_timeout "
                f"({exc.seconds:g} s); message not checked, on_error={self.on_error}")
        if self.on_error == "accept":
            return Verdict(reason=f"match_timeout in {what}, accepted per on_error",
                           log_notes=(note,))
        return Verdict(Action.TEMPFAIL, reply=REPLY_INTERNAL_ERROR,
                       reason=f"match_timeout in {what}", log_notes=(note,))

    def _load(self, s: ChecksSettings) -> _Tables:
        problems: list[str] = []

        def load(key: str, specs: tuple[str, ...], forbidden: frozenset[Kind],
                 context: Context = Context.ACCESS) -> Maps:
            try:
                return load_maps(key, specs, self.mode, forbidden, context,
                                 s.access_style_actions)
            except ConfigError as exc:
                problems.extend(exc.problems)
                return Maps(key)

        content = Context.CONTENT
        header = load("header_checks", s.header_checks, frozenset(), content)
        mime = header if s.mime_header_checks is None else load(
            "mime_header_checks", s.mime_header_checks, frozenset(), content)
        nested = header if s.nested_header_checks is None else load(
            "nested_header_checks", s.nested_header_checks, frozenset(), content)
        tables = _Tables(
            header=header,
            mime_header=mime,
            nested_header=nested,
            body=load("body_checks", s.body_checks, frozenset(), content),
            filename=load("filename_checks", s.filename_checks, _NO_LINE | {Kind.PASS}),
            stage={
                stage: load(stage.key, getattr(s, stage.key), _STAGE_FORBIDDEN)
                for stage in SmtpStage
            },
        )
        for stage in SmtpStage:
            for table in tables.stage[stage].tables:
                for rule in table.all_rules():
                    if rule.action.kind is Kind.PREPEND and rule.action.text.static and \
                            header_text(rule.action.text.expand(lambda _: "")) is None:
                        problems.append(f"{rule.source}: PREPEND needs a header line "
                                        "(Name: value) in an access table")
        if problems:
            raise ConfigError(problems=problems)
        return tables

    # --- what the adapter negotiates ------------------------------------------

    def needed_stages(self) -> Stage:
        """Only the stages the configured tables need (a subset of `stages`)."""
        t = self.tables
        need = Stage.NONE
        if t.stage[SmtpStage.CLIENT]:
            need |= Stage.CONNECT
        if t.stage[SmtpStage.HELO]:
            need |= Stage.HELO
        if t.stage[SmtpStage.SENDER]:
            need |= Stage.MAIL
        if t.stage[SmtpStage.RECIPIENT]:
            need |= Stage.RCPT
        if t.header or t.mime_header or t.nested_header or t.body or t.filename:
            need |= Stage.HEADER  # the primary header also gives the MIME structure
        if t.mime_header or t.nested_header or t.body or t.filename:
            need |= Stage.BODY  # part headers, attached messages, names live in the body
        if any(Kind.REDIRECT in m.kinds() for m in t.all_maps()):
            need |= Stage.RCPT  # REDIRECT removes the original recipients
        return need

    def _collect_warnings(self) -> tuple[str, ...]:
        seen: set[int] = set()
        found: list[str] = []
        for maps in self.tables.all_maps():
            if id(maps) not in seen:
                seen.add(id(maps))
                found += [w for w in maps.warnings if w not in found]
        return tuple(found)

    def load_warnings(self) -> list[str]:
        """Table lines skipped or read leniently, as Postfix warns about them."""
        return list(self._warnings)

    def describe(self) -> list[str]:
        lines = [f"decode = {'true' if self.checks.decode else 'false'}"]
        t = self.tables
        for key, maps in (("mime_header_checks", t.mime_header),
                          ("nested_header_checks", t.nested_header)):
            if maps is t.header:
                lines.append(f"{key}: same tables as header_checks")
        seen: set[int] = set()
        for maps in t.all_maps():
            if id(maps) in seen:
                continue
            seen.add(id(maps))
            for table in maps.tables:
                count = sum(1 for _ in table.all_rules())
                lines.append(f"{maps.key}: {table.spec} ({count} rules)")
        lines += [f"warning: {w}" for w in self._warnings]
        return lines

    # --- SMTP stages ------------------------------------------------------------

    def on_connect(self, conn: Connection) -> Verdict | None:
        subjects, reply_name = client_subjects(conn)
        if not subjects:
            return None
        return self._stage_refusal(SmtpStage.CLIENT, subjects, reply_name)

    def on_helo(self, conn: Connection) -> Verdict | None:
        if not conn.helo:
            return None
        return self._stage_refusal(SmtpStage.HELO, [conn.helo], conn.helo)

    def on_mail(self, tx: Transaction) -> Verdict | None:
        sender = sender_subject(tx.mail_from)
        return self._stage_refusal(SmtpStage.SENDER, [sender], tx.mail_from)

    def on_rcpt(self, tx: Transaction, rcpt: str) -> Verdict | None:
        """A refusal here refuses this recipient only."""
        rcpt = unbracket(rcpt)
        return self._stage_refusal(SmtpStage.RECIPIENT, [rcpt], rcpt)

    def _stage_refusal(self, stage: SmtpStage, subjects: list[str], name: str) -> Verdict | None:
        maps = self.tables.stage[stage]
        if not maps:
            return None
        try:
            found = lookup_stage(stage, maps, subjects, name, self.mode, self.budget())
        except MatchOverrun as exc:
            return self.overrun(exc, stage.key)
        hit = found.refusal
        if hit is None:
            return None  # HOLD, DISCARD, REDIRECT... take effect in check()
        reply = stage_reply(stage, hit, name, self.mode)
        action = Action.TEMPFAIL if reply.temporary else Action.REJECT
        return Verdict(action, reply=reply, reason=f"{stage.key} {hit.rule.source} "
                                                   f"{hit.kind.value}")

    # --- end of message -------------------------------------------------------

    def check(self, tx: Transaction) -> Verdict:
        with shadow.watch() as seen:
            decision = _Decision(self, tx)
            try:
                decision.run_stages()
                if not decision.stopped:
                    decision.run_content()
            except MatchOverrun as exc:
                return self.overrun(exc, decision.key)
            verdict = decision.verdict()
        return shadow.report(verdict, seen, self.env.metrics)


class _Decision:
    """Everything one check() accumulates; thrown away afterwards."""

    def __init__(self, filt: ChecksFilter, tx: Transaction) -> None:
        self.filt = filt
        self.mode = filt.mode
        self.tx = tx
        self.terminal: Verdict | None = None
        self.stopped = False
        self.hold = ""
        self.bcc: list[str] = []
        self.redirect = ""
        self.header_edits: list[HeaderEdit] = []
        self.line_edits: list[LineEdit] = []
        self.rejected_rcpts: list[str] = []
        self.rcpt_refusal: Verdict | None = None
        self.notes: list[str] = []
        self.reasons: list[str] = []
        self.walker: MessageWalker | None = None
        self.budget = filt.budget()
        self.key = ""  # the table key being matched, for the overrun log

    # --- stage tables, re-run at end of message for their effects -------------

    def run_stages(self) -> None:
        conn = self.tx.connection
        t = self.filt.tables.stage
        lookups: list[StageLookup] = []
        subjects, reply_name = client_subjects(conn)
        if subjects and t[SmtpStage.CLIENT]:
            self.key = SmtpStage.CLIENT.key
            lookups.append(lookup_stage(SmtpStage.CLIENT, t[SmtpStage.CLIENT], subjects,
                                        reply_name, self.mode, self.budget))
        if conn.helo and t[SmtpStage.HELO]:
            self.key = SmtpStage.HELO.key
            lookups.append(lookup_stage(SmtpStage.HELO, t[SmtpStage.HELO], [conn.helo],
                                        conn.helo, self.mode, self.budget))
        if t[SmtpStage.SENDER]:
            self.key = SmtpStage.SENDER.key
            lookups.append(lookup_stage(SmtpStage.SENDER, t[SmtpStage.SENDER],
                                        [sender_subject(self.tx.mail_from)], self.tx.mail_from,
                                        self.mode, self.budget))
        if t[SmtpStage.RECIPIENT]:
            self.key = SmtpStage.RECIPIENT.key
            for rcpt in self.tx.rcpt_to:
                r = unbracket(rcpt)
                lookups.append(lookup_stage(SmtpStage.RECIPIENT, t[SmtpStage.RECIPIENT], [r],
                                            r, self.mode, self.budget))
        for found in lookups:
            for hit in found.hits:
                self._stage_hit(found, hit)
                if self.stopped:
                    return
        if self.rcpt_refusal is not None and len(self.rejected_rcpts) >= len(self.tx.rcpt_to):
            self.terminal, self.stopped = self.rcpt_refusal, True  # no recipient left

    def _stage_hit(self, found: StageLookup, hit: Hit) -> None:
        stage = found.stage
        text = self.mode.to_str(hit.text)
        self._note(hit, stage.reply_class, found.subject, text)
        if hit.kind in _REFUSALS:
            reply = stage_reply(stage, hit, found.reply_name, self.mode)
            verdict = Verdict(Action.TEMPFAIL if reply.temporary else Action.REJECT,
                              reply=reply, reason=self._reason(stage.key, hit))
            if stage is SmtpStage.RECIPIENT:
                # Only this recipient is refused; the message dies if none is left.
                self.rejected_rcpts.append(found.reply_name)
                if self.rcpt_refusal is None or self.rcpt_refusal.action < verdict.action:
                    self.rcpt_refusal = verdict
                return
            self.terminal, self.stopped = verdict, True
            return
        if hit.kind is Kind.PREPEND:
            # access(5) PREPEND adds a header at the top of the message.
            parsed = header_text(text)
            if parsed is None:
                self.notes.append(f"warning: PREPEND text is not a header line: "
                                  f"{printable(text)}; nothing added")
            else:
                self.header_edits.append(HeaderEdit(EditKind.INSERT, parsed[0], parsed[1], 0))
            return
        self._common(stage.key, hit, text)

    # --- header and body checks -----------------------------------------------

    def run_content(self) -> None:
        f = self.filt
        self.key = ""  # walking the message
        walker = MessageWalker(self.tx, self.mode, f.checks.decode,
                               f.checks.body_checks_size_limit, self.budget)
        self.walker = walker
        by_where = f.tables.by_where
        # All subjects first (each part is cut at body_checks_size_limit, so this
        # is bounded), then one screening pass per table key (Maps.screen).
        items = [item for item in walker.items() if by_where[item.where]]
        pruned = {}
        for where in {i.where for i in items}:
            self.key = where.value
            pruned[where] = by_where[where].for_message(
                [i.text for i in items if i.where is where], self.budget)
        for item in items:
            self.key = item.where.value
            hit = pruned[item.where].lookup(item.text, self.budget)
            if hit is None or hit.kind in (Kind.DUNNO, Kind.OK):
                continue
            self._content_hit(item, hit)
            if self.stopped:
                break
        self.notes.extend(walker.notes)

    def _content_hit(self, item: Item, hit: Hit) -> None:
        key = item.where.value
        text = self.mode.to_str(hit.text)
        shown = self.mode.to_str(item.text)
        where = {Where.BODY: "body", Where.FILENAME: "filename"}.get(item.where, "header")
        self._note(hit, where, shown, text)
        if hit.kind in (Kind.UNKNOWN, Kind.FILTER):
            # Postfix logs the warning when the rule matches and changes nothing.
            self.notes.append(f"warning: {hit.rule.source}: {hit.rule.action.warning}")
            return
        if hit.kind in _REFUSALS:
            reply = content_reply(hit.rule.action, text)
            self.terminal = Verdict(Action.TEMPFAIL if reply.temporary else Action.REJECT,
                                    reply=reply, reason=self._reason(key, hit))
            self.stopped = True
        elif hit.kind in LINE_EDITS:
            self._edit(item.loc, hit.rule.action, text)
        else:
            self._common(key, hit, text)

    def _common(self, key: str, hit: Hit, text: str) -> None:
        """Actions that mean the same at every stage and in content."""
        kind = hit.kind
        if kind is Kind.DISCARD:
            self.terminal = Verdict(Action.DISCARD, reason=self._reason(key, hit))
            self.stopped = True
        elif kind is Kind.HOLD:
            self.hold = self.hold or text or f"{key} {hit.rule.source}"
            self.reasons.append(self._reason(key, hit))
        elif kind in (Kind.REDIRECT, Kind.BCC) and "@" not in text:
            # cleanup_act(): a target from $N without @ is only logged.
            self.notes.append(f"warning: bad {kind.value} address \"{printable(text)}\" in "
                              f"{key} map -- need user@domain")
        elif kind is Kind.REDIRECT:
            # header_checks(5) REDIRECT affects all recipients; Postfix stops all
            # further header and body checks and drops earlier BCC recipients.
            self.redirect, self.bcc = text, []
            self.reasons.append(self._reason(key, hit))
            self.stopped = True
        elif kind is Kind.BCC:
            self.bcc.append(text)
        elif kind is Kind.PASS:
            self.stopped = True

    def _edit(self, loc: Loc, action: RuleAction, text: str) -> None:
        kind = action.kind
        if isinstance(loc, TopHeader):
            self._header_edit(loc, kind, text)
            return
        if isinstance(loc, RawLines) and loc.piece < 0 and kind is not Kind.IGNORE and \
                header_text(text) is None:
            self.notes.append(f"warning: {kind.value} text is not a header line: "
                              f"{printable(text)}; header kept")
            return
        if isinstance(loc, RawLines | DecodedLine):
            self.line_edits.append(LineEdit(kind, text, loc))

    def _header_edit(self, loc: TopHeader, kind: Kind, text: str) -> None:
        if kind is Kind.IGNORE:
            self.header_edits.append(HeaderEdit(EditKind.DELETE, loc.name, "", loc.occurrence))
            return
        parsed = header_text(text)
        if parsed is None:
            # header_checks(5): text that is not a header line only logs a warning.
            self.notes.append(f"warning: {kind.value} text is not a header line: "
                              f"{printable(text)}; header kept")
            return
        name, value = parsed
        if kind is Kind.PREPEND:
            self.header_edits.append(HeaderEdit(EditKind.INSERT, name, value, loc.index))
        elif name.lower() == loc.name.lower():
            self.header_edits.append(HeaderEdit(EditKind.CHANGE, loc.name, value, loc.occurrence))
        else:
            self.header_edits.append(HeaderEdit(EditKind.INSERT, name, value, loc.index))
            self.header_edits.append(HeaderEdit(EditKind.DELETE, loc.name, "", loc.occurrence))

    # --- logging ----------------------------------------------------------------

    def _reason(self, key: str, hit: Hit) -> str:
        return f"{key} {hit.rule.source} {hit.kind.value}"

    def _note(self, hit: Hit, what: str, content: str, text: str) -> None:
        """A log line as Postfix writes it: `warning: header Subject: x from ...: text`.

        The matched content shows control characters as '?' and is cut at 200
        characters, as cleanup's "%.200s" does.
        """
        conn = self.tx.connection
        self.filt.env.metrics.rule_hit(hit.rule.source.rpartition(":")[0], hit.rule.source,
                                       hit.kind.value)
        word = _LOG_WORD.get(hit.kind, hit.kind.value.lower())
        client = f"{conn.client_name or 'unknown'}[{conn.client_addr}]"
        rcpt = self.tx.rcpt_to[0] if self.tx.rcpt_to else ""
        line = (f"{word}: {what} {printable(content)} from {client}; from=<{self.tx.mail_from}> "
                f"to=<{rcpt}> helo=<{conn.helo}>")
        if text:
            line += f": {printable(text)}"
        self.notes.append(line)

    # --- the verdict --------------------------------------------------------------

    def verdict(self) -> Verdict:
        notes = tuple(self.notes)
        if self.terminal is not None:
            # A refusal or discard decides; edits are moot, HOLD is kept for the log.
            return replace(self.terminal, quarantine=self.hold, log_notes=notes)
        header_edits = list(self.header_edits)
        body = None
        if self.line_edits and self.walker is not None:
            rewritten = rewrite_body(self.tx.body, self.walker.parts, self.line_edits)
            body = rewritten.body
            notes += rewritten.notes
            if rewritten.top_charset_utf8:
                header_edits.append(self._top_charset_edit())
        add = (self.redirect,) if self.redirect else tuple(self.bcc)
        delete = list(self.rejected_rcpts)
        if self.redirect:
            delete = [unbracket(r) for r in self.tx.rcpt_to]
        return Verdict(
            Action.ACCEPT,
            reason="; ".join(self.reasons),
            quarantine=self.hold,
            header_edits=tuple(header_edits),
            add_rcpts=add,
            del_rcpts=tuple(delete),
            replace_body=body,
            log_notes=notes,
        )

    def _top_charset_edit(self) -> HeaderEdit:
        """The message itself became UTF-8: say so in its (first) Content-Type."""
        for h in self.tx.headers:
            if h.name.lower() == "content-type":
                value = set_charset(h.value.strip(), b"").decode("utf-8", "surrogateescape")
                return HeaderEdit(EditKind.CHANGE, h.name, value, 1)
        return HeaderEdit(EditKind.ADD, "Content-Type", "text/plain; charset=utf-8")

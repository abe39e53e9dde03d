"""One SMTP session's decisions, stage by stage, without pymilter.

The adapter (milter callbacks) and `milters test` (offline, on a .eml file)
both drive this class, so a message gets the same verdict either way. It holds
the per-connection and per-message state; site policy and the error backstop
are applied here.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

from milters.core import authresults, hold
from milters.core.filter import Stage
from milters.core.model import Connection, Transaction
from milters.core.plan import Plan, make_plan
from milters.core.policy import (
    describe,
    error_verdict,
    finalize,
    finalize_stage,
    report_edit,
    split_reply,
)
from milters.core.runtime import Runtime
from milters.core.verdict import Action, Verdict, merge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """A final verdict, the edits that carry it out, and how long the decision took."""

    verdict: Verdict
    ms: float
    plan: Plan = Plan()


class Pipeline:
    """Decisions for one SMTP connection (several messages may follow each other)."""

    def __init__(self, runtime: Runtime, conn: Connection) -> None:
        self.runtime = runtime
        self.conn = conn
        self.needed = runtime.needed
        self.conn_pending: list[Verdict] = []  # non-final decisions at connect/HELO
        self.tx_pending: list[Verdict] = []  # ... at MAIL/RCPT
        self.tx_notes: list[str] = []  # report-mode/bypass notes from early stages

    @property
    def name(self) -> str:
        return self.runtime.filter.name

    def queue_id(self, tx: Transaction | None) -> str:
        qid = tx.queue_id if tx is not None else self.conn.macros.get("i", "")
        return qid or "NOQUEUE"

    def _guarded(self, stage: str, tx: Transaction | None,
                 fn: Callable[[], Verdict | None]) -> Verdict | None:
        """The backstop: an error logs a traceback once and yields on_error."""
        try:
            return fn()
        except Exception as exc:  # the one backstop, by design
            log.error(
                "queue_id=%s filter=%s stage=%s error=%s\n%s",
                self.queue_id(tx), self.name, stage, type(exc).__name__,
                traceback.format_exc().rstrip(),
            )
            self.runtime.env.metrics.error(self.name, stage, exc)
            return error_verdict(self.runtime.policy, f"{type(exc).__name__} at {stage}")

    def _stage(self, stage: str, tx: Transaction | None, verdict: Verdict | None,
               rcpt: str = "") -> Verdict | None:
        """None to go on; a final verdict to refuse at this stage."""
        if verdict is None:
            return None
        verdict = finalize_stage(verdict, self.runtime.policy, rcpt)
        if verdict.action is Action.ACCEPT and self.runtime.filter.decides_stages_again:
            return None  # decided again, and reported once, at end of message
        if verdict.action is Action.ACCEPT:
            if verdict.reason and not (verdict.quarantine or verdict.header_edits
                                       or verdict.add_rcpts or verdict.del_rcpts):
                self.tx_notes.append(verdict.reason)
            pending = self.conn_pending if stage in ("connect", "helo") else self.tx_pending
            pending.append(verdict)
            return None
        self.log(stage, tx, verdict, 0.0)
        return verdict

    def accepted_at_connect(self) -> bool:
        """The whole session is accepted now, unchecked: an internal client of a
        filter that skips them (Runtime.accepts_early). One log line says so."""
        if not self.runtime.accepts_early or not self.runtime.env.is_internal(self.conn):
            return False
        self.log("connect", None, Verdict(reason="not checked: internal client"), 0.0)
        return True

    def connect(self) -> Verdict | None:
        if Stage.CONNECT not in self.needed:
            return None
        v = self._guarded("connect", None, lambda: self.runtime.filter.on_connect(self.conn))
        return self._stage("connect", None, v)

    def helo(self) -> Verdict | None:
        if Stage.HELO not in self.needed:
            return None
        v = self._guarded("helo", None, lambda: self.runtime.filter.on_helo(self.conn))
        return self._stage("helo", None, v)

    def mail(self, tx: Transaction) -> Verdict | None:
        self.tx_pending = []
        self.tx_notes = []
        if Stage.MAIL not in self.needed:
            return None
        v = self._guarded("mail", tx, lambda: self.runtime.filter.on_mail(tx))
        return self._stage("mail", tx, v)

    def rcpt(self, tx: Transaction, address: str, record: bool = True) -> Verdict | None:
        """Decide about one recipient; an accepted one is added to tx.rcpt_to
        (unless `record` is false: chain mode adds it once every step accepted it)."""
        split = split_reply(tx.rcpt_to, address, self.runtime.policy)
        if split is not None:
            return Verdict(Action.TEMPFAIL, reply=split, reason="bypass class differs")
        verdict = None
        if Stage.RCPT in self.needed:
            verdict = self._guarded("rcpt", tx, lambda: self.runtime.filter.on_rcpt(tx, address))
        refused = self._stage("rcpt", tx, verdict, address)
        if refused is None and record:
            tx.rcpt_to.append(address)
        return refused

    def end_of_message(self, tx: Transaction) -> Outcome:
        """The whole message is in: the filter's check, then site policy."""
        started = time.perf_counter()
        verdict = self._guarded("eom", tx, lambda: self.runtime.filter.check(tx))
        assert verdict is not None  # _guarded only returns None if fn does
        verdict = merge(self.conn_pending + self.tx_pending, verdict)
        verdict = finalize(verdict, self.runtime.policy, tx.rcpt_to)
        env = self.runtime.env
        verdict = hold.hand_on(verdict, tx.headers, self.name, env.global_.authserv_id,
                               first=not env.upstream, last=not env.downstream)
        if self.tx_notes and verdict.action is Action.ACCEPT:
            # Same wording as the end-of-message report: "spf would reject 550 ...".
            text = " ".join(f"{self.name} {n.removeprefix('report mode: ')}"
                            for n in self.tx_notes)
            verdict = replace(verdict, header_edits=(*verdict.header_edits, report_edit(text)))
        self.tx_pending = []
        self.tx_notes = []
        plan = self.plan(tx, verdict) if verdict.action is Action.ACCEPT else Plan()
        return Outcome(verdict, (time.perf_counter() - started) * 1000, plan)

    def plan(self, tx: Transaction, verdict: Verdict) -> Plan:
        """The milter operations for an accepting verdict, the removal of forged
        Authentication-Results fields included (core/plan.py)."""
        rt = self.runtime
        authserv_id = rt.env.global_.authserv_id
        forged = authresults.forged_fields(tx.headers, authserv_id, rt.strip_all_forged,
                                           rt.filter.ar_methods)
        return make_plan(verdict, tx.headers, authserv_id, forged)

    def failed(self, tx: Transaction | None, what: str) -> Verdict:
        """Carrying out a verdict failed (MTA refused an action): on_error."""
        log.error("queue_id=%s filter=%s %s\n%s", self.queue_id(tx), self.name, what,
                  traceback.format_exc().rstrip())
        return error_verdict(self.runtime.policy, what)

    def log(self, stage: str, tx: Transaction | None, verdict: Verdict, ms: float) -> None:
        self.runtime.env.metrics.message(self.name, stage, verdict, ms)
        qid = self.queue_id(tx)
        for note in verdict.log_notes:
            log.info("queue_id=%s filter=%s %s", qid, self.name, note)
        results = "; ".join(f"{r.method}={r.result}" for r in verdict.results) or "-"
        log.info(
            "queue_id=%s filter=%s stage=%s client=%s[%s] verdict=%s results=%s ms=%.1f",
            qid, self.name, stage, self.conn.client_name or "unknown",
            self.conn.client_addr or "local", describe(verdict), results, ms,
        )

"""The dmarc filter: evaluate DMARC for each received message, act on the policy,
and record the evaluation for aggregate reports.

DKIM and SPF results come from Authentication-Results fields written by our own
filters upstream in the chain (or by authserv-ids the administrator trusts);
a result that is missing is computed here (self-validation), so the verdict is
right whatever the order of `smtpd_milters`. A field with our own authserv-id
is believed only when the filter owning that method runs before this one: when
dmarc is first or alone, every such field came from outside, is forged, and is
ignored here (and removed by the adapter).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace

from milters.core import arc, authresults
from milters.core.config import FilterSettings
from milters.core.dkim_verify import dkim_headers, verify_all
from milters.core.domains import DomainList
from milters.core.filter import Env, Filter, Stage
from milters.core.model import Transaction
from milters.core.spf_eval import check_host
from milters.core.verdict import Action, AuthResult, EditKind, HeaderEdit, Reply, Verdict
from milters.dmarc.evaluate import (
    FAIL,
    PERMERROR,
    TEMPERROR,
    DkimInput,
    Evaluation,
    SpfInput,
    author_domains,
    evaluate_authors,
)
from milters.dmarc.failure import header_pairs, spool_from_settings
from milters.dmarc.forwarded import ArcEvidence, trusted_forwarding
from milters.dmarc.history import HistoryEntry, HistoryStore, open_history
from milters.dmarc.record import DmarcRecord
from milters.dmarc.settings import DmarcSettings

log = logging.getLogger(__name__)

TAG_HEADER = "X-Milters-DMARC"
REPLY_BAD_FROM = Reply("550", "5.7.1",
                       "a message needs one From field with addresses of one domain")
# RFC 9990 PolicyOverrideType: relayed by a known forwarder (here: a trusted ARC chain).
TRUSTED_FORWARDER = "trusted_forwarder"
REPLY_TEMPERROR = Reply("451", "4.4.3", "cannot look up the DMARC policy now, try again later")


def listed(domain: str, entries: Sequence[str]) -> bool:
    """`domain` is an entry, or a sub-domain of a `.parent` entry (core/domains.py)."""
    return domain in DomainList.of(entries)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip("<>").rstrip(".").lower()


def _storable(text: str) -> str:
    """Client-given text as the history can store it: bytes that were not UTF-8 reach
    us as surrogate escapes, which no database encoding takes (one such row would
    fail the whole batch it is written in)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace(
        "\ufffd", "?")


class DmarcFilter(Filter):
    """DMARC (RFC 9989) evaluation, history and aggregate reports, replacing OpenDMARC.

    The From domain's policy is found by the DNS Tree Walk (or the Public Suffix List
    with discovery = "psl"); DKIM and SPF results come from our upstream filters'
    Authentication-Results, else are computed here. A failure under p=reject is
    refused only with reject_failures = true; p=quarantine holds or tags. Every
    evaluation goes to the history that `milters dmarc report` and `stats` read.
    """

    name = "dmarc"
    default_port = 8893
    settings_class = DmarcSettings
    stages = Stage.HEADER | Stage.BODY
    # History rows go to a journal and a writer thread; failure reports to a spool.
    waits_only_on_dns = True
    may_quarantine = True
    ar_methods = frozenset({"dmarc"})

    def __init__(self, settings: FilterSettings, env: Env) -> None:
        if not isinstance(settings, DmarcSettings):
            raise TypeError("DmarcFilter needs DmarcSettings")
        super().__init__(settings, env)
        self.dmarc: DmarcSettings = settings
        own = authresults.normalize_id(env.global_.authserv_id)
        self.own_id = own
        # Our own id is always trusted (for what our filters upstream wrote); the
        # setting adds the ids of upstream hosts whose results we also believe.
        self.trusted_ids = frozenset(
            {own, *(authresults.normalize_id(x) for x in settings.trusted_authserv_ids)})
        # The crash journal (history.py): a row is in it before end-of-message is answered.
        self.history: HistoryStore | None = open_history(
            settings.history, settings.history_journal or None, settings.history_fsync)
        self.trusted_sealers = DomainList.of(settings.trusted_arc_sealers)
        self.failures = spool_from_settings(settings.failure_reports, settings.failure_spool,
                                            settings.failure_redact)

    def shutdown(self) -> None:
        if self.history is not None:
            self.history.close()

    def describe(self) -> list[str]:
        return [f"policy discovery: {self.dmarc.discovery}",
                f"history: {self.dmarc.history or 'none'}"]

    # -- where results come from -------------------------------------------------------

    def _trusted(self, aid: str, method: str) -> bool:
        if aid not in self.trusted_ids:
            return False
        # Our own id: only a filter of ours upstream can have written it (authresults.py);
        # arc= results are the dkim filter's.
        writer = "dkim" if method == "arc" else method
        return aid != self.own_id or writer in self.env.upstream

    def upstream_arc(self, tx: Transaction) -> str | None:
        """The arc= result of a trusted field (our dkim filter's), None if none."""
        fields = authresults.trusted_results(tx.header_values(authresults.FIELD_NAME),
                                             self.trusted_ids)
        for field in fields:
            for method, result, _ in field.results or ():
                if method == "arc" and self._trusted(field.authserv_id, method):
                    return result
        return None

    def arc_evidence(self, tx: Transaction) -> ArcEvidence | None:
        """The message's ARC chain and its validation: the dkim filter's result when
        trusted (the chain read by the same core code it validated), else validated
        here (self_validate); None when neither."""
        headers = dkim_headers(tx.headers)
        result = self.upstream_arc(tx)
        if result is not None:
            return ArcEvidence(result, arc.read_chain(headers))
        if not self.dmarc.self_validate:
            return None
        checked = arc.verify_chain(headers, tx.body.getvalue(), self.env.resolver.txt,
                                   self.dmarc.min_key_bits)
        return ArcEvidence(checked.result, checked.chain)

    def forwarded(self, tx: Transaction, ev: Evaluation) -> str:
        """The trusted_forwarder comment when a trusted ARC chain sets aside this
        failure (forwarded.py), else ""."""
        if not (ev.result == FAIL and ev.disposition != "none" and self.trusted_sealers):
            return ""
        if not any(h.name.lower() == arc.SEAL for h in tx.headers):
            return ""
        evidence = self.arc_evidence(tx)
        if evidence is None:
            return ""
        return trusted_forwarding(evidence, ev.header_from_domain, self.trusted_sealers)

    def upstream_results(self, tx: Transaction) -> tuple[list[DkimInput] | None,
                                                          SpfInput | None, bool]:
        """(dkim results or None if none trusted, SPF mailfrom result, spf seen)."""
        dkim: list[DkimInput] | None = None
        spf: SpfInput | None = None
        spf_seen = False
        fields = authresults.trusted_results(tx.header_values(authresults.FIELD_NAME),
                                             self.trusted_ids)
        for field in fields:
            for method, result, props in field.results or ():
                if method not in ("dkim", "spf") or not self._trusted(field.authserv_id, method):
                    continue
                if method == "dkim":
                    dkim = dkim or []
                    if result != "none":
                        dkim.append(DkimInput(result, props.get("header.d", ""),
                                              props.get("header.s", "")))
                else:
                    spf_seen = True
                    mailfrom = props.get("smtp.mailfrom", "")
                    if mailfrom:
                        spf = SpfInput(result, _domain_of(mailfrom))
        return dkim, spf, spf_seen

    def self_dkim(self, tx: Transaction) -> list[DkimInput]:
        if not tx.header_values("DKIM-Signature"):
            return []
        results, _ = verify_all(dkim_headers(tx.headers), tx.body.getvalue(),
                                self.env.resolver.txt, self.dmarc.max_signatures,
                                self.dmarc.min_key_bits)
        return [DkimInput(r.result, r.domain, r.selector) for r in results]

    def self_spf(self, tx: Transaction) -> SpfInput | None:
        """SPF for the MAIL FROM identity, as the spf filter reports it upstream.

        RFC 9989 §3.2.4: DMARC uses only the MAIL FROM identity, and for a null
        reverse-path that identity is postmaster@HELO (RFC 7208 §2.4): check_host
        then checks the HELO name, and its domain is what aligns. The spf filter
        reports the same as smtp.mailfrom=postmaster@HELO, so dmarc alone and dmarc
        after spf give one answer.
        """
        conn = tx.connection
        if conn.client_ip is None:
            return None
        outcome = check_host(str(conn.client_ip), tx.mail_from, conn.helo, self.env.resolver)
        return SpfInput(outcome.result, outcome.domain)

    # -- the decision -----------------------------------------------------------------------

    def skips_internal(self) -> bool:
        # Unless a From domain may have to be checked all the same.
        return self.dmarc.skip_ours and not self.dmarc.always_check_domains

    def check(self, tx: Transaction) -> Verdict:
        s = self.dmarc
        ours = s.skip_ours and self.env.is_ours(tx.connection)
        authors = author_domains(tx.headers)
        if ours and not any(listed(d, s.always_check_domains) for d in authors.domains):
            return Verdict(reason="ours: not checked")
        if not authors.single and s.on_bad_from == "reject":
            # OpenDMARC's RequiredHeaders / RejectMultiValueFrom: refuse before DMARC
            # (RFC 9989 §11.5 allows "a negative disposition decision ... prior to
            # and instead of" DMARC processing). Several addresses of one domain in
            # one field are a single Author Domain and go on.
            why = authors.problem or f"{len(authors.domains)} From domains"
            return Verdict(Action.REJECT, reply=REPLY_BAD_FROM, reason=why)
        if not authors.domains:
            return Verdict(reason=authors.problem,
                           results=(AuthResult("dmarc", PERMERROR, comment="bad From"),))
        dkim, spf, spf_seen = self.upstream_results(tx)
        if s.self_validate:
            if dkim is None:
                dkim = self.self_dkim(tx)
            if spf is None and not spf_seen:
                spf = self.self_spf(tx)
        ev = evaluate_authors(authors, dkim or [], spf, self.env.resolver, s.discovery)
        forwarded = self.forwarded(tx, ev)
        verdict, override = self.act(ev, forwarded)
        self.remember(tx, ev, dkim or [], spf, verdict, override,
                      forwarded if override == TRUSTED_FORWARDER else "")
        if self.failures is not None:  # opt-in RFC 9991 failure reports (failure.py)
            self.spool_failure(tx, ev, dkim or [], spf, verdict)
        return verdict

    def act(self, ev: Evaluation, forwarded: str = "") -> tuple[Verdict, str]:
        """The verdict for an evaluation, and the RFC 9990 override reason if any.
        `forwarded`: a trusted ARC chain sets the failure aside (forwarded.py)."""
        s = self.dmarc
        applied, override = "none", ""
        notes: tuple[str, ...] = ()
        if ev.result == FAIL and ev.disposition != "none" and forwarded:
            override = TRUSTED_FORWARDER
            notes = (f"dmarc policy {ev.disposition} set aside: {TRUSTED_FORWARDER} "
                     f"({forwarded})",)
        elif ev.result == FAIL and ev.disposition != "none":
            spared = (listed(ev.header_from_domain, s.never_reject_domains)
                      or (ev.disposition == "reject" and not s.reject_failures)
                      or (ev.disposition == "quarantine" and s.on_quarantine == "accept"))
            if spared:
                override = "local_policy"
            else:
                applied = ev.disposition
        elif ev.result == FAIL and ev.testing and ev.policy != "none":
            override = "policy_test_mode"
        comment = f"p={ev.policy} dis={applied}" if ev.record else ""
        if override == TRUSTED_FORWARDER:
            comment += f" override={TRUSTED_FORWARDER}"
        ar = AuthResult("dmarc", ev.result, comment=comment,
                        properties=(("header", "from", ev.header_from_domain),))
        # The From domain in the summary line: `milters stats` gives pass rates per domain.
        reason = f"dmarc={ev.result} header.from={ev.header_from_domain} {ev.reason}"
        if override == TRUSTED_FORWARDER:
            reason += f"; override={TRUSTED_FORWARDER} {forwarded}"
        verdict = Verdict(reason=reason.strip(), results=(ar,), log_notes=notes)
        if ev.result == TEMPERROR and s.on_temperror == "tempfail":
            return replace(verdict, action=Action.TEMPFAIL, reply=REPLY_TEMPERROR), ""
        if applied == "reject":
            text = s.reject_reply.replace("%d", ev.header_from_domain)
            return replace(verdict, action=Action.REJECT,
                           reply=Reply("550", "5.7.1", text)), override
        if applied == "quarantine":
            if s.on_quarantine == "hold":
                return replace(verdict, quarantine=f"dmarc: policy of "
                                                   f"{ev.policy_domain}"), override
            edit = HeaderEdit(EditKind.ADD, TAG_HEADER,
                              f"quarantine (policy of {ev.policy_domain})")
            return replace(verdict, header_edits=(edit,)), override
        return verdict, override

    def spool_failure(self, tx: Transaction, ev: Evaluation, dkim: Sequence[DkimInput],
                      spf: SpfInput | None, verdict: Verdict) -> None:
        """Leave a failure report for `milters dmarc failures` when the policy asks for
        one; a spool failure is logged, never fatal."""
        assert self.failures is not None
        disposition = ("reject" if verdict.action is Action.REJECT else
                       "quarantine" if verdict.quarantine or verdict.header_edits else "none")
        try:
            self.failures.consider(ev, dkim, spf, header_pairs(tx.headers),
                                   tx.connection.client_addr, tx.mail_from, tx.rcpt_to,
                                   disposition, self.own_id)
        except OSError as exc:
            log.warning("queue_id=%s filter=dmarc failure report not spooled: %s",
                        tx.queue_id or "NOQUEUE", exc)

    def remember(self, tx: Transaction, ev: Evaluation, dkim: Sequence[DkimInput],
                 spf: SpfInput | None, verdict: Verdict, override: str,
                 override_comment: str = "") -> None:
        """Keep the evaluation in the history; a store failure is logged, never fatal."""
        if self.history is None:
            return
        r = ev.record or DmarcRecord(p="", adkim="", aspf="", fo="")
        if verdict.action is Action.REJECT:
            disposition = "reject"
        elif verdict.quarantine or verdict.header_edits:
            disposition = "quarantine"
        else:
            disposition = "none"
        entry = HistoryEntry(
            time=int(time.time()),
            source_ip=tx.connection.client_addr,
            header_from=ev.header_from_domain,
            envelope_from=_storable(_domain_of(tx.mail_from)) if tx.mail_from else "",
            envelope_to=_storable(_domain_of(tx.rcpt_to[0])) if tx.rcpt_to else "",
            dkim=tuple((_storable(d.domain), _storable(d.selector), d.result) for d in dkim),
            spf_domain=_storable(spf.domain) if spf else "",
            spf_result=spf.result if spf else "none",
            policy_domain=ev.policy_domain, p=r.p, sp=r.sp, np=r.np, adkim=r.adkim,
            aspf=r.aspf, testing=r.t, discovery=ev.discovery, fo=r.fo, rua=r.rua,
            result=ev.result, dkim_aligned=ev.dkim_aligned, spf_aligned=ev.spf_aligned,
            policy=ev.policy, disposition=disposition, override=override,
            override_comment=_storable(override_comment),
        )
        try:
            self.history.record(entry)
        except (sqlite3.Error, OSError) as exc:
            log.warning("queue_id=%s filter=dmarc history not written: %s",
                        tx.queue_id or "NOQUEUE", exc)


"""Trusted forwarders: when DMARC fails, may a passing ARC chain set the policy aside?

RFC 9989 §5.4 lets a receiver's local policy override the Domain Owner's, and
RFC 8617 §7.2.1 names the case: mail that passed DMARC at an intermediary the
receiver trusts, then changed on the way (a list's subject tag or footer), keeps
a passing ARC chain whose oldest ARC-Authentication-Results says so. We
override only when every sealer of the chain is trusted (one untrusted hop could
have made up the results below it) and the oldest results are a dmarc=pass for
the same From domain. RFC 9990 names the override `trusted_forwarder`; the
comment names the chain, as OpenDMARC's reports do.
"""

from __future__ import annotations

from dataclasses import dataclass

from milters.core import arc
from milters.core.authresults import normalize_id
from milters.core.domains import DomainList


@dataclass(frozen=True)
class ArcEvidence:
    """What a message's ARC chain says, as the override needs it."""

    result: str  # arc= result: pass, fail, none
    chain: arc.Chain

    @property
    def oldest_dmarc(self) -> tuple[str, str]:
        """(dmarc result, header.from) in the oldest ARC-Authentication-Results."""
        if not self.chain.sets:
            return "", ""
        field = self.chain.sets[0].results_field()
        for method, result, props in (field.results or ()) if field else ():
            if method == "dmarc":
                return result, props.get("header.from", "")
        return "", ""

    def describe(self) -> str:
        """`arc=pass as[2].d=lists.example as[1].d=fwd.example` (newest first)."""
        return arc.ArcResult(self.result, chain=self.chain).describe()


def trusted_forwarding(evidence: ArcEvidence, author: str, trusted: DomainList) -> str:
    """The report comment for a trusted_forwarder override of a failure from `author`,
    "" when the chain does not earn one."""
    if evidence.result != arc.PASS or not evidence.chain.sets or not trusted:
        return ""
    if not all(sealer in trusted for sealer in evidence.chain.sealers):
        return ""
    result, header_from = evidence.oldest_dmarc
    if result != "pass":
        return ""
    if header_from and normalize_id(header_from) != normalize_id(author):
        return ""  # a pass for another From domain says nothing of this one
    return evidence.describe()

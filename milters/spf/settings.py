"""[spf] settings: which identities are checked, what each result leads to, who is skipped.

Each key has a place for a postfix-policyd-spf-python option (README.md maps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from milters.core.config import FilterSettings, check_networks, setting

# When an identity's result refuses the recipients (policyd-spf's HELO_reject and
# Mail_From_reject): fail; softfail or fail; not_pass: anything but pass, none
# and temperror (neutral, softfail, fail, permerror: policyd-spf's SPF_Not_Pass);
# never (results are only reported); no_check (not evaluated).
# "null" (HELO only): reject a HELO fail only when MAIL FROM is the null sender.
Reject = Literal["fail", "softfail", "not_pass", "never", "no_check"]
HeloReject = Literal["fail", "softfail", "not_pass", "null", "never", "no_check"]
OnTempError = Literal["accept", "tempfail"]
OnPermError = Literal["accept", "reject"]


@dataclass(frozen=True)
class SpfSettings(FilterSettings):
    """[spf]: check the HELO name and MAIL FROM against SPF (RFC 7208)."""

    mail_from_reject: Reject = setting(
        "fail",
        "MAIL FROM results that refuse the recipients (550 5.7.23): fail, softfail "
        "(softfail or fail), not_pass (anything but pass, none and temperror), never "
        "(report only), no_check (policyd-spf Mail_From_reject)",
    )
    helo_reject: HeloReject = setting(
        "fail",
        "HELO results that refuse the recipients: fail, softfail, not_pass, null (a fail "
        "only with the null sender), never, no_check (policyd-spf HELO_reject)",
    )
    on_temperror: OnTempError = setting(
        "accept",
        "a DNS failure during the check: accept (spf=temperror reported) or tempfail "
        "(451 4.4.3, policyd-spf TempError_Defer)",
    )
    on_permerror: OnPermError = setting(
        "accept",
        "a broken SPF record: accept (spf=permerror reported) or reject (550 5.7.24, "
        "policyd-spf PermError_reject)",
    )
    skip_addresses: tuple[str, ...] = setting(
        (),
        "clients never checked, besides [global] internal_networks and SASL-authenticated "
        "ones: secondary MX hosts, forwarders (policyd-spf skip_addresses)",
        check_networks,
    )
    helo_result: bool = setting(
        False,
        "report the HELO check as a result of its own (spf=... smtp.helo=...) besides the "
        "MAIL FROM one, as policyd-spf does",
    )
    received_spf: bool = setting(
        False,
        "also add a Received-SPF header field, RFC 7208 §9.1 (policyd-spf Header_Type = SPF)",
    )

"""The `dkim` filter: DKIM signing and verification, and key tools; replaces OpenDKIM.

Modules: settings ([dkim] keys), keys (private keys, KeyTable/SigningTable),
message (the header as DKIM sees it, long-line folding), signing, verification,
filter (who is signed, who is verified, On-* actions), keytools (genkey, testkey).
"""

from milters.dkim.filter import DkimFilter, DkimSignFilter
from milters.dkim.settings import DkimSettings

__all__ = ["DkimFilter", "DkimSettings", "DkimSignFilter"]

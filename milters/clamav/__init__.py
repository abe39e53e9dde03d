"""The `clamav` filter: virus scanning through clamd, replacing clamav-milter.

Each message is sent whole (header and body, as received) to clamd with the
INSTREAM command, in chunks from the spooled body, so memory per connection
stays bounded. Several clamd back ends are tried in order (failover); a back
end that failed is tried last for `retry_after` seconds.

What a virus gives is `on_virus` (reject, quarantine, discard, tag); what a
clamd failure gives is `on_fail` (tempfail or accept tagged, never silently);
a message over `max_scan_size` gives `on_oversize`. X-Virus-Scanned and
X-Virus-Status are written as clamav-milter writes them. No
Authentication-Results: there is no registered method for virus scanning.
"""

from milters.clamav.filter import ClamavFilter
from milters.clamav.settings import ClamavSettings

__all__ = ["ClamavFilter", "ClamavSettings"]

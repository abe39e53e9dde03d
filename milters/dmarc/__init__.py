"""The `dmarc` filter: DMARC evaluation (RFC 9989), history and aggregate reports
(RFC 9990), replacing OpenDMARC.

evaluate.py holds the decision as plain functions (Author Domain, policy
discovery by DNS Tree Walk or Public Suffix List, alignment); record.py parses
policy records; filter.py is the milter face; history.py the store of every
evaluation; report.py builds, checks and sends aggregate reports.
"""

from milters.dmarc.filter import DmarcFilter
from milters.dmarc.settings import DmarcSettings

__all__ = ["DmarcFilter", "DmarcSettings"]

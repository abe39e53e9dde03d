"""The `checks` filter: Postfix header_checks/body_checks and access tables, decoded.

Point it at existing `regexp:` and `pcre:` table files unchanged (conf/checks/ has
commented samples). The keys carry Postfix's names: header_checks,
mime_header_checks, nested_header_checks, body_checks, body_checks_size_limit;
plus filename_checks, client_checks, helo_checks, sender_checks,
recipient_checks and decode.

Every table Postfix 3.7 loads also loads here; lines Postfix skips are skipped
with its warning (tables.py, actions.py). Where we differ from Postfix, by
necessity or on purpose, is listed in the README's "Differences from Postfix"
section, which tests/e2e/test_checks_differential.py holds us to.
"""

from milters.checks.filter import ChecksFilter
from milters.checks.settings import ChecksSettings

__all__ = ["ChecksFilter", "ChecksSettings"]

"""The `checks` filter: Postfix header_checks/body_checks and access tables, decoded.

Point it at existing `regexp:` and `pcre:` table files unchanged (conf/checks/ has
commented samples). The keys carry Postfix's names: header_checks,
mime_header_checks, nested_header_checks, body_checks, body_checks_size_limit;
plus filename_checks, client_checks, helo_checks, sender_checks,
recipient_checks and decode.

Where we differ from Postfix 3.7, on purpose:
- Refused at load with file:line, where Postfix warns and skips the rule: unknown
  actions, FILTER, STRIP, a lone `$` or `$name` in the action text, broken or
  untranslatable patterns (a regexp: `\\d` is the letter d in POSIX; PCRE
  recursion, \\p{..}, verbs), unbalanced IF/ENDIF.
- Accepted as extensions in header/body checks: DEFER (450 4.7.1) and `4NN/5NN
  text`, which Postfix knows only in access tables.
- decode = true (default): RFC 2047 headers, text/* parts after base64/QP in their
  charset, and attachment names (filename_checks). decode = false is byte-exact.
- The blank line between the primary header and the body is not a body line
  (a milter never receives it); part-header blank lines are, as in Postfix.
- Captured groups ($1) in regexp: tables follow leftmost-first matching, not
  POSIX leftmost-longest, when an alternation inside the group could match
  different lengths; whether a rule matches is the same.
- Stage tables (client/helo/sender/recipient_checks) each act like one
  check_*_access restriction; REJECT replies use Postfix's access-map wording.
"""

from milters.checks.filter import ChecksFilter
from milters.checks.settings import ChecksSettings

__all__ = ["ChecksFilter", "ChecksSettings"]

"""The `spf` filter: SPF checks of HELO and MAIL FROM (RFC 7208), replacing policyd-spf.

Modules: settings ([spf] keys), filter (who is checked, what each result
leads to, Authentication-Results and Received-SPF). The evaluation itself is
core/spf_eval.py, shared with the dmarc filter's self-validation.
"""

from milters.spf.filter import SpfFilter
from milters.spf.settings import SpfSettings

__all__ = ["SpfFilter", "SpfSettings"]

"""milters: one suite of mail filters for Postfix (DKIM, SPF, DMARC, ClamAV, checks)."""

__version__ = "0.1.0"

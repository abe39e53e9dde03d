"""The one DNS resolver every filter's lookups go through, and adapters for libraries.

Built from [global.dns] (nameservers, port, timeout; empty: /etc/resolv.conf), so
a site or a test can point the whole suite at a resolver on any address and
port. Answers are cached by dnspython's thread-safe cache (libmilter calls from
many threads), with a plain dictionary of positive answers in front of it: the
same few names (a sender's SPF record, its DMARC record, a signer's key) are asked
for several times per message, and dnspython's resolve() costs about 60 us even
when it answers from its cache (more for a cached NXDOMAIN, which it raises anew
each time). Negative answers are kept for the TTL dnspython gives them (RFC 2308:
the SOA's, or its 300 s default without one), so the dictionary answers exactly
as dnspython's cache would, only cheaper. Timeouts and server failures are
TempError, a name that does not exist, has no such record or cannot be a DNS name
at all is an empty answer, so callers can map them to the RFC results (temperror
versus none/permerror).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from milters.core.config import DnsSettings
from milters.core.errors import NeedsThread, TempError

MAX_CACHED_ANSWERS = 4096


class Resolver:
    """A configured dnspython resolver; thread-safe. Its settings are fixed at
    construction; `cache_only_thread` is set once per worker by the event loop."""

    def __init__(self, settings: DnsSettings) -> None:
        if settings.nameservers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = list(settings.nameservers)
            r.port = settings.port
        else:
            r = dns.resolver.Resolver(configure=True)
            if settings.port != 53:
                r.port = settings.port
        r.timeout = settings.timeout
        r.lifetime = settings.timeout
        r.cache = dns.resolver.Cache()  # its own lock: shared by every thread
        self._resolver = r
        self.settings = settings
        # (name, rdtype) -> (expires, records); [] for a name or type that does not
        # exist. Failures are not kept: they are asked again. A dict's get and set
        # are atomic under the GIL; a stale read only costs one more lookup.
        self._answers: dict[tuple[str, str], tuple[float, list[dns.rdata.Rdata]]] = {}
        # The Python core's event loop thread (core/eventloop.py), which must not
        # wait on the network: there a lookup the cache cannot answer raises
        # NeedsThread, and the loop runs the step again in a thread.
        self.cache_only_thread = 0

    @property
    def dnspython(self) -> dns.resolver.Resolver:
        """The underlying resolver, for libraries that take one."""
        return self._resolver

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Records of `rdtype` at `name`; [] for NXDOMAIN or no data; TempError otherwise."""
        key = (name.lower(), rdtype)
        hit = self._answers.get(key)
        if hit is not None and hit[0] > time.time():
            return list(hit[1])
        if self.cache_only_thread and threading.get_ident() == self.cache_only_thread:
            raise NeedsThread(f"DNS {rdtype} {name}")
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            self._keep(key, _negative_expiry(list(exc.kwargs.get("responses", {}).values())), [])
            return []
        except dns.resolver.NoAnswer as exc:
            self._keep(key, _negative_expiry([exc.kwargs.get("response")]), [])
            return []
        except dns.resolver.NoNameservers as exc:
            raise TempError(f"DNS {rdtype} {name}: no server answered ({exc})") from None
        except dns.exception.Timeout:
            raise TempError(f"DNS {rdtype} {name}: timed out after "
                            f"{self.settings.timeout:g} s") from None
        except (dns.exception.SyntaxError, dns.name.NameTooLong, dns.name.IDNAException,
                UnicodeError):
            # A name that cannot be a DNS name (label over 63 bytes, empty label, over
            # 255 bytes, bad escape, not encodable) exists nowhere, now or later: an
            # empty answer (permanent), never a temperror that invites retrying.
            return []
        except dns.exception.DNSException as exc:
            raise TempError(f"DNS {rdtype} {name}: {type(exc).__name__}: {exc}") from None
        records = list(answer)
        self._keep(key, answer.expiration, records)
        return records

    def _keep(self, key: tuple[str, str], expires: float | None,
              records: list[dns.rdata.Rdata]) -> None:
        if expires is None:
            return
        if len(self._answers) >= MAX_CACHED_ANSWERS:
            self._answers.clear()  # crude but bounded; dnspython's cache remains
        self._answers[key] = (expires, records)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record at `name`, its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]  # type: ignore[attr-defined]

    def dkim_dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        """The `dnsfunc` dkimpy takes: first TXT record at `name`, None when there is none.

        A TempError propagates, so that the caller can tell temperror from a
        missing key (dkimpy would read None as "no key": permerror).
        """
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.txt(text.rstrip("."))
        return records[0] if records else None


def _negative_expiry(responses: list[Any]) -> float | None:
    """When a negative answer stops being valid: the TTL dnspython's own cache
    gives it (RFC 2308 §5: the SOA's TTL capped by its MINIMUM field). None when
    the response is not there to tell (it is then not kept)."""
    try:
        ttl = min(r.resolve_chaining().minimum_ttl for r in responses)
    except (ValueError, dns.exception.DNSException, AttributeError, KeyError):
        return None
    return time.time() + ttl if ttl > 0 else None

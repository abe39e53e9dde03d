"""Milter socket specs as administrators write them, normalised for libmilter; and
the kernel's timeouts on a blocking socket.

Accepted: `inet:PORT@HOST` (OpenDKIM, libmilter), `inet:HOST:PORT` (Postfix
smtpd_milters), `inet6:PORT@HOST`, `inet6:[HOST]:PORT`, `unix:/path`, `local:/path`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

_TIMEVAL = struct.Struct("@ll")  # struct timeval on Linux


def kernel_timeval(seconds: float) -> bytes:
    """`seconds` as the struct timeval of SO_RCVTIMEO and SO_SNDTIMEO."""
    whole = int(seconds)
    # At least a microsecond: a zero timeval means wait for ever.
    return _TIMEVAL.pack(whole, max(int((seconds - whole) * 1_000_000), 0 if whole else 1))


def set_timeouts(sock: socket.socket, timeval: bytes, *, send: bool = True,
                 receive: bool = True) -> None:
    """How long a blocking socket's writes and reads may wait (kernel_timeval).

    The kernel's timeouts rather than settimeout(), which makes Python poll()
    before every connect, send and recv. A wait that runs out fails with EAGAIN
    (BlockingIOError; EINPROGRESS for connect)."""
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    if receive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class SocketSpec:
    family: str  # "inet", "inet6" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def libmilter(self) -> str:
        """The form libmilter's smfi_setconn takes."""
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}@{self.host}"

    @property
    def postfix(self) -> str:
        """The form Postfix's smtpd_milters takes."""
        if self.family == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.family == "inet6" else self.host
        return f"{self.family}:{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.family == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.postfix


def parse_socket(spec: str) -> SocketSpec:
    """Parse a socket spec; ValueError says what is wrong and what is allowed."""
    allowed = "expected inet:PORT@HOST, inet:HOST:PORT, inet6:PORT@HOST or unix:/PATH"
    family, sep, rest = spec.strip().partition(":")
    family = family.lower()
    if not sep or not rest:
        raise ValueError(f"bad socket {spec!r}: {allowed}")
    if family in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"bad socket {spec!r}: a unix socket needs an absolute path")
        return SocketSpec("unix", path=rest)
    if family not in ("inet", "inet6"):
        raise ValueError(f"bad socket {spec!r}: unknown family {family!r}; {allowed}")
    if "@" in rest:
        port_text, _, host = rest.partition("@")
    else:
        host, _, port_text = rest.rpartition(":")
        if not host and family == "inet":
            host = "127.0.0.1"
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad socket {spec!r}: port must be 1-65535; {allowed}")
    if not host:
        raise ValueError(f"bad socket {spec!r}: no host; {allowed}")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(
                f"bad socket {spec!r}: {host!r} is not an address or host name"
            ) from None
    else:
        if family == "inet" and addr.version == 6:
            family = "inet6"
    return SocketSpec(family, host=host, port=int(port_text))

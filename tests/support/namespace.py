"""Run a program that only reads /etc/resolv.conf (OpenDMARC, dkimpy-milter) against
the loopback DNS server: in a private mount namespace (`unshare -m`) where a
resolv.conf naming that server is bind-mounted over the real one. The machine's
resolver is untouched; it needs root and unshare.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The loopback DNS server's address when it must listen on port 53 (the programs
# above cannot query another port): tests.support.dns.dns_server(DNS53, 53).
DNS53 = "127.0.0.153"


def private_resolver_usable(binary: str) -> bool:
    """Whether `binary` can be run by private_resolver_argv: it and unshare exist, root."""
    return shutil.which(binary) is not None and shutil.which("unshare") is not None \
        and os.geteuid() == 0


def private_resolver_argv(d: Path, nameserver: str, command: str) -> list[str]:
    """argv running shell `command` with d/resolv.conf (written here, naming
    `nameserver`) mounted over /etc/resolv.conf."""
    (d / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")
    return ["unshare", "-m", "sh", "-c",
            f"mount --bind {d}/resolv.conf /etc/resolv.conf && exec {command}"]

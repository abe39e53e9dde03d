"""OpenDMARC as a test peer: a work directory it accepts and one instance on it.

The interop tests (tests/protocol/test_dmarc_opendmarc*.py) start OpenDMARC the
same way: trusting our authserv-id's results, no SPF of its own, the Public
Suffix List of the `publicsuffixlist` package, no host ignored, DNS from our
loopback server through a private resolver (tests/support/namespace.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import publicsuffixlist

from tests.support.namespace import private_resolver_argv
from tests.support.processes import ProcessFactory, free_port

PUBLIC_SUFFIX_LIST = Path(publicsuffixlist.__file__).parent / "public_suffix_list.dat"


def opendmarc_directory(directory: Path) -> Path:
    """`directory` made readable to OpenDMARC, with its (empty) IgnoreHosts file."""
    os.chmod(directory, 0o755)
    (directory / "ignore").write_text("")
    return directory


def start_opendmarc(factory: ProcessFactory, directory: Path, dns_address: str,
                    authserv_id: str, enforce: bool = False) -> str:
    """One OpenDMARC on a free port; its milter socket spec. `enforce`: p=reject
    refused (RejectFailures), p=quarantine held (HoldQuarantinedMessages)."""
    port = free_port()
    conf = directory / f"opendmarc-{'enforce' if enforce else 'report'}.conf"
    flag = str(enforce).lower()
    conf.write_text(
        f"Socket inet:{port}@127.0.0.1\nAuthservID {authserv_id}\n"
        f"TrustedAuthservIDs {authserv_id}\nPublicSuffixList {PUBLIC_SUFFIX_LIST}\n"
        f"SPFSelfValidate false\nIgnoreHosts {directory}/ignore\n"
        f"RejectFailures {flag}\nHoldQuarantinedMessages {flag}\nRequiredHeaders false\n"
        "Syslog false\nBackground false\n")
    factory.start(private_resolver_argv(directory, dns_address, f"opendmarc -f -c {conf}"),
                  port)
    return f"inet:{port}@127.0.0.1"

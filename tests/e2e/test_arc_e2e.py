"""ARC behind real Postfix (dkim, dmarc, dkim-sign on three sockets): a p=reject
message that passed DMARC at a trusted mailing list, then was altered by it
(subject tag, footer) and sealed, is accepted with the trusted_forwarder override
in the history; the same from an untrusted sealer gets 550; and what we deliver
carries our own ARC set, which dkimpy validates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from milters.core.config import DnsSettings
from milters.core.resolver import Resolver
from milters.dkim.keytools import genkey
from milters.dmarc.history import SqliteHistory
from tests.e2e.filters import StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.arc import Sealer, seal
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import wait_until

OURS = "test.example"
RCPT = f"user@{OURS}"
LIST = Sealer("lists.example")
ROGUE = Sealer("rogue.example", n=1)
FROM_LIST = {"ADDR": "198.51.100.7", "NAME": "mx.lists.example", "HELO": "mx.lists.example"}
MESSAGE = (b"From: Alice <alice@bank.example>\r\nTo: team@lists.example\r\n"
           b"Subject: statement\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <e2e@bank.example>\r\n\r\nYour statement is ready.\r\n")


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def history(postfix: PostfixInstance, start_filter: StartFilter, dns: LoopbackDNS,
            tmp_path: Path) -> Path:
    made = genkey(OURS, "seal", "rsa", 2048, str(tmp_path))
    dns.txt(f"seal._domainkey.{OURS}", made.key.dns_record())
    dns.txt("_dmarc.bank.example", "v=DMARC1; p=reject")
    LIST.publish(dns)
    ROGUE.publish(dns)
    common = f'[global]\nauthserv_id = "mx.test.example"\n{dns.toml()}\n[spf]\nenabled = false\n'
    dkim_table = (f'[dkim]\ndomain = "{OURS}"\nselector = "seal"\n'
                  f'key_file = "{tmp_path}/seal.private"\narc_seal = "all"\n')
    path = tmp_path / "history.sqlite"
    dmarc_table = (f'[dmarc]\nreject_failures = true\nhistory = "{path}"\n'
                   'trusted_arc_sealers = ["lists.example"]\n')
    dkim_ = start_filter("dkim", common + dkim_table + dmarc_table)
    dmarc = start_filter("dmarc", common + dkim_table + dmarc_table)
    signer = start_filter("dkim-sign", common + dkim_table + dmarc_table)
    postfix.set_milters([dkim_.socket, dmarc.socket, signer.socket])
    return path


def list_copy(sealer: Sealer) -> bytes:
    edited = (MESSAGE.replace(b"Subject: statement", b"Subject: [team] statement")
              + b"--\r\nteam mailing list\r\n")
    return seal(edited, sealer, "dmarc=pass header.from=bank.example")


def test_trusted_list_accepted_untrusted_refused(postfix: PostfixInstance, history: Path,
                                                 dns: LoopbackDNS) -> None:
    sent = postfix.send("team-bounces@lists.example", [RCPT], list_copy(LIST),
                        xclient=FROM_LIST)
    assert sent.accepted, sent
    [delivered] = postfix.wait_delivered(1)
    results = " ".join(" ".join(delivered.get_all("Authentication-Results")).split())
    assert "arc=pass header.oldest-pass=0 smtp.remote-ip=198.51.100.7" in results, results
    assert "dmarc=fail (p=reject dis=none override=trusted_forwarder)" in results, results
    store = SqliteHistory(str(history))
    assert wait_until(lambda: any(e.override for e in store.entries(0, 2**40)), 5)
    [row] = store.entries(0, 2**40)
    assert (row.override, row.override_comment) == ("trusted_forwarder",
                                                    "arc=pass as[1].d=lists.example")
    # What we delivered carries our seal over our results: dkimpy validates it.
    raw = delivered.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    lookup = Resolver(DnsSettings(nameservers=("127.0.0.1",), port=dns.port)).dkim_dnsfunc
    cv, sets, reason = dkim.arc_verify(raw, dnsfunc=lookup)
    assert (cv, reason) == (b"pass", "success")
    assert sorted(s["as-domain"] for s in sets) == [b"lists.example", OURS.encode()]

    refused = postfix.send("team-bounces@rogue.example", [RCPT], list_copy(ROGUE),
                           xclient=FROM_LIST)
    assert not refused.accepted and refused.data is not None
    assert refused.data.code == 550 and "5.7.1" in refused.data.text

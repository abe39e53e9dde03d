"""The clamav filter behind real Postfix with a real clamd (test signatures only):
what the SMTP client, the mailbox, the hold queue and the filter's log see."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.e2e.filters import RunningFilter, StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.clamd import Clamd, eicar_in_body, eicar_zip, message

pytest_plugins = ("tests.support.clamd_plugin",)

SENDER = "sender@sender.example"
RCPT = "user@test.example"

ClamavFactory = Callable[..., RunningFilter]
ONLY_CLAMAV = "".join(f"[{n}]\nenabled = false\n" for n in ("dkim", "spf", "dmarc", "checks"))


@pytest.fixture
def clamav(postfix: PostfixInstance, start_filter: StartFilter, clamd: Clamd) -> ClamavFactory:
    """clamav(extra="", backend=clamd.tcp) starts `milters run clamav` against the
    test clamd and attaches it to Postfix."""

    def start(extra: str = "", backend: str = clamd.tcp) -> RunningFilter:
        flt = start_filter(
            "clamav",
            # clamav alone in smtpd_milters: the config says so (README), so it is
            # last in the chain and asks for its holds itself (core/hold.py).
            f'[global]\nauthserv_id = "mx.test.example"\n{ONLY_CLAMAV}'
            f'[clamav]\nclamd_sockets = ["{backend}"]\n{extra}\n',
        )
        postfix.set_milters([flt.socket])
        return flt

    return start


def test_virus_rejected_clean_mail_delivered_tagged(
    postfix: PostfixInstance, clamav: ClamavFactory
) -> None:
    flt = clamav()
    result = postfix.send(SENDER, [RCPT], eicar_zip())
    assert result.data is not None and result.data.code == 550, result
    assert re.fullmatch(r"5\.7\.1 message rejected: virus Eicar-Test-\S+\.UNOFFICIAL found",
                        result.data.text), result.data
    assert postfix.queue_ids() == []
    ok = postfix.send(SENDER, [RCPT], message(headers="X-Virus-Status: Clean (forged)\r\n"))
    assert ok.accepted, ok
    [delivered] = postfix.wait_delivered(1)
    assert delivered.get_all("X-Virus-Status") == ["Clean"]
    assert delivered.get_all("X-Virus-Scanned")[0].endswith(" at mx.test.example")
    # The log line: queue id, virus name, back end, scan time.
    out = flt.output()
    assert re.search(r"queue_id=\S+ filter=clamav stage=eom .*verdict=reject 550 5\.7\.1 .*"
                     r"\[virus=Eicar-Test-\S+ clamd=tcp:127\.0\.0\.1:\d+ bytes=\d+ "
                     r"scan_ms=[\d.]+\]", out), out
    assert re.search(rf"queue_id={ok.queue_id} filter=clamav stage=eom .*verdict=accept "
                     r"\[clean clamd=tcp:\S+ bytes=\d+ scan_ms=[\d.]+\]", out), out


def test_quarantine_lands_in_the_hold_queue(
    postfix: PostfixInstance, clamav: ClamavFactory
) -> None:
    clamav('on_virus = "quarantine"')
    result = postfix.send(SENDER, [RCPT], eicar_in_body())
    assert result.accepted, result
    assert postfix.wait_held(1) == [result.queue_id]
    assert postfix.delivered() == []


def test_clamd_down_defers(postfix: PostfixInstance, clamav: ClamavFactory) -> None:
    clamav(backend="tcp:127.0.0.1:1")  # nothing listens on port 1
    result = postfix.send(SENDER, [RCPT], message())
    assert result.data is not None and result.data.code == 451, result
    assert result.data.text.startswith("4.3.0 ")

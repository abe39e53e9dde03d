"""The clamav filter as an administrator runs it: `milters run clamav` on a loopback
port, talking to a real clamd (test signatures only), driven over the milter protocol."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind
from tests.support.clamd import Clamd, eicar_attachment, eicar_in_body, eicar_zip, message
from tests.support.processes import ProcessFactory, free_port

pytest_plugins = ("tests.support.clamd_plugin",)

ROOT = Path(__file__).resolve().parents[2]

Start = Callable[..., str]


@pytest.fixture(scope="module")
def factory() -> Iterator[ProcessFactory]:
    with ProcessFactory() as f:
        yield f


@pytest.fixture(scope="module")
def start(factory: ProcessFactory, tmp_path_factory: pytest.TempPathFactory,
          clamd: Clamd) -> Start:
    """start(extra="", sockets=None) -> socket spec of a running `milters run clamav`."""

    def run(extra: str = "", sockets: tuple[str, ...] | None = None) -> str:
        d = tmp_path_factory.mktemp("clamav")
        port = free_port()
        backends = ", ".join(f'"{s}"' for s in (sockets or (clamd.tcp,)))
        (d / "milters.toml").write_text(
            '[global]\nauthserv_id = "mx.test.example"\n'
            # Alone, as deployed alone: last in its chain, it holds itself (core/hold.py).
            + "".join(f"[{n}]\nenabled = false\n" for n in ("dkim", "spf", "dmarc", "checks"))
            + f'[clamav]\nsocket = "inet:{port}@127.0.0.1"\n'
            f"clamd_sockets = [{backends}]\nscan_timeout = 5.0\n{extra}\n"
        )
        argv = [sys.executable, "-m", "milters", "run", "clamav", "--config",
                str(d / "milters.toml")]
        factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return f"inet:{port}@127.0.0.1"

    return run


@pytest.fixture(scope="module")
def clamav(start: Start) -> str:
    return start()


def send(spec: str, raw: bytes, **envelope: str) -> ProbeResult:
    env = Envelope(client_ip=envelope.pop("client_ip", "198.51.100.7"),
                   client_name="mail.sender.example", mail_from="sender@sender.example",
                   rcpt_to=["user@test.example"], **envelope)
    return probe(spec, raw, env, timeout=15)


def added(r: ProbeResult) -> dict[str, str]:
    return {e.name: e.value.strip() for e in r.header_edits
            if e.kind in (EditKind.ADD, EditKind.INSERT)}


def test_negotiates_header_and_body_only(clamav: str) -> None:
    r = send(clamav, message())
    n = r.negotiated
    assert n.wants("header") and n.wants("body")
    # Earlier stages are only collected (for the log line), never answered.
    assert not any(n.replies(s) for s in ("connect", "helo", "mail", "rcpt", "body"))
    assert "QUARANTINE" in n.action_names and "CHGBODY" not in n.action_names


def test_clean_message_tagged_clean(clamav: str) -> None:
    r = send(clamav, message())
    assert r.verdict == "accept"
    assert added(r)["X-Virus-Status"] == "Clean"
    assert added(r)["X-Virus-Scanned"].startswith("milters-clamav ")
    assert added(r)["X-Virus-Scanned"].endswith(" at mx.test.example")


@pytest.mark.parametrize("raw", [eicar_in_body(), eicar_attachment(), eicar_zip()],
                         ids=["text-body", "base64-attachment", "zip-attachment"])
def test_virus_rejected_naming_it(clamav: str, raw: bytes) -> None:
    r = send(clamav, raw)
    assert r.verdict == "reject"
    assert r.smtp_reply.startswith("550 5.7.1 message rejected: virus Eicar-Test-")
    assert r.smtp_reply.endswith(".UNOFFICIAL found")


def test_quarantine_discard_tag(start: Start) -> None:
    hold = send(start('on_virus = "quarantine"'), eicar_in_body())
    assert hold.verdict == "accept" and hold.quarantine == "virus Eicar-Test-Body.UNOFFICIAL"
    assert added(hold)["X-Virus-Status"] == "Infected (Eicar-Test-Body.UNOFFICIAL)"
    assert send(start('on_virus = "discard"'), eicar_zip()).verdict == "discard"
    tag = send(start('on_virus = "tag"\nadd_headers = "add"'), eicar_attachment())
    assert tag.verdict == "accept" and not tag.quarantine
    assert added(tag)["X-Virus-Status"].startswith("Infected (Eicar-Test-")
    # "add" inserts right below Postfix's own Received field (milter index 1).
    assert {e.index for e in tag.header_edits} == {1}


def test_forged_status_replaced(clamav: str) -> None:
    r = send(clamav, message(headers="X-Virus-Status: Clean\r\n", body=eicar_in_body()))
    # The whole EICAR message as the body of another: still found.
    assert r.verdict == "reject"
    r = send(clamav, message(headers="X-Virus-Status: Infected (fake)\r\n"))
    deletes = [(e.name, e.index) for e in r.header_edits if e.kind is EditKind.DELETE]
    assert deletes == [("X-Virus-Status", 1)]
    assert added(r)["X-Virus-Status"] == "Clean"


def test_clamd_down(start: Start) -> None:
    dead = f"tcp:127.0.0.1:{free_port()}"
    r = send(start(sockets=(dead,)), message())
    assert r.verdict == "tempfail" and r.smtp_reply.startswith("451 4.3.0 ")
    r = send(start('on_fail = "accept"', sockets=(dead,)), message())
    assert r.verdict == "accept"
    assert added(r)["X-Virus-Status"] == "Not scanned (scanner unavailable)"
    assert "X-Virus-Scanned" not in added(r)  # no scan happened: claim none


def test_failover_to_the_unix_socket(start: Start, clamd: Clamd) -> None:
    spec = start(sockets=(f"tcp:127.0.0.1:{free_port()}", clamd.unix))
    assert send(spec, eicar_zip()).verdict == "reject"
    assert send(spec, message()).verdict == "accept"


def test_oversize(start: Start) -> None:
    big = message(b"z" * 40_000)
    r = send(start("max_scan_size = 20000"), big)
    assert r.verdict == "accept"
    assert added(r)["X-Virus-Status"] == "Not scanned (message too large)"
    assert "X-Virus-Scanned" not in added(r)
    r = send(start('max_scan_size = 20000\non_oversize = "tempfail"'), big)
    assert r.verdict == "tempfail" and r.smtp_reply.startswith("451 4.3.4 ")


def test_report_mode_changes_nothing(start: Start) -> None:
    r = send(start('mode = "report"'), eicar_in_body())
    assert r.verdict == "accept"
    assert "clamav would reject 550 5.7.1" in added(r)["X-Milters-Report"]


def test_skip_authenticated(start: Start) -> None:
    r = send(start("skip_authenticated = true"), eicar_in_body(), auth_user="alice")
    assert r.verdict == "accept" and r.header_edits == []

"""The shared adapter over real sockets: a scripted filter run by the real runner.

Each message says in `X-Test-Action` what the scripted filter decides, so these
tests check what the adapter makes of every kind of verdict: replies, header
edits, recipients, quarantine, body, policy (report mode, on_error, bypass),
negotiation, several messages per connection and broken clients.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.probe import ProbeResult, probe
from milters.client.session import MilterSession
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, wait_until

SCRIPTED = Path(__file__).parent / "filters" / "scripted.py"
ROOT = Path(__file__).resolve().parents[2]


def start_scripted(factory: ProcessFactory, *args: str, core: str = "libmilter"
                   ) -> ManagedProcess:
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "SCRIPTED_MILTER_CORE": core}
    return factory.start([sys.executable, str(SCRIPTED), str(port), *args], port, env=env)


@pytest.fixture(scope="module", params=["libmilter", "python", "eventloop"])
def core(request: pytest.FixtureRequest) -> str:
    """Every test runs under each milter core: libmilter (pymilter), and our own
    protocol loop (core/pyserver.py) with a thread per connection or from the
    event loop (core/eventloop.py); all drive the same adapter."""
    return str(request.param)


@pytest.fixture(scope="module")
def processes() -> Iterator[ProcessFactory]:
    with ProcessFactory() as factory:
        yield factory


@pytest.fixture(scope="module")
def enforce(processes: ProcessFactory, core: str) -> str:
    return f"inet:{start_scripted(processes, core=core).port}@127.0.0.1"


def message(action: str, extra: bytes = b"") -> bytes:
    return (
        b"From: a@example.com\r\nTo: u@example.com\r\nSubject: hi\r\n"
        b"X-Remove: x\r\n" + extra
        + f"X-Test-Action: {action}\r\n\r\nbody line\r\n".encode()
    )


Probe = Callable[..., ProbeResult]


def run(spec: str, action: str, extra: bytes = b"", **env: object) -> ProbeResult:
    envelope = Envelope(client_ip="192.0.2.9", mail_from="s@example.com",
                        **env)  # type: ignore[arg-type]
    return probe(spec, message(action, extra), envelope, timeout=15)


def test_accept_inserts_results_at_top(enforce: str) -> None:
    r = run(enforce, "none")
    assert r.verdict == "accept"
    ar = [e for e in r.header_edits if e.name == "Authentication-Results"]
    assert len(ar) == 1 and ar[0].kind is EditKind.INSERT and ar[0].index == 0
    assert "mx.test.example; x-scripted=pass body.size=11" in " ".join(ar[0].value.split())


def test_forged_results_with_our_authserv_id_are_removed(enforce: str) -> None:
    forged = (b"Authentication-Results: other.example; dkim=pass\r\n"
              b"Authentication-Results: MX.TEST.EXAMPLE; dmarc=pass\r\n")
    r = run(enforce, "none", forged)
    deletes = [e for e in r.header_edits if e.kind is EditKind.DELETE]
    assert [(e.name, e.index) for e in deletes] == [("Authentication-Results", 2)]


def test_reject_with_custom_text_and_percent(enforce: str) -> None:
    r = run(enforce, "reject")
    assert r.verdict == "reject" and r.smtp_reply == "550 5.7.1 scripted 100% reject"


def test_tempfail_and_discard(enforce: str) -> None:
    assert run(enforce, "tempfail").smtp_reply == "451 4.7.1 scripted tempfail"
    assert run(enforce, "discard").verdict == "discard"


def test_hold_is_quarantine(enforce: str) -> None:
    r = run(enforce, "hold")
    assert r.verdict == "accept" and r.quarantine == "scripted hold"


def test_header_and_recipient_edits(enforce: str) -> None:
    r = run(enforce, "edits", rcpt_to=["u@example.com", "drop@example.com"])
    ops = {(e.kind, e.name) for e in r.header_edits}
    assert {(EditKind.ADD, "X-Added"), (EditKind.INSERT, "X-Inserted"),
            (EditKind.CHANGE, "Subject"), (EditKind.DELETE, "X-Remove")} <= ops
    changes = {(c.kind, c.address) for c in r.recipient_changes}
    assert changes == {("delete", "<drop@example.com>"), ("add", "<added@example.com>")}


def test_body_replacement(enforce: str) -> None:
    assert run(enforce, "body").replaced_body == b"replaced body\r\n"


def test_rcpt_reject_refuses_only_that_recipient(enforce: str) -> None:
    r = run(enforce, "none", rcpt_to=["reject-me@example.com", "u@example.com"])
    assert r.verdict == "accept"
    assert r.rejected_recipients == {
        "reject-me@example.com": "550 5.1.1 <reject-me@example.com> refused"}


def test_bypass_recipient_split_into_own_transaction(enforce: str) -> None:
    r = run(enforce, "reject", rcpt_to=["u@example.com", "postmaster@example.com"])
    assert r.rejected_recipients["postmaster@example.com"].startswith("452 4.5.3")
    assert r.verdict == "reject"
    spared = run(enforce, "reject", rcpt_to=["postmaster@example.com"])
    assert spared.verdict == "accept"
    assert any(e.name == "X-Milters-Report" and "bypass" in e.value for e in spared.header_edits)


def test_error_in_filter_gives_tempfail_and_keeps_serving(enforce: str) -> None:
    r = run(enforce, "raise")
    assert r.verdict == "tempfail" and r.smtp_reply.startswith("451 4.3.0")
    assert run(enforce, "none").verdict == "accept"


def test_on_error_accept(processes: ProcessFactory, core: str) -> None:
    spec = f"inet:{start_scripted(processes, 'enforce', 'accept', core=core).port}@127.0.0.1"
    assert run(spec, "raise").verdict == "accept"


def test_report_mode_tags_and_changes_nothing(processes: ProcessFactory, core: str) -> None:
    spec = f"inet:{start_scripted(processes, 'report', core=core).port}@127.0.0.1"
    r = run(spec, "reject", rcpt_to=["reject-me@example.com", "u@example.com"])
    assert r.verdict == "accept" and not r.rejected_recipients
    report = [e for e in r.header_edits if e.name == "X-Milters-Report"]
    assert report and "would reject 550 5.7.1 scripted 100% reject" in report[0].value
    assert "reject-me@example.com" in " ".join(e.value for e in report)
    held = run(spec, "hold")
    assert held.quarantine == ""
    assert "scripted would quarantine (scripted hold)" in held.header_edits[-1].value


def test_negotiates_only_what_it_needs(enforce: str, core: str) -> None:
    r = run(enforce, "none")
    n = r.negotiated
    assert set(n.action_names) == {"ADDHDRS", "CHGHDRS", "ADDRCPT", "DELRCPT", "CHGBODY",
                                   "QUARANTINE"}
    assert n.leading_space
    assert n.wants("helo") and not n.replies("helo")  # taken for the log, not answered
    # Under libmilter DATA and end of header are answered on purpose (no delayed-ACK
    # stall); the Python core ACKs every read at once and needs neither reply.
    assert n.replies("data") == n.replies("eoh") == (core == "libmilter")
    assert not n.replies("header") and not n.replies("body")


def test_two_messages_on_one_connection(enforce: str) -> None:
    with MilterSession(enforce, timeout=15) as s:
        s.connect(Envelope(client_ip="192.0.2.7"))
        for action, expected in (("reject", "reject"), ("none", "accept")):
            s.mail("s@example.com")
            s.rcpt("u@example.com")
            replies = s.message(message(action))
            assert replies[-1].action == expected
            s.abort()


def test_client_vanishing_mid_message_does_not_hurt(enforce: str) -> None:
    s = MilterSession(enforce, timeout=15)
    s.open()
    s.connect(Envelope(client_ip="192.0.2.8"))
    s.mail("s@example.com")
    s.rcpt("u@example.com")
    s.header("Subject", b" cut")
    s.disconnect()
    assert run(enforce, "none").verdict == "accept"


def _dead(pid: int) -> bool:
    """Killed: gone, or a zombie its parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def test_prefork_workers_share_the_socket(processes: ProcessFactory, core: str) -> None:
    proc = start_scripted(processes, "enforce", "tempfail", "2", core=core)
    spec = f"inet:{proc.port}@127.0.0.1"
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    assert wait_until(lambda: len(children.read_text().split()) == 2, 10)
    for _ in range(6):
        assert run(spec, "none").verdict == "accept"
    # A dead worker is replaced; the other keeps serving meanwhile.
    victim = int(children.read_text().split()[0])
    os.kill(victim, signal.SIGKILL)
    # Until it is dead, the victim's accept() may still take our connection and
    # die with it (a reset): wait for the kill, not for the replacement.
    assert wait_until(lambda: _dead(victim), 10)
    assert run(spec, "none").verdict == "accept"
    assert wait_until(lambda: len(children.read_text().split()) == 2
                      and str(victim) not in children.read_text().split(), 15)
    assert "died: killed by SIGKILL" in proc.output()


def test_sigterm_drains_open_session(processes: ProcessFactory, core: str) -> None:
    proc = start_scripted(processes, core=core)
    assert f"milter core {'python (event' if core == 'eventloop' else core}" in proc.output()
    spec = f"inet:{proc.port}@127.0.0.1"
    s = MilterSession(spec, timeout=30)
    s.open()
    s.connect(Envelope(client_ip="192.0.2.8"))
    s.mail("s@example.com")
    s.rcpt("u@example.com")
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.5)  # let the stop reach the worker while our session is open
    replies = s.message(message("reject"))
    assert replies[-1].action == "reject"
    s.close()
    assert wait_until(lambda: proc.proc.poll() is not None, 30)
    assert proc.proc.returncode == 0

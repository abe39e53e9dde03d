"""The checks filter as an administrator runs it: `milters run checks` on a loopback
port with real table files, driven over the milter protocol; reloads on SIGHUP."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.errors import MilterClientError
from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

HEADER_CHECKS = """\
/^X-Mailer: GOTO Sarbacane/        REJECT I fight spam (GOTO Sarbacane)
/^Subject: .*virus notification/   DISCARD virus notification
/^Subject: \\[SPAM\\] (.*)/          REPLACE Subject: $1
/^X-Internal-Junk:/                IGNORE
/^X-Spam-Flag: YES/                HOLD flagged upstream
/^X-Tag-Me:/                       PREPEND X-Tagged: yes
/^X-Divert:/                       REDIRECT quarantine@example.com
"""
BODY_CHECKS = "/出会い系/ REJECT 5.7.1 dating spam\n"
RECIPIENT_CHECKS = "/^nobody@/ REJECT no such user here\n"

Start = Callable[..., tuple[ManagedProcess, str]]


@pytest.fixture(scope="module")
def factory() -> Iterator[ProcessFactory]:
    with ProcessFactory() as f:
        yield f


@pytest.fixture(scope="module")
def start(factory: ProcessFactory, tmp_path_factory: pytest.TempPathFactory) -> Start:
    def start(extra: str = "", header_checks: str = HEADER_CHECKS,
              checks_extra: str = "") -> tuple[ManagedProcess, str]:
        d = tmp_path_factory.mktemp("checks")
        (d / "header_checks").write_text(header_checks)
        (d / "body_checks").write_text(BODY_CHECKS)
        (d / "recipient_checks").write_text(RECIPIENT_CHECKS)
        port = free_port()
        (d / "milters.toml").write_text(
            f'[global]\nauthserv_id = "mx.test.example"\n{extra}\n'
            f'[checks]\nsocket = "inet:{port}@127.0.0.1"\n'
            f'header_checks = "regexp:{d}/header_checks"\n'
            f'body_checks = "regexp:{d}/body_checks"\n'
            f'recipient_checks = "regexp:{d}/recipient_checks"\n{checks_extra}\n'
        )
        config = str(d / "milters.toml")
        argv = [sys.executable, "-m", "milters", "run", "checks", "--config", config]
        proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return proc, f"inet:{port}@127.0.0.1"

    return start


@pytest.fixture(scope="module")
def checks(start: Start) -> str:
    return start()[1]


def send(spec: str, headers: str, body: bytes = b"hello\r\n",
         rcpt: tuple[str, ...] = ("u@example.com",)) -> ProbeResult:
    msg = ("From: a@example.com\r\nTo: u@example.com\r\n" + headers).encode() + b"\r\n" + body
    env = Envelope(client_ip="198.51.100.7", client_name="mail.example.net",
                   mail_from="a@example.com", rcpt_to=list(rcpt))
    return probe(spec, msg, env, timeout=15)


def test_clean_message_accepted_untouched(checks: str) -> None:
    r = send(checks, "Subject: hello\r\n")
    assert r.verdict == "accept" and r.header_edits == [] and r.quarantine == ""


def test_reject_with_custom_text(checks: str) -> None:
    r = send(checks, "X-Mailer: GOTO Sarbacane 4.0\r\n")
    assert r.verdict == "reject" and r.smtp_reply == "550 5.7.1 I fight spam (GOTO Sarbacane)"


def test_discard(checks: str) -> None:
    assert send(checks, "Subject: your virus notification\r\n").verdict == "discard"


def test_hold_is_quarantine(checks: str) -> None:
    r = send(checks, "X-Spam-Flag: YES\r\n")
    assert r.verdict == "accept" and r.quarantine == "flagged upstream"


def test_replace_ignore_prepend(checks: str) -> None:
    r = send(checks, "Subject: [SPAM] cheap\r\nX-Internal-Junk: 1\r\nX-Tag-Me: 1\r\n")
    edits = {(e.kind, e.name, e.value.strip(), e.index) for e in r.header_edits}
    assert (EditKind.CHANGE, "Subject", "cheap", 1) in edits
    assert (EditKind.DELETE, "X-Internal-Junk", "", 1) in edits
    # PREPEND goes right above the matched header, the 5th the filter saw; Postfix
    # counts its own hidden Received field as index 0, so that is index 5.
    assert (EditKind.INSERT, "X-Tagged", "yes", 5) in edits


def test_redirect(checks: str) -> None:
    r = send(checks, "X-Divert: 1\r\n", rcpt=("u@example.com", "v@example.com"))
    changes = {(c.kind, c.address) for c in r.recipient_changes}
    assert changes == {("delete", "<u@example.com>"), ("delete", "<v@example.com>"),
                       ("add", "<quarantine@example.com>")}


def test_recipient_checks_refuse_one_recipient(checks: str) -> None:
    r = send(checks, "Subject: hi\r\n", rcpt=("nobody@example.com", "u@example.com"))
    assert r.verdict == "accept"
    assert r.rejected_recipients["nobody@example.com"].startswith("554 5.7.1")
    assert "no such user here" in r.rejected_recipients["nobody@example.com"]


def test_decoded_base64_body_matches_utf8_rule(checks: str) -> None:
    text = "無料の出会い系サイトへようこそ\r\n".encode("shift_jis")
    body = base64.encodebytes(text).replace(b"\n", b"\r\n")
    r = send(checks, "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=Shift_JIS\r\n"
                     "Content-Transfer-Encoding: base64\r\n", body)
    assert r.verdict == "reject" and r.smtp_reply == "550 5.7.1 dating spam"


def test_report_mode(start: Start) -> None:
    _, spec = start('mode = "report"')
    r = send(spec, "X-Mailer: GOTO Sarbacane 4.0\r\n")
    assert r.verdict == "accept"
    assert any(e.name == "X-Milters-Report" and "would reject" in e.value
               for e in r.header_edits)


@pytest.mark.parametrize(("table", "rule", "rcpt"), [
    ("sender_checks", "/^a@example\\.com$/ REJECT no senders like you", "u@example.com"),
    ("client_checks", "/^198\\.51\\.100\\.7$/ REJECT not from there", "u@example.com"),
    ("helo_checks", "/^client\\.example$/ REJECT not that name", "u@example.com"),
    ("", "", "nobody@example.com"),  # the module's recipient_checks
])
def test_report_mode_reports_an_early_refusal_once(start: Start, tmp_path: Path, table: str,
                                                   rule: str, rcpt: str) -> None:
    """Issue 10: a stage-table REJECT in report mode gave two X-Milters-Report
    fields, the first nesting the text inside itself."""
    extra = ""
    if table:
        (tmp_path / table).write_text(rule + "\n")
        extra = f'{table} = "regexp:{tmp_path / table}"'
    _, spec = start('mode = "report"', checks_extra=extra)
    r = send(spec, "Subject: hi\r\n", rcpt=(rcpt,))
    assert r.verdict == "accept"
    reports = [e.value for e in r.header_edits if e.name == "X-Milters-Report"]
    assert len(reports) == 1, reports
    assert "would reject" in reports[0] and reports[0].count("would") == 1, reports


def test_sighup_reloads_tables_and_refuses_a_broken_one(start: Start) -> None:
    proc, spec = start()
    table = Path(proc.argv[-1]).parent / "header_checks"
    assert send(spec, "Subject: new rule\r\n").verdict == "accept"
    table.write_text(HEADER_CHECKS + "/^Subject: new rule/ REJECT 5.7.1 reloaded\n")
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in proc.output(), 20)
    assert wait_until(lambda: send(spec, "Subject: new rule\r\n").verdict == "reject", 20)

    # Only what Postfix cannot open either (a missing table) refuses a reload.
    table.unlink()
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in proc.output(), 20)
    assert f"{table} does not exist" in proc.output()
    # The running configuration stays in force.
    assert send(spec, "Subject: new rule\r\n").smtp_reply == "550 5.7.1 reloaded"


def test_a_line_postfix_skips_is_a_warning_and_strict_makes_it_an_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "hc").write_text("# comment\n/^Subject: (unclosed/ REJECT\n/^X: a/ WARN\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[checks]\nsocket = "inet:{free_port()}@127.0.0.1"\n'
                   f'header_checks = "regexp:{tmp_path}/hc"\n')
    base = [sys.executable, "-m", "milters", "check-config", "--config", str(cfg)]
    out = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # glibc's regerror() text, as Postfix logs it for a regexp: table
    assert f"# checks: warning: {tmp_path}/hc:2: Unmatched ( or \\(" in out.stdout
    assert "header_checks: regexp:" in out.stdout and "(1 rules)" in out.stdout
    out = subprocess.run([*base, "--strict"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 78
    assert f"{tmp_path}/hc:2" in out.stderr and "--strict" in out.stderr


def test_missing_table_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[checks]\nsocket = "inet:{free_port()}@127.0.0.1"\n'
                   f'header_checks = "regexp:{tmp_path}/hc"\n')
    out = subprocess.run([sys.executable, "-m", "milters", "run", "checks", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 78
    assert f"{tmp_path}/hc does not exist" in out.stderr


def test_ten_thousand_header_fields(checks: str) -> None:
    headers = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(10_000))
    r = send(checks, headers + "X-Mailer: GOTO Sarbacane\r\n")
    assert r.smtp_reply == "550 5.7.1 I fight spam (GOTO Sarbacane)"


def test_header_at_postfix_size_limit_and_8bit_junk(checks: str) -> None:
    # Postfix cuts a header at header_size_limit (102400 bytes) before a milter sees it.
    long_value = "x" * 102_000
    r = send(checks, f"X-Long: {long_value}\r\nSubject: \xff\xfe caf\xe9 [SPAM] hi\r\n")
    assert r.verdict == "accept"


def test_oversized_packet_gets_a_defined_answer(checks: str) -> None:
    """A 1 MB header line is beyond what libmilter accepts in one packet: the
    connection ends (Postfix then applies milter_default_action) and the filter
    keeps serving."""
    with pytest.raises(MilterClientError):
        send(checks, "X-Huge: " + "y" * 1_048_576 + "\r\n")
    assert send(checks, "Subject: after\r\n").verdict == "accept"

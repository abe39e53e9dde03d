"""The whole suite behind real Postfix: all five filters and the signing step, one
shared config, in both deployments: one socket per step (`milters run NAME` each, in
chain order for smtpd_milters and non_smtpd_milters) and chain mode (one `milters run
chain` socket, one dialogue). A real clamd, loopback DNS. Each scenario of issues 6
and 10 is one test run against each deployment; the filters are started once per
deployment (tests/e2e/suite.py has the set-up)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest

from milters.client.probe import probe
from milters.core.dkim_verify import verify_all
from milters.core.envelope import Envelope
from tests.e2e.postfix import PostfixInstance
from tests.e2e.suite import (
    ALIGNED,
    ALIGNED_HELO,
    ALIGNED_IP,
    AUTHSERV_ID,
    DEPLOYMENTS,
    FORGED,
    HEADER_REJECT,
    OURS,
    OUTSIDE_IP,
    QUARANTINING,
    RCPT,
    REFUSED_SENDER,
    REJECTING,
    TAG_SUBJECT,
    TAGGED,
    Keys,
    Suite,
    ar_text,
    dkim_sign,
    message,
    start_suite,
)
from tests.support.clamd import Clamd, eicar_zip
from tests.support.dns import LoopbackDNS
from tests.support.processes import ProcessFactory, free_port

pytest_plugins = ("tests.support.clamd_plugin",)

ALIGNED_CLIENT = {"ADDR": ALIGNED_IP, "NAME": ALIGNED_HELO, "HELO": ALIGNED_HELO}
OUTSIDE = {"ADDR": OUTSIDE_IP, "NAME": "mx.outside.example", "HELO": "mx.outside.example"}


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def enforcing(request: pytest.FixtureRequest, factory: ProcessFactory, workdir: Path,
              dns: LoopbackDNS, clamd: Clamd, keys: Keys) -> Suite:
    chain = request.param == "chain"
    return start_suite(factory, workdir / request.param, keys, dns, clamd.unix, chain=chain)


@pytest.fixture
def suite(postfix: PostfixInstance, enforcing: Suite) -> Suite:
    enforcing.attach(postfix)
    return enforcing


def all_results(raw_ar: list[str]) -> dict[str, list[str]]:
    """method -> results, from every Authentication-Results field."""
    found: dict[str, list[str]] = {}
    for method, result in re.findall(r"\b(dkim|spf|dmarc)=(\w+)", ar_text(raw_ar)):
        found.setdefault(method, []).append(result)
    return found


# --- signing ------------------------------------------------------------------------


def our_verifier(raw: bytes, dns: LoopbackDNS) -> list[tuple[str, str]]:
    """(result, algorithm) of each signature, from milters.core.dkim_verify."""
    records = dict(dns.resolver.records)

    def lookup(name: str) -> list[bytes]:
        rrs = records.get((name.rstrip(".").lower(), "TXT"), [])
        return [b"".join(bytes(s) for s in rr.data) for rr in rrs]

    wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    parsed = dkim.DKIM(wire)
    results, _ = verify_all(parsed.headers, parsed.body, lookup, 10, 1024)
    return [(r.result, r.algorithm) for r in results]


def opendkim_verifies(raw: bytes, keys: Keys, workdir: Path,
                      factory: ProcessFactory) -> list[tuple[str, str]]:
    """(result, header.a) of each dkim= result OpenDKIM writes for `raw`."""
    port = free_port()
    data = workdir / "opendkim-dnsdata"
    data.write_text("".join(f"{n} {v}\n" for n, v in keys.records.items()))
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Syslog no\nBackground no\nSocket inet:{port}@127.0.0.1\nMode v\n"
                    f"TestDNSData file:{data}\nAuthservID mx.opendkim.test\n"
                    "MinimumKeyBits 1024\n")
    proc = factory.start(["opendkim", "-f", "-x", str(conf)], port)
    try:
        wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        env = Envelope(client_ip=OUTSIDE_IP, client_name="mx.outside.example",
                       mail_from=f"alice@{OURS}", rcpt_to=["bob@example.net"])
        r = probe(f"inet:{port}@127.0.0.1", wire, env, timeout=15)
    finally:
        proc.kill()
    text = ar_text([e.value for e in r.header_edits if e.name == "Authentication-Results"])
    return [(m.group(1), a.group(1) if (a := re.search(r"header\.a=([\w-]+)", m.group(2)))
             else "") for m in re.finditer(r"dkim=(\w+)([^;]*)", text)]


@pytest.mark.parametrize("how", ["login", "submission"])
def test_authenticated_submission_is_signed_rsa_and_ed25519(
        postfix: PostfixInstance, suite: Suite, dns: LoopbackDNS, keys: Keys, workdir: Path,
        factory: ProcessFactory, how: str) -> None:
    raw = message(OURS, f"signed by {how}")
    if how == "login":
        result = postfix.send(f"alice@{OURS}", [RCPT], raw,
                              xclient={"ADDR": "203.0.113.9", "NAME": "laptop.example.net",
                                       "LOGIN": "alice"})
    else:
        result = postfix.send(f"alice@{OURS}", [RCPT], raw, port=postfix.submission_port,
                              xclient={"ADDR": "203.0.113.10", "NAME": "office.example.net"})
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert len(msg.get_all("DKIM-Signature")) == 2
    # Ours: no DMARC nor SPF verdict is taken on our own mail, and nothing refused it.
    assert sorted(our_verifier(msg.raw, dns)) == [("pass", "ed25519-sha256"),
                                                  ("pass", "rsa-sha256")]
    if how == "login" and shutil.which("opendkim"):
        assert sorted(opendkim_verifies(msg.raw, keys, workdir, factory)) == [
            ("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]


def test_a_checks_replace_of_a_signed_field_is_signed_after_it(
        postfix: PostfixInstance, suite: Suite, dns: LoopbackDNS, keys: Keys, workdir: Path,
        factory: ProcessFactory) -> None:
    """Issue 10: checks rewrites the Subject of submitted mail; the signatures are made
    after that edit, so they cover the Subject as delivered."""
    raw = message(OURS, f"quarterly figures {TAG_SUBJECT}")
    result = postfix.send(f"alice@{OURS}", [RCPT], raw, port=postfix.submission_port,
                          xclient={"ADDR": "203.0.113.10", "NAME": "office.example.net"})
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.get("Subject") == f"{TAGGED}quarterly figures"
    signatures = msg.get_all("DKIM-Signature")
    assert len(signatures) == 2 and all("subject" in s.lower() for s in signatures)
    assert sorted(our_verifier(msg.raw, dns)) == [("pass", "ed25519-sha256"),
                                                  ("pass", "rsa-sha256")]
    if shutil.which("opendkim"):
        assert sorted(opendkim_verifies(msg.raw, keys, workdir, factory)) == [
            ("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]


# --- DMARC ----------------------------------------------------------------------------


def test_p_reject_without_aligned_pass_is_refused_550(postfix: PostfixInstance,
                                                      suite: Suite) -> None:
    result = postfix.send(f"bounce@{REJECTING}", [RCPT], message(REJECTING, "no pass"),
                          xclient=OUTSIDE)
    assert result.data is not None, result
    assert result.data.code == 550, result
    assert result.data.text == f"5.7.1 rejected by the DMARC policy of {REJECTING}"
    assert postfix.queue_ids() == []


def test_p_quarantine_without_aligned_pass_is_held(postfix: PostfixInstance,
                                                   suite: Suite) -> None:
    result = postfix.send(f"bounce@{QUARANTINING}", [RCPT], message(QUARANTINING, "held"),
                          xclient=OUTSIDE)
    assert result.accepted, result
    assert postfix.wait_held(1) == [result.queue_id]
    assert postfix.delivered() == []
    # Nothing sits in the hold queue unscanned (issue 10).
    assert "X-Virus-Status: Clean" in _held_header(postfix, result.queue_id)


def _held_header(postfix: PostfixInstance, queue_id: str) -> str:
    out = subprocess.run(["postcat", "-c", str(postfix.config_dir), "-hq", queue_id],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


def test_held_mail_was_scanned_by_every_later_filter(postfix: PostfixInstance,
                                                     suite: Suite) -> None:
    """dmarc hands its hold on to the last filter: clamav tagged the held message,
    and no mark of ours is left in it (issue 10: no unscanned held mail)."""
    result = postfix.send(f"bounce@{QUARANTINING}", [RCPT], message(QUARANTINING, "held2"),
                          xclient=OUTSIDE)
    assert result.accepted, result
    [qid] = postfix.wait_held(1)
    header = _held_header(postfix, qid)
    assert "X-Virus-Status: Clean" in header, header
    assert "X-Milters-Hold" not in header, header
    assert "dmarc=fail" in header


def test_a_virus_from_a_quarantine_domain_is_rejected_not_held(
        postfix: PostfixInstance, suite: Suite) -> None:
    raw = eicar_zip().replace(b"From: sender@sender.example",
                              f"From: alice@{QUARANTINING}".encode())
    result = postfix.send(f"bounce@{QUARANTINING}", [RCPT], raw, xclient=OUTSIDE)
    assert result.data is not None and result.data.code == 550, result
    assert "virus" in result.data.text
    assert postfix.queue_ids() == []


def test_a_checks_reject_on_a_quarantine_message_rejects(postfix: PostfixInstance,
                                                         suite: Suite) -> None:
    result = postfix.send(f"bounce@{QUARANTINING}", [RCPT],
                          message(QUARANTINING, "win a prize"), xclient=OUTSIDE)
    assert result.data is not None and result.data.code == 550, result
    assert result.data.text == HEADER_REJECT
    assert postfix.queue_ids() == []


def test_a_forged_hold_mark_is_removed_and_holds_nothing(postfix: PostfixInstance,
                                                        suite: Suite) -> None:
    nopolicy = "nopolicy.example"
    extra = f"X-Milters-Hold: {AUTHSERV_ID}; dmarc: forged\r\n"
    result = postfix.send(f"bounce@{nopolicy}", [RCPT], message(nopolicy, "mark", extra),
                          xclient=OUTSIDE)
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.get_all("X-Milters-Hold") in (None, [])
    assert postfix.hold_queue() == []


def test_aligned_mail_passes_with_one_coherent_set_of_results(
        postfix: PostfixInstance, suite: Suite, workdir: Path) -> None:
    raw = dkim_sign(message(ALIGNED, "aligned"), ALIGNED, "sel",
                    workdir / ALIGNED / "sel.private")
    result = postfix.send(f"alice@{ALIGNED}", [RCPT], raw, xclient=ALIGNED_CLIENT)
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    fields = msg.get_all("Authentication-Results")
    # Every field is ours (one authserv-id), each method reported once.
    assert {f.split(";", 1)[0].strip() for f in fields} == {AUTHSERV_ID}, fields
    assert all_results(fields) == {"dkim": ["pass"], "spf": ["pass"], "dmarc": ["pass"]}
    text = ar_text(fields)
    assert f"header.d={ALIGNED}" in text
    assert f"smtp.mailfrom=alice@{ALIGNED}" in text
    assert f"dmarc=pass (p=reject dis=none) header.from={ALIGNED}" in text
    # Every filter saw and passed it: clamav tagged it.
    assert msg.get_all("X-Virus-Status") == ["Clean"]
    # Our fields sit above the Received field Postfix added (RFC 8601 §5).
    names = msg.header_names
    assert max(i for i, n in enumerate(names) if n == "Authentication-Results") < \
        names.index("Received")


def test_forged_dmarc_pass_from_outside_is_removed_and_ignored(
        postfix: PostfixInstance, suite: Suite) -> None:
    forged = (f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d={REJECTING}; "
              f"spf=pass smtp.mailfrom={REJECTING}; dmarc=pass header.from={REJECTING}\r\n")
    refused_and_removed(postfix, lambda d: forged.replace(REJECTING, d), "forged")


def refused_and_removed(postfix: PostfixInstance, forged: Callable[[str], str],
                        subject: str) -> None:
    """`forged(domain)`, a field claiming passes for domain: refused for the p=reject
    domain, and where no policy decides, gone from the delivered copy."""
    refused = postfix.send(f"bounce@{REJECTING}", [RCPT],
                           message(REJECTING, subject, forged(REJECTING)), xclient=OUTSIDE)
    assert refused.data is not None and refused.data.code == 550, refused
    nopolicy = "nopolicy.example"
    result = postfix.send(f"bounce@{nopolicy}", [RCPT],
                          message(nopolicy, f"{subject} 2", forged(nopolicy)), xclient=OUTSIDE)
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    fields = msg.get_all("Authentication-Results")
    # Only our three fresh results are left: the forged field is not delivered.
    assert all_results(fields) == {"dkim": ["none"], "spf": ["none"], "dmarc": ["none"]}, fields
    assert "pass" not in ar_text(fields)


# Issue 9: every way of writing our authserv-id (quoting, case, comments, version,
# folding, trailing dot), each claiming dkim, spf and dmarc pass for the domain.
FORGED_AR_FORMS = {
    "plain": "{id}; {res}",
    "upper": "{ID}; {res}",
    "quoted": '"{id}"; {res}',
    "quoted-version": '"{id}" 1; {res}',
    "quoted-comment-semicolon": '"{id}" (relay; checked); {res}',
    "comment-before-upper-quoted": '(a;b) "{ID}"; {res}',
    "nested-comments": "(a (b; c) d) {id} (e (f)); {res}",
    "folded": "\r\n\t{id}\r\n\t1;\r\n\t{res}",
    "trailing-dot": "{id}.; {res}",
    "quoted-trailing-dot-upper": '"{ID}."; {res}',
    "method-versions": "{id}; dkim/1 = pass header.d={d}; spf/1=pass smtp.mailfrom={d}",
    "broken-after-id": "{id}; {res}; ???",
}


@pytest.mark.parametrize("form", sorted(FORGED_AR_FORMS))
def test_forged_ar_matrix_never_gives_dmarc_pass(postfix: PostfixInstance, suite: Suite,
                                                 form: str) -> None:
    def forged(domain: str) -> str:
        res = (f"dkim=pass header.d={domain}; spf=pass smtp.mailfrom={domain}; "
               f"dmarc=pass header.from={domain}")
        value = FORGED_AR_FORMS[form].format(id=AUTHSERV_ID, ID=AUTHSERV_ID.upper(),
                                             res=res, d=domain)
        return f"Authentication-Results: {value}\r\n"

    refused_and_removed(postfix, forged, f"forged {form}")


# --- the other refusals -----------------------------------------------------------


def test_spf_fail_is_refused_at_rcpt(postfix: PostfixInstance, suite: Suite) -> None:
    result = postfix.send(f"alice@{FORGED}", [RCPT], message(FORGED, "spf fail"),
                          xclient=OUTSIDE)
    assert result.mail is not None and result.mail.code == 250, result
    reply = result.rcpts[RCPT]
    assert reply.code == 550 and reply.text.startswith("5.7.23 SPF fail"), result
    assert result.data is None


def test_eicar_is_refused(postfix: PostfixInstance, suite: Suite) -> None:
    result = postfix.send("sender@sender.example", [RCPT], eicar_zip(), xclient=OUTSIDE)
    assert result.data is not None and result.data.code == 550, result
    assert re.fullmatch(r"5\.7\.1 message rejected: virus Eicar-Test-\S+ found",
                        result.data.text), result.data
    assert postfix.queue_ids() == []


def test_header_checks_reject(postfix: PostfixInstance, suite: Suite) -> None:
    result = postfix.send("sender@sender.example", [RCPT],
                          message("sender.example", "you win a prize"), xclient=OUTSIDE)
    assert result.data is not None, result
    assert (result.data.code, result.data.text) == (550, "5.7.1 no prizes here")


def test_local_sendmail_goes_through_the_chain(postfix: PostfixInstance, suite: Suite,
                                               dns: LoopbackDNS) -> None:
    """non_smtpd_milters: local mail from our domain is signed and scanned."""
    postfix.sendmail(f"alice@{OURS}", [RCPT], message(OURS, "local").replace(b"\r\n", b"\n"))
    [msg] = postfix.wait_delivered(1)
    assert sorted(r for r, _ in our_verifier(msg.raw, dns)) == ["pass", "pass"]
    assert msg.get_all("X-Virus-Status") == ["Clean"]


# --- report mode ----------------------------------------------------------------------


@pytest.fixture(params=DEPLOYMENTS)
def reporting(request: pytest.FixtureRequest, postfix: PostfixInstance, workdir: Path,
              dns: LoopbackDNS, clamd: Clamd, keys: Keys) -> Iterator[Suite]:
    """A second set-up of the five filters with `[global] mode = "report"`."""
    factory = ProcessFactory()
    try:
        suite = start_suite(factory, workdir / f"report-{request.param}", keys, dns,
                            clamd.tcp, mode="report", chain=request.param == "chain")
        suite.attach(postfix)
        yield suite
    finally:
        factory.close()


def test_report_mode_passes_everything_and_only_tags(postfix: PostfixInstance,
                                                     reporting: Suite) -> None:
    cases = {
        "dmarc": (f"bounce@{REJECTING}", message(REJECTING, "report dmarc")),
        "spf": (f"alice@{FORGED}", message(FORGED, "report spf")),
        "clamav": ("sender@sender.example", eicar_zip()),
        "checks": ("sender@sender.example", message("sender.example", "win a prize now")),
        "sender": (REFUSED_SENDER, message("sender.example", "report sender")),
    }
    for name, (sender, raw) in cases.items():
        result = postfix.send(sender, [RCPT], raw, xclient=OUTSIDE)
        assert result.accepted, (name, result)
    held = postfix.send(f"bounce@{QUARANTINING}", [RCPT],
                        message(QUARANTINING, "report quarantine"), xclient=OUTSIDE)
    assert held.accepted, held
    delivered = postfix.wait_delivered(len(cases) + 1)
    assert postfix.hold_queue() == []
    fields = {m.get("Subject"): m.get_all("X-Milters-Report") for m in delivered}
    reports = {subject: " ".join(values) for subject, values in fields.items()}
    # Each filter says what it would have done; nothing else changed.
    assert reports["report dmarc"].startswith(
        f"dmarc would reject 550 5.7.1 rejected by the DMARC policy of {REJECTING}"), reports
    assert "would reject 550 5.7.23 SPF fail" in reports["report spf"], reports
    assert reports["files.zip"].startswith(
        "clamav would reject 550 5.7.1 message rejected: virus Eicar-Test-"), reports
    assert reports["win a prize now"].startswith(
        "checks would reject 550 5.7.1 no prizes here"), reports
    assert "quarantine" in reports["report quarantine"], reports
    # Issue 10 item 4: an early (MAIL-stage) checks refusal is reported once.
    assert len(fields["report sender"]) == 1, fields
    [sender] = fields["report sender"]
    assert sender.count("would reject") == 1 and "Sender address rejected: not you" in sender

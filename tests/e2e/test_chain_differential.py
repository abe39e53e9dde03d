"""Differential test of the two deployments and of `milters test` (issue 10).

One corpus of messages (signed and unsigned, forged Authentication-Results, p=reject
and p=quarantine domains, SPF fail, viruses, checks REJECT and REPLACE, submitted
mail that we sign) goes through real Postfix three times: in front of the five
filters and the signing step on their own sockets, in front of chain mode (one
`milters run chain` socket), and in front of chain mode served by the Python milter
core instead of libmilter. The SMTP answers, what was delivered or held and the delivered bytes
must be the same, ignoring what differs by time alone (Postfix's Received field with
its queue id, the signature's t= and therefore b=).

Then `milters test`'s live chain (offline.run_offline on registry.build_chain, what
the command prints) runs on each message with the envelope Postfix gave the filters,
and must give the answer Postfix gave and the header Postfix delivered or held.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from milters import registry
from milters.core.envelope import Envelope
from milters.core.model import parse_message
from milters.offline import Report, run_offline
from tests.e2e.postfix import MYHOSTNAME, PostfixInstance, Reply, SendResult
from tests.e2e.suite import (
    ALIGNED,
    ALIGNED_HELO,
    ALIGNED_IP,
    AUTHSERV_ID,
    FORGED,
    OURS,
    OUTSIDE_IP,
    QUARANTINING,
    RCPT,
    REFUSED_SENDER,
    REJECTING,
    TAG_SUBJECT,
    Keys,
    Suite,
    dkim_sign,
    message,
    start_suite,
)
from tests.support.clamd import Clamd, eicar_zip
from tests.support.dns import LoopbackDNS
from tests.support.processes import ProcessFactory, wait_until

pytest_plugins = ("tests.support.clamd_plugin",)

NOPOLICY = "nopolicy.example"
ALIGNED_CLIENT = {"ADDR": ALIGNED_IP, "NAME": ALIGNED_HELO, "HELO": ALIGNED_HELO}
OUTSIDE = {"ADDR": OUTSIDE_IP, "NAME": "mx.outside.example", "HELO": "mx.outside.example"}
OFFICE = {"ADDR": "203.0.113.10", "NAME": "office.example.net", "HELO": "office.example.net"}
LAPTOP = {"ADDR": "203.0.113.9", "NAME": "laptop.example.net", "HELO": "laptop.example.net",
          "LOGIN": "alice"}
# Fields Postfix adds on the way (delivery agent and its own trace field).
POSTFIX_FIELDS = {"return-path", "delivered-to", "x-original-to"}


@dataclass(frozen=True)
class Sent:
    """One message of the corpus and how it is sent."""

    name: str
    mail_from: str
    raw: bytes
    client: dict[str, str]
    submission: bool = False  # the submission service (daemon name ORIGINATING)
    rcpts: tuple[str, ...] = (RCPT,)


@dataclass
class Outcome:
    """What Postfix did with one message."""

    answer: str  # the refusing reply, or "accepted"
    state: str = ""  # delivered, held, refused
    header: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def _forged_ar(domain: str) -> str:
    return (f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d={domain}; "
            f"spf=pass smtp.mailfrom={domain}; dmarc=pass header.from={domain}\r\n")


BODIES = {
    "plain": "hello\r\n",
    "long": "".join(f"line {i} of a longer body, with some words\r\n" for i in range(60)),
    "mime": ("--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\nh\xe9llo w\xf6rld\r\n--b1--\r\n"),
    "folded": "hello again\r\n\r\n-- \r\nsig\r\n",
}
MIME_HEADER = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"


def corpus(keydir: Path) -> list[Sent]:
    """At least 50 messages: every scenario with each body shape."""
    sign_key = keydir / ALIGNED / "sel.private"
    out: list[Sent] = []
    for shape, body in BODIES.items():
        extra = MIME_HEADER if shape == "mime" else ""
        if shape == "folded":
            extra = "X-Folded: a field\r\n\tfolded over\r\n  three lines\r\n"

        def msg(domain: str, subject: str, more: str = "", _e: str = extra,
                _b: str = body, _s: str = shape) -> bytes:
            return message(domain, f"{subject} {_s}", more + _e, _b)

        def add(name: str, mail_from: str, raw: bytes, client: dict[str, str],
                submission: bool = False, _s: str = shape) -> None:
            out.append(Sent(f"{name}-{_s}", mail_from, raw, client, submission))

        add("aligned-signed", f"alice@{ALIGNED}",
            dkim_sign(msg(ALIGNED, "aligned"), ALIGNED, "sel", sign_key), ALIGNED_CLIENT)
        add("aligned-spf-only", f"alice@{ALIGNED}", msg(ALIGNED, "spf only"), ALIGNED_CLIENT)
        add("aligned-signed-outside", f"alice@{ALIGNED}",
            dkim_sign(msg(ALIGNED, "dkim only"), ALIGNED, "sel", sign_key), OUTSIDE)
        add("signed-then-altered", f"alice@{ALIGNED}",
            dkim_sign(msg(ALIGNED, "altered"), ALIGNED, "sel", sign_key)
            .replace(b"hello", b"HELLO", 1).replace(b"line 1 ", b"LINE 1 ", 1), OUTSIDE)
        add("reject-unsigned", f"bounce@{REJECTING}", msg(REJECTING, "no pass"), OUTSIDE)
        add("reject-forged-ar", f"bounce@{REJECTING}",
            msg(REJECTING, "forged", _forged_ar(REJECTING)), OUTSIDE)
        add("nopolicy-forged-ar", f"bounce@{NOPOLICY}",
            msg(NOPOLICY, "forged", _forged_ar(NOPOLICY)), OUTSIDE)
        add("quarantine", f"bounce@{QUARANTINING}", msg(QUARANTINING, "held"), OUTSIDE)
        add("quarantine-prize", f"bounce@{QUARANTINING}",
            msg(QUARANTINING, "win a prize"), OUTSIDE)
        add("quarantine-tagged", f"bounce@{QUARANTINING}",
            msg(QUARANTINING, f"held {TAG_SUBJECT}"), OUTSIDE)
        add("spf-fail", f"alice@{FORGED}", msg(FORGED, "spf fail"), OUTSIDE)
        add("prize", f"sender@{NOPOLICY}", msg(NOPOLICY, "you win a prize"), OUTSIDE)
        add("sender-checks", REFUSED_SENDER, msg("sender.example", "refused sender"), OUTSIDE)
        add("submitted-login", f"alice@{OURS}", msg(OURS, "signed login"), LAPTOP)
        add("submitted-tagged", f"alice@{OURS}", msg(OURS, f"figures {TAG_SUBJECT}"),
            OFFICE, submission=True)
        add("nopolicy-plain", f"bob@{NOPOLICY}", msg(NOPOLICY, "plain"), OUTSIDE)
    for where in ("nopolicy", "quarantine"):
        domain = NOPOLICY if where == "nopolicy" else QUARANTINING
        raw = eicar_zip().replace(b"From: sender@sender.example",
                                  f"From: alice@{domain}".encode())
        out.append(Sent(f"virus-{where}", f"bounce@{domain}", raw, OUTSIDE))
    return out


@pytest.fixture(scope="module")
def deployments(factory: ProcessFactory, workdir: Path, dns: LoopbackDNS, clamd: Clamd,
                keys: Keys) -> dict[str, Suite]:
    return {"sockets": start_suite(factory, workdir / "sockets", keys, dns, clamd.unix),
            "chain": start_suite(factory, workdir / "chain", keys, dns, clamd.unix,
                                 chain=True),
            # The same chain served by the Python milter core (core/pyserver.py).
            "python": start_suite(factory, workdir / "python", keys, dns, clamd.unix,
                                  chain=True, core="python")}


def _answer(result: SendResult) -> str:
    """The reply that refused the message, or 'accepted'."""
    replies: list[Reply | None] = [result.mail, *result.rcpts.values(), result.data]
    for reply in replies:
        if reply is not None and reply.code >= 400:
            return f"{reply.code} {reply.text}"
    return "accepted" if result.accepted else f"no answer: {result}"


def _unfold(value: str) -> str:
    return " ".join(value.split())


def _timeless(name: str, value: str) -> str:
    """A field's value without what changes with the clock alone."""
    value = _unfold(value)
    if name.lower() == "dkim-signature":
        value = re.sub(r"\bt=\d+", "t=T", value)
        value = re.sub(r"\bb=[^;]*", "b=B", value)
    return value


def _header(raw_header: bytes) -> list[tuple[str, str]]:
    """(name, value) of each field, minus what Postfix adds itself."""
    headers, _ = parse_message(raw_header if raw_header.endswith(b"\n\n") or
                               raw_header.endswith(b"\r\n\r\n") else raw_header + b"\r\n")
    out = []
    for h in headers:
        value = h.value.decode("utf-8", "replace")
        if h.name.lower() in POSTFIX_FIELDS:
            continue
        if h.name.lower() == "received" and "(Postfix)" in value:
            continue
        out.append((h.name, _timeless(h.name, value)))
    return out


def _postcat(postfix: PostfixInstance, option: str, queue_id: str) -> bytes:
    return subprocess.run(["postcat", "-c", str(postfix.config_dir), option, queue_id],
                          capture_output=True, timeout=30, check=True).stdout


def run_corpus(postfix: PostfixInstance, suite: Suite, sent: list[Sent]) -> dict[str, Outcome]:
    """Send every message, wait until each accepted one is delivered or held."""
    postfix.reset()
    suite.attach(postfix)
    outcomes: dict[str, Outcome] = {}
    queue_ids: dict[str, str] = {}
    for s in sent:
        result = postfix.send(s.mail_from, list(s.rcpts), s.raw, xclient=s.client,
                              port=postfix.submission_port if s.submission else None)
        outcomes[s.name] = Outcome(_answer(result), "refused")
        if result.accepted and result.queue_id:
            queue_ids[result.queue_id] = s.name
    wait_until(lambda: len(postfix.delivered()) + len(postfix.hold_queue()) >= len(queue_ids),
               60, interval=0.1)
    by_msgid = {}
    for m in postfix.delivered():
        by_msgid[m.get("Message-ID")] = m
    for s in sent:
        if outcomes[s.name].answer != "accepted":
            continue
        msgid = _message_id(s.raw)
        if msgid in by_msgid:
            m = by_msgid[msgid]
            head, _, body = m.raw.partition(b"\n\n")
            outcomes[s.name] = Outcome("accepted", "delivered", _header(head + b"\n\n"), body)
    for qid in postfix.hold_queue():
        name = queue_ids[qid]
        header = _postcat(postfix, "-hq", qid)
        header = b"".join(line for line in header.splitlines(keepends=True)
                          if not line.startswith(b"*** "))
        outcomes[name] = Outcome("accepted", "held", _header(header),
                                 _postcat(postfix, "-bq", qid))
    return outcomes


def _message_id(raw: bytes) -> str:
    headers, _ = parse_message(raw)
    return next(h.value.decode().strip() for h in headers if h.name.lower() == "message-id")


@pytest.fixture(scope="module")
def sent(keys: Keys) -> list[Sent]:
    """The corpus, made once: a signature made again would differ in t= and b=."""
    return corpus(keys.directory)


@pytest.fixture(scope="module")
def results(postfix_instance: PostfixInstance, deployments: dict[str, Suite],
            sent: list[Sent]) -> dict[str, dict[str, Outcome]]:
    try:
        return {name: run_corpus(postfix_instance, suite, sent)
                for name, suite in deployments.items()}
    finally:
        postfix_instance.reset()
        postfix_instance.configure()


def test_the_corpus_covers_every_scenario(sent: list[Sent],
                                          results: dict[str, dict[str, Outcome]]) -> None:
    assert len(sent) >= 50
    states = [o.state for o in results["sockets"].values()]
    assert {"delivered", "held", "refused"} <= set(states)
    assert states.count("delivered") >= 15 and states.count("held") >= 4
    assert states.count("refused") >= 20


@pytest.mark.parametrize("other", ["chain", "python"])
def test_both_deployments_answer_and_deliver_the_same(
        results: dict[str, dict[str, Outcome]], other: str) -> None:
    """Five sockets against chain mode, and against chain mode served by the
    Python milter core (`milter_core = "python"`)."""
    sockets, chain = results["sockets"], results[other]
    assert sockets.keys() == chain.keys()
    for name in sockets:
        a, b = sockets[name], chain[name]
        assert (a.answer, a.state) == (b.answer, b.state), name
        assert a.header == b.header, name
        assert a.body.replace(b"\r\n", b"\n") == b.body.replace(b"\r\n", b"\n"), name
        if a.state != "refused":
            assert any(n == "X-Virus-Status" for n, _ in a.header), (name, a.header)


def _envelope(s: Sent, queue_id: str) -> Envelope:
    """The envelope and macros Postfix gives the filters for `s` (tests/e2e/postfix.py:
    XCLIENT name and address, daemon name $myhostname, ORIGINATING on submission)."""
    macros = {"{daemon_name}": "ORIGINATING"} if s.submission else {}
    return Envelope(client_ip=s.client["ADDR"], client_name=s.client["NAME"],
                    helo=s.client["HELO"], mail_from=s.mail_from, rcpt_to=list(s.rcpts),
                    auth_user=s.client.get("LOGIN", ""), daemon_name=MYHOSTNAME,
                    queue_id=queue_id, macros=macros)


def _offline_answer(report: Report) -> tuple[str, str]:
    v = report.verdict
    if report.refused_rcpts and report.stage == "rcpt":
        v = report.refused_rcpts[-1][1]
    if v.final and v.reply is not None:
        return str(v.reply), "refused"
    return "accepted", "held" if (v.quarantine or report.plan.quarantine) else "delivered"


def test_milters_test_gives_what_postfix_did(sent: list[Sent], deployments: dict[str, Suite],
                                             results: dict[str, dict[str, Outcome]]) -> None:
    cfg = registry.load(str(deployments["sockets"].config_path))
    runtime = registry.build_chain(cfg)
    for s in sent:
        seen = results["sockets"][s.name]
        report = run_offline(runtime, s.raw, _envelope(s, "4AbCdEfGhJ"))
        assert _offline_answer(report) == (seen.answer, seen.state), (s.name, report)
        if seen.state != "refused":
            offline = [(h.name, _timeless(h.name, h.value.decode("utf-8", "replace")))
                       for h in report.final_header]
            assert offline == seen.header, s.name


def test_the_milters_test_command_prints_the_final_verdict(
        workdir: Path, sent: list[Sent], deployments: dict[str, Suite],
        results: dict[str, dict[str, Outcome]]) -> None:
    """The command itself, on a refused and a held message of the corpus."""
    config = str(deployments["sockets"].config_path)
    by_name = {s.name: s for s in sent}
    for name, expected in (("reject-forged-ar-plain", "reject 550 5.7.1"),
                           ("quarantine-plain", "quarantine")):
        s = by_name[name]
        path = workdir / f"{name}.eml"
        path.write_bytes(s.raw)
        proc = subprocess.run(
            [sys.executable, "-m", "milters", "test", "--config", config, "--client-ip",
             s.client["ADDR"], "--client-name", s.client["NAME"], "--helo", s.client["HELO"],
             "--from", s.mail_from, "--rcpt", RCPT, str(path)],
            capture_output=True, text=True, timeout=60)
        final = next(line for line in proc.stdout.splitlines() if "[chain] final" in line)
        assert expected in final, proc.stdout
        assert results["sockets"][name].state in ("refused", "held"), name

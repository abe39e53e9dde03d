"""Deterministic benchmark corpora: small text messages and messages with an attachment.

Two corpora, the same bytes on every run and every machine (a seeded
`random.Random`, no clock, no hostname):

- `small`: about 2 KB text/plain messages with the headers real mail carries:
  folded Received, To and References fields, a long folded DKIM-Signature on
  some, an ISO-2022-JP (RFC 2047 base64) Subject and body on one in five.
- `attachment`: multipart/mixed with a short text part and a 50 KB random
  attachment encoded in base64 (about 68 KB on the wire, 76-column lines).

One message in fifty (index 25, 75, ...) carries something the rule tables in
bench/tables/ REJECT (a spam subject, a blocked URL, an executable attachment
name), so about 2 % of messages are rejected and the rest pass through every
rule. `large_message()` makes the single 5 MB message the memory benchmark uses.

Run `python -m bench.corpus --out DIR` to write the corpora as .eml files.
"""

from __future__ import annotations

import argparse
import base64
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20261122
REJECT_EVERY = 50  # one message in 50 (2 %) meets a REJECT rule
REJECT_OFFSET = 25
ATTACHMENT_SIZE = 50 * 1024
LARGE_SIZE = 5 * 1024 * 1024

CORPORA = ("small", "attachment")

_WORD_TEXT = """
the meeting report budget quarter review draft schedule project team update
customer invoice shipment order delivery contract proposal agenda minutes
notes please find attached below regarding following week monday friday
thanks regards question answer issue ticket release version server backup
network storage planning office travel expense approval deadline summary
"""
_WORDS = tuple(_WORD_TEXT.split())
_NAMES = ("Alice Martin", "Bob Tanaka", "Carol Smith", "Dave Kowalski", "Eve Moreau",
          "Frank Okafor", "Grace Lee", "Heidi Novak", "Ivan Petrov", "Judy Garcia")
_DOMAINS = ("example.org", "example.net", "corp.example.com", "mail.example.co.jp",
            "lists.example.edu")
_MAILERS = ("Mozilla Thunderbird 115.5.0", "Microsoft Outlook 16.0", "Apple Mail (2.3774)",
            "Roundcube Webmail/1.6.5", "mutt/2.2.9")
_JA_SUBJECTS = ("会議の議事録について", "来週の打ち合わせの件", "請求書を送付いたします",
                "プロジェクト進捗のご報告", "出張申請の承認のお願い")
_JA_LINES = ("いつもお世話になっております。", "添付の資料をご確認ください。",
             "ご不明な点がございましたらお知らせください。", "よろしくお願いいたします。")
_LINKS = ("https://www.example.org/reports/2026/q3", "https://intranet.example.net/wiki/Backup",
          "https://tickets.example.com/browse/OPS-4412")

# What the rejected 2 % carry, one kind after another (see bench/tables/).
_SPAM_SUBJECT = "Cheap V1agra and replica watches, 90% off today"
_SPAM_URL = "http://bestpills-online.example.ru/buy?id=77"
_EXE_NAME = "invoice_2026.pdf.exe"


@dataclass(frozen=True)
class Message:
    """One corpus message: its bytes (CRLF line ends) and whether a rule rejects it."""

    index: int
    raw: bytes
    expect_reject: bool


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _paragraphs(rng: random.Random, size: int) -> list[str]:
    """English-looking text lines, 72 columns, about `size` bytes."""
    out: list[str] = []
    total = 0
    while total < size:
        para = " ".join(_sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 4)))
        lines = [*textwrap.wrap(para, 72), ""]
        out += lines
        total += sum(len(line) + 2 for line in lines)
    return out


def _encoded_word_ja(text: str) -> str:
    """RFC 2047 B-encoding in ISO-2022-JP, as Japanese mail clients still send it."""
    data = base64.b64encode(text.encode("iso-2022-jp")).decode("ascii")
    return f"=?ISO-2022-JP?B?{data}?="


def _address(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(_NAMES)
    local = name.split()[0].lower() + "." + name.split()[1].lower()
    return name, f"{local}@{rng.choice(_DOMAINS)}"


def _date(rng: random.Random, index: int) -> str:
    day = 1 + index % 28
    return (f"{('Mon', 'Tue', 'Wed', 'Thu', 'Fri')[index % 5]}, {day:02d} Oct 2026 "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} +0900")


def _envelope_headers(rng: random.Random, index: int, subject: str,
                      japanese: bool) -> list[str]:
    """The top header block shared by both corpora (each entry may hold folds)."""
    from_name, from_addr = _address(rng)
    hops = rng.randint(2, 3)
    headers: list[str] = []
    for hop in range(hops):
        relay = f"mx{hop + 1}.{rng.choice(_DOMAINS)}"
        headers.append(
            f"Received: from {relay} ({relay} [198.51.100.{rng.randint(1, 254)}])\r\n"
            f"\tby mx.test.example (Postfix) with ESMTPS id {rng.randbytes(5).hex().upper()}\r\n"
            f"\tfor <user{index % 7}@test.example>; {_date(rng, index)}"
        )
    headers.append(f"Return-Path: <{from_addr}>")
    if rng.random() < 0.3:
        sig = base64.b64encode(rng.randbytes(128)).decode("ascii")
        bh = base64.b64encode(rng.randbytes(32)).decode("ascii")
        domain = from_addr.split("@")[1]
        headers.append(
            f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain};\r\n"
            "\ts=sel2026; t=1790000000; h=from:to:subject:date:message-id;\r\n"
            f"\tbh={bh};\r\n\tb={sig[:70]}\r\n\t {sig[70:]}"
        )
    headers.append(f"From: {from_name} <{from_addr}>")
    rcpts = [f"{n} <{a}>" for n, a in (_address(rng) for _ in range(rng.randint(1, 4)))]
    headers.append("To: " + ",\r\n    ".join(rcpts))
    if rng.random() < 0.4:
        headers.append("Cc: " + "{} <{}>".format(*_address(rng)))
    headers.append(f"Subject: {subject}")
    headers.append(f"Date: {_date(rng, index)}")
    headers.append(f"Message-ID: <{rng.randbytes(8).hex()}.{index}@{rng.choice(_DOMAINS)}>")
    if rng.random() < 0.35:
        refs = [f"<{rng.randbytes(6).hex()}@{rng.choice(_DOMAINS)}>" for _ in range(3)]
        headers.append("References: " + "\r\n ".join(refs))
        headers.append(f"In-Reply-To: {refs[-1]}")
    headers.append(f"X-Mailer: {rng.choice(_MAILERS)}")
    if rng.random() < 0.2:
        headers.append(
            "List-Unsubscribe: <mailto:leave@lists.example.edu>,\r\n"
            " <https://lists.example.edu/unsubscribe?u=" + rng.randbytes(6).hex() + ">"
        )
    headers.append("MIME-Version: 1.0")
    return headers


def _subject(rng: random.Random, index: int, japanese: bool, reject: bool) -> str:
    if reject:
        return _SPAM_SUBJECT
    if japanese:
        subject = _encoded_word_ja(rng.choice(_JA_SUBJECTS))
        # Some Japanese subjects are long enough to be folded into two encoded words.
        if index % 2:
            subject += "\r\n " + _encoded_word_ja(rng.choice(_JA_SUBJECTS))
        return subject
    text = _sentence(rng, rng.randint(3, 9)).rstrip(".")
    if len(text) > 50:  # fold long subjects the way mail clients do
        cut = text.rfind(" ", 0, 50)
        text = text[:cut] + "\r\n " + text[cut + 1 :]
    return text


def small_message(index: int) -> Message:
    """Message `index` of the small text corpus (about 2 KB)."""
    rng = random.Random(f"{SEED}-small-{index}")
    reject = index % REJECT_EVERY == REJECT_OFFSET
    # Rejected messages alternate between a spam subject and a spam URL in the body.
    spam_subject = reject and (index // REJECT_EVERY) % 2 == 0
    japanese = index % 5 == 3
    headers = _envelope_headers(rng, index, _subject(rng, index, japanese, spam_subject),
                                japanese)
    if japanese:
        headers.append('Content-Type: text/plain; charset="ISO-2022-JP"')
        headers.append("Content-Transfer-Encoding: 7bit")
        lines = [rng.choice(_JA_LINES) for _ in range(rng.randint(6, 12))]
        body = "\r\n".join(lines).encode("iso-2022-jp") + b"\r\n"
        body += "\r\n".join(_paragraphs(rng, 600)).encode("ascii") + b"\r\n"
    else:
        headers.append("Content-Type: text/plain; charset=us-ascii; format=flowed")
        headers.append("Content-Transfer-Encoding: 7bit")
        lines = _paragraphs(rng, 800)
        lines.insert(len(lines) // 2, f"Details: {rng.choice(_LINKS)}")
        body = "\r\n".join(lines).encode("ascii") + b"\r\n"
    if reject and not spam_subject:
        body += f"Order now at {_SPAM_URL}\r\n".encode("ascii")
    body += b"-- \r\n" + rng.choice(_NAMES).encode("ascii") + b"\r\n"
    raw = "\r\n".join(headers).encode("ascii") + b"\r\n\r\n" + body
    return Message(index, raw, reject)


def attachment_message(index: int, size: int = ATTACHMENT_SIZE) -> Message:
    """Message `index` of the attachment corpus: text part plus `size` bytes in base64."""
    rng = random.Random(f"{SEED}-attachment-{index}")
    reject = index % REJECT_EVERY == REJECT_OFFSET
    japanese = index % 5 == 3
    headers = _envelope_headers(rng, index, _subject(rng, index, japanese, False), japanese)
    boundary = f"----=_Part_{rng.randbytes(6).hex()}"
    headers.append(f'Content-Type: multipart/mixed;\r\n\tboundary="{boundary}"')
    name = _EXE_NAME if reject else f"report-{index:04d}.pdf"
    ctype = "application/octet-stream" if reject else "application/pdf"
    payload = base64.encodebytes(rng.randbytes(size)).replace(b"\n", b"\r\n")
    text = "\r\n".join(_paragraphs(rng, 500)).encode("ascii")
    parts = [
        b"This is a multi-part message in MIME format.\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n",
        text + b"\r\n",
        f"--{boundary}\r\n".encode(),
        (f'Content-Type: {ctype};\r\n\tname="{name}"\r\n'
         f"Content-Transfer-Encoding: base64\r\n"
         f'Content-Disposition: attachment;\r\n\tfilename="{name}"\r\n\r\n').encode(),
        payload,
        f"--{boundary}--\r\n".encode(),
    ]
    raw = "\r\n".join(headers).encode("ascii") + b"\r\n\r\n" + b"".join(parts)
    return Message(index, raw, reject)


def large_message(size: int = LARGE_SIZE) -> bytes:
    """One message of about `size` bytes, nearly all of it a base64 attachment."""
    # base64 with CRLF every 76 characters: 78 bytes on the wire per 57 bytes of data.
    return attachment_message(0, size * 57 // 78).raw


MAKERS: dict[str, Callable[[int], Message]] = {
    "small": small_message,
    "attachment": attachment_message,
}


def corpus(name: str, count: int) -> list[Message]:
    """The first `count` messages of corpus `name` ("small" or "attachment")."""
    make = MAKERS[name]
    return [make(i) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.corpus",
        description="Write the benchmark corpora as .eml files (CRLF line ends).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--count", type=int, default=100, help="messages per corpus")
    args = parser.parse_args(argv)
    for name in CORPORA:
        target = args.out / name
        target.mkdir(parents=True, exist_ok=True)
        rejects = 0
        for msg in corpus(name, args.count):
            (target / f"{msg.index:05d}.eml").write_bytes(msg.raw)
            rejects += msg.expect_reject
        print(f"{target}: {args.count} messages, {rejects} meant to be rejected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one Authentication-Results writer (RFC 8601), its parser and the forged-field remover.

Who removes forged fields: each of our filters is its own milter, and in Postfix
every milter sees the header as changed by the milters before it, so a filter
cannot tell a sibling's fresh field from a forged one by position alone. The rule:

* a filter with no filter of ours before it in chain order (Env.upstream empty:
  the first enabled one, as `milters postfix-config` orders `smtpd_milters`)
  removes every incoming field that carries our authserv-id, before any of our
  fields exist;
* every filter also removes incoming fields with our authserv-id that report a
  method it owns itself (a dkim result is only ever written by our dkim filter),
  so a misordered chain still never keeps a forged result for that method.

Our own fields are inserted at index 0, the very top of the header, above
Postfix's Received field (RFC 8601 §5: the field goes above the Received field
of the MTA that did the work, so that it can be told from older ones).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import authres

from milters.core.model import Header
from milters.core.verdict import AuthResult

FIELD_NAME = "Authentication-Results"

# RFC 2045 token: what may stand unquoted as an RFC 8601 `value`.
_TOKEN = re.compile(r'^[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+$')
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def quote_value(value: str) -> str:
    """An RFC 8601 `value`: a token as it is, anything else as a quoted-string."""
    if _TOKEN.match(value):
        return value
    return '"' + re.sub(r'(["\\])', r"\\\1", value) + '"'


def format_value(authserv_id: str, results: Sequence[AuthResult]) -> str:
    """The field value (after `Authentication-Results:`), built with authres."""
    objs = []
    for r in results:
        props = [authres.AuthenticationResultProperty(t, n, v) for t, n, v in r.properties]
        objs.append(
            authres.AuthenticationResult(
                method=r.method,
                version=r.version or None,
                result=r.result,
                result_comment=r.comment or None,
                reason=r.reason or None,
                properties=props,
            )
        )
    header = authres.core.AuthenticationResultsHeader(
        authres.core_features(), authserv_id="x", results=objs
    )
    # authres lower-cases and never quotes the authserv-id; RFC 8601 §2.2 allows any
    # `value`, so we quote it ourselves and keep the administrator's spelling.
    tail: str = header.header_value()[1:]
    return quote_value(authserv_id) + tail


def fold(value: str, name: str = FIELD_NAME, width: int = 78) -> str:
    """Fold a long value at `; ` and spaces so lines stay under `width` (RFC 5322 §2.2.3)."""
    first_room = width - len(name) - 2
    out: list[str] = []
    line = ""
    room = first_room
    for token in re.split(r"(?<=;) ", value):
        for word in token.split(" "):
            candidate = f"{line} {word}" if line else word
            if len(candidate) > room and line:
                out.append(line)
                line = word
                room = width - 1
            else:
                line = candidate
    out.append(line)
    return "\n\t".join(out)


def authserv_id_of(value: str | bytes) -> str | None:
    """The authserv-id a field claims, lower-cased; None if it has none we can read."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = " ".join(text.split())
    head = text.split(";", 1)[0]
    if not any(c in head for c in '"\\()'):
        # The common case: a plain token first (authres's full parse costs ~0.7 ms).
        words = head.split()
        return words[0].lower() if words else None
    try:
        parsed = authres.parse_value(text)
        return str(parsed.authserv_id).lower() if parsed.authserv_id else None
    except authres.AuthResError:
        pass
    # Unparseable results must not hide a forged authserv-id: read up to the first ';'.
    head = _COMMENT.sub(" ", text.split(";", 1)[0]).strip()
    if head.startswith('"') and head.endswith('"') and len(head) > 1:
        head = head[1:-1]
    head = head.split()[0] if head.split() else ""
    return head.lower() or None


def methods_of(value: str | bytes) -> set[str]:
    """Method names a field reports (dkim, spf...), best effort on broken fields."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = _COMMENT.sub(" ", " ".join(text.split()))
    parts = text.split(";")[1:]
    found = set()
    for part in parts:
        m = re.match(r"\s*([A-Za-z0-9_-]+)\s*(?:/\s*\d+\s*)?=", part)
        if m:
            found.add(m.group(1).lower())
    return found


def forged_fields(
    headers: Iterable[Header],
    authserv_id: str,
    remove_all: bool,
    owned_methods: frozenset[str] = frozenset(),
) -> list[int]:
    """1-based occurrence numbers of AR fields to delete (RFC 8601 §5).

    `remove_all`: this filter is first in the chain and removes every field with our
    authserv-id; otherwise only those reporting a method in `owned_methods`.
    """
    ours = authserv_id.lower()
    occurrence = 0
    doomed = []
    for h in headers:
        if h.name.lower() != FIELD_NAME.lower():
            continue
        occurrence += 1
        if authserv_id_of(h.value) != ours:
            continue
        if remove_all or methods_of(h.value) & owned_methods:
            doomed.append(occurrence)
    return doomed


_WORD = re.compile(r'[^\s"]*"(?:[^"\\]|\\.)*"|\S+')
_RESINFO = re.compile(r"([A-Za-z0-9_-]+)\s*(?:/\s*\d+\s*)?=\s*([A-Za-z0-9_-]+)$")
_PROP = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)=(.*)$", re.S)

ArResult = tuple[str, str, dict[str, str]]  # method, result, {"header.d": value...}


def parse_results(text: str) -> tuple[str, list[ArResult]] | None:
    """The authserv-id (lower case) and the results of an AR field value (RFC 8601 §2.2).

    A small parser for what a consumer of results reads (method, result,
    ptype.property=value): authres's full grammar costs about 0.8 ms a field, more
    than the rest of a DMARC evaluation. Fields it cannot read are handed to
    authres; None if neither can.
    """
    flat = " ".join(text.split())
    stripped = _COMMENT.sub(" ", flat)
    if "(" in stripped or ")" in stripped:  # nested comments: the full grammar
        return _parse_ar_authres(flat)
    parts = stripped.split(";")
    head = parts[0].split()
    if not head:
        return None
    aid = head[0].strip('"').lower()
    results: list[ArResult] = []
    for part in parts[1:]:
        tokens = _WORD.findall(part)
        if not tokens:
            continue
        if len(tokens) >= 3 and tokens[1] == "=":  # "dkim = pass": spaces around "="
            tokens = [tokens[0] + "=" + tokens[2], *tokens[3:]]
        m = _RESINFO.match(tokens[0])
        if m is None:
            if tokens == ["none"]:
                continue  # RFC 8601 §2.2: no results
            return _parse_ar_authres(flat)
        props: dict[str, str] = {}
        for tok in tokens[1:]:
            pm = _PROP.match(tok)
            if pm is not None:
                props[f"{pm.group(1).lower()}.{pm.group(2).lower()}"] = pm.group(3).strip('"')
        results.append((m.group(1).lower(), m.group(2).lower(), props))
    return aid, results


def _parse_ar_authres(text: str) -> tuple[str, list[ArResult]] | None:
    try:
        parsed = authres.parse_value(text)
    except authres.AuthResError:
        return None
    if not parsed.authserv_id:
        return None
    results = [(str(r.method).lower(), str(r.result).lower(),
                {f"{str(p.type).lower()}.{str(p.name).lower()}": str(p.value)
                 for p in r.properties}) for r in parsed.results]
    return str(parsed.authserv_id).lower(), results

"""DMARC policy records (RFC 9989 (policy record)): parsing a TXT value into a typed record.

Tags kept: v, p, sp, np, psd, t, adkim, aspf, rua, ruf, fo. Unknown tags are
ignored (RFC 9989 (policy record): new tags may appear), and so are `rf`, `ri` and
`pct`, which RFC 9989 removed, but for `pct=0` in a record without `t=`: RFC 9989's
`t=y` replaces it and means what it meant under RFC 7489 (the policy one step less
for every message), so a record written for RFC 7489 readers, such as the common
`p=quarantine; pct=0` that asks mailing lists to rewrite From without enforcing
anything, is read as its owner meant it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from milters.core.errors import PermError

POLICIES = ("none", "quarantine", "reject")
_TAG = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*)$", re.S)
_FO = frozenset({"0", "1", "d", "s"})


class UnusableRecord(PermError):
    """a DMARC record without a valid p= (or with an invalid sp=/np=) and without a usable
    rua=: no DMARC processing (RFC 9989 §4.10.1)"""


@dataclass(frozen=True)
class DmarcRecord:
    """One valid DMARC policy record, defaults filled in (RFC 9989 (policy record))."""

    p: str = "none"
    sp: str = ""  # "" = not published (falls back to p)
    np: str = ""  # "" = not published (falls back to sp, then p)
    psd: str = "u"  # y, n or u (unknown)
    t: bool = False  # testing: apply one step less than the policy asks
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    p_published: bool = True  # False when p was missing or invalid (treated as none)

    @property
    def subdomain_policy(self) -> str:
        return self.sp or self.p

    @property
    def nonexistent_policy(self) -> str:
        return self.np or self.sp or self.p


def is_dmarc(txt: bytes | str) -> bool:
    """Does a TXT value claim to be a DMARC record (starts with v=DMARC1)?"""
    text = txt.decode("utf-8", "replace") if isinstance(txt, bytes) else txt
    head = text.split(";", 1)[0]
    return re.fullmatch(r"\s*v\s*=\s*DMARC1\s*", head) is not None


def _uris(value: str) -> tuple[str, ...]:
    """rua/ruf: comma-separated URIs (RFC 9989 (policy record)); only mailto: is usable here."""
    out = []
    for item in value.split(","):
        uri = item.strip()
        # RFC 7489 allowed a size limit suffix (`!10m`); RFC 9989 dropped it: ignore it.
        uri = uri.split("!", 1)[0]
        if re.fullmatch(r"(?i)mailto:[^@\s]+@[^@\s]+", uri):
            out.append("mailto:" + uri[7:])
    return tuple(out)


def parse_record(txt: bytes | str) -> DmarcRecord:
    """A DmarcRecord from a TXT value that starts with v=DMARC1.

    RFC 9989 §4.10.1: a record without a valid "p" tag, or with an "sp" or "np"
    tag that is not valid, is read as a record "containing p=none" when its rua=
    holds at least one valid URI (reports still flow; sp/np are dropped too, so
    nothing stricter than none is applied); without one the Mail Receiver "applies
    no DMARC processing": UnusableRecord, which evaluation turns into dmarc=none.
    RFC 9989 §4.8: other syntax errors are "discarded in favor of default values
    (if any) or ignored outright". A tag given twice makes the tag-list invalid
    (RFC 6376 §3.2, whose tag-value syntax DMARC uses, RFC 9989 §4.7): PermError.
    """
    text = txt.decode("utf-8", "replace") if isinstance(txt, bytes) else txt
    if not is_dmarc(text):
        raise PermError("not a DMARC record (v=DMARC1 must come first)")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        part = part.strip()
        if not part:
            continue
        m = _TAG.match(part)
        if m is None:
            continue  # RFC 9989 §4.8: a syntax error is ignored
        name = m.group(1).lower()
        if name in tags:
            raise PermError(f"DMARC record: tag {name} twice")
        tags[name] = m.group(2).strip()
    rua = _uris(tags.get("rua", ""))
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower()
    np = tags.get("np", "").lower()
    invalid = ["no p= tag" if "p" not in tags else f"invalid p={tags['p'][:20]!r}"] \
        if p not in POLICIES else []
    invalid += [f"invalid {name}={tags[name][:20]!r}" for name, value in (("sp", sp), ("np", np))
                if name in tags and value not in POLICIES]
    p_ok = not invalid
    if invalid:
        if not rua:
            raise UnusableRecord(f"DMARC record: {', '.join(invalid)} and no usable rua=")
        p, sp, np = "none", "", ""
    psd = tags.get("psd", "u").lower()
    pct = tags.get("pct", "")
    t = tags.get("t", "y" if pct.isdigit() and int(pct) == 0 else "n").lower()
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    fo = ":".join(v for v in (x.strip().lower() for x in tags.get("fo", "0").split(":"))
                  if v in _FO) or "0"
    return DmarcRecord(
        p=p,
        sp=sp,
        np=np,
        psd=psd if psd in ("y", "n", "u") else "u",
        t=t == "y",
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        rua=rua,
        ruf=_uris(tags.get("ruf", "")),
        fo=fo,
        p_published=p_ok,
    )

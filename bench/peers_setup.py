"""The three pairs of bench/peers_bench.py: our filter and its C peer, configured to do
the same work, started side by side, and a probe that proves each really evaluates.

- dmarc: `milters run dmarc` and OpenDMARC read the trusted upstream
  Authentication-Results (dkim and spf of `border.test.example`), discover the policy
  in DNS, check alignment, write their AR and a history row; neither refuses.
- dkim: `milters run dkim` (sign only) and OpenDKIM (`Mode s`) sign every message of
  the submission service (daemon name ORIGINATING) with one RSA-2048 key,
  relaxed/relaxed.
- clamav: `milters run clamav` and clamav-milter stream the message to one test clamd,
  add X-Virus-Scanned and X-Virus-Status, and refuse a virus.

Everything a peer reads lives in a 0755 directory outside /tmp (OpenDKIM refuses key
files under a world-writable directory). OpenDMARC reads /etc/resolv.conf only, so it
runs in a private mount namespace whose resolv.conf names the loopback DNS server on
127.0.0.153:53 (tests/support/namespace.py); our dmarc asks the same server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dkim

from bench import common
from milters.dkim.keys import load_private_key
from milters.dkim.keytools import genkey
from tests.e2e.postfix import PostfixInstance, SendResult
from tests.support.clamd import eicar_in_body
from tests.support.namespace import DNS53, private_resolver_argv
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, others_disabled

AUTHSERV = "mx.test.example"         # ours and the peers' AR (Postfix's myhostname)
UPSTREAM = "border.test.example"     # the border MTA whose AR both dmarc filters trust
OUTSIDE = {"ADDR": "198.51.100.7", "NAME": "mail.sender.example",
           "HELO": "mail.sender.example"}
SUBMITTER = {"ADDR": "203.0.113.10", "NAME": "office.example.net",
             "HELO": "office.example.net"}
SELECTOR = "bench"
# The From domains of bench/corpus.py's small corpus (and sender.example).
DOMAINS = ("example.org", "example.net", "corp.example.com", "mail.example.co.jp",
           "lists.example.edu", "sender.example")
DMARC_RECORDS = {
    "_dmarc.example.org": "v=DMARC1; p=reject; rua=mailto:dmarc@example.org",
    "_dmarc.example.net": "v=DMARC1; p=quarantine",
    "_dmarc.example.com": "v=DMARC1; p=none; sp=reject",
    "_dmarc.example.co.jp": "v=DMARC1; p=reject; adkim=s",
}
PEER_BINARIES = {"dmarc": "opendmarc", "dkim": "opendkim", "clamav": "clamav-milter"}


@dataclass
class Side:
    """One running milter of a pair: its process tree is what we measure."""

    pair: str          # dmarc, dkim, clamav
    label: str         # ours / peer name
    process: ManagedProcess
    port: int

    @property
    def postfix_spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"


@dataclass
class Workspace:
    """Keys, configs and histories of one run, in a directory the peers accept."""

    root: Path
    records: dict[str, str] = field(default_factory=dict)

    @property
    def key_file(self) -> Path:
        return self.root / "keys" / f"{SELECTOR}.private"


def make_workspace() -> Workspace:
    """A 0755 directory whose parents are not world-writable (/run, else the
    checkout's bench/results), holding an RSA-2048 key and the DNS records."""
    parent = Path("/run") if _safe_parent(Path("/run")) else common.RESULTS_DIR
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="milters-peers-", dir=parent))
    os.chmod(root, 0o755)
    (root / "keys").mkdir(mode=0o755)
    genkey("bench", SELECTOR, "rsa", 2048, str(root / "keys"))
    ws = Workspace(root)
    record = load_private_key(str(ws.key_file), False).dns_record()
    ws.records.update({f"{SELECTOR}._domainkey.{d}": record for d in DOMAINS})
    ws.records.update(DMARC_RECORDS)
    # Signing for whatever domain the From names (the corpus has six), one key.
    (root / "KeyTable").write_text(f"rsakey %:{SELECTOR}:{ws.key_file}\n")
    (root / "SigningTable").write_text("* rsakey\n")
    return ws


def _safe_parent(path: Path) -> bool:
    """No directory from `path` up to / is writable by others."""
    try:
        return all(not (p.stat().st_mode & 0o002) for p in (path, *path.parents))
    except OSError:
        return False


def remove_workspace(ws: Workspace) -> None:
    shutil.rmtree(ws.root, ignore_errors=True)


# --- ours ------------------------------------------------------------------------------


def _ours(factory: ProcessFactory, ws: Workspace, pair: str, body: str, workers: int,
          log_level: str, core: str = "libmilter") -> Side:
    port = free_port()
    cfg = ws.root / f"ours-{pair}.toml"
    workers_line = f"workers = {workers}\n" if workers else ""  # 0: the filter's default
    cfg.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV}"\nlog_level = "{log_level}"\n'
        f'milter_core = "{core}"\n'
        f'[global.dns]\nnameservers = ["{DNS53}"]\nport = 53\n'
        f'[{pair}]\nsocket = "inet:{port}@127.0.0.1"\n{workers_line}{body}'
        # Alone, as each peer is: no neighbour decides where it signs or whose AR it trusts.
        + others_disabled(pair))
    proc = common.start_milters(factory, pair, cfg, port, workers or None)
    return Side(pair, "ours", proc, port)


def start_ours_dmarc(factory: ProcessFactory, ws: Workspace, workers: int,
                     log_level: str, discovery: str, core: str = "libmilter") -> Side:
    return _ours(factory, ws, "dmarc", (
        f'trusted_authserv_ids = ["{UPSTREAM}"]\n'
        # Like OpenDMARC's SPFSelfValidate false: the upstream results are all it uses.
        "self_validate = false\n"
        f'discovery = "{discovery}"\n'
        # Like RejectFailures false: both only write their verdict.
        'reject_failures = false\non_quarantine = "accept"\n'
        f'history = "{ws.root}/ours-dmarc-history.sqlite"\n'), workers, log_level, core)


def start_ours_dkim(factory: ProcessFactory, ws: Workspace, workers: int,
                    log_level: str, core: str = "libmilter") -> Side:
    return _ours(factory, ws, "dkim", (
        "sign = true\nverify = false\n"  # OpenDKIM Mode s
        f'key_table = "{ws.root}/KeyTable"\nsigning_table = "{ws.root}/SigningTable"\n'
        'canonicalization = "relaxed/relaxed"\nsign_daemons = ["ORIGINATING"]\n'),
        workers, log_level, core)


def start_ours_clamav(factory: ProcessFactory, ws: Workspace, workers: int,
                      log_level: str, clamd_socket: str, core: str = "libmilter") -> Side:
    return _ours(factory, ws, "clamav", (
        f'clamd_sockets = ["{clamd_socket}"]\non_virus = "reject"\non_fail = "tempfail"\n'
        'add_headers = "replace"\n'), workers, log_level, core)


# --- the peers ---------------------------------------------------------------------------


def start_opendmarc(factory: ProcessFactory, ws: Workspace) -> Side:
    import publicsuffixlist

    port = free_port()
    d = ws.root
    # Not the default (127.0.0.1 only, which would take nothing from the XCLIENT
    # address anyway): named so the probe shows the outside address is evaluated.
    (d / "opendmarc-ignore").write_text("127.0.0.1\n::1\n")
    psl = Path(publicsuffixlist.__file__).parent / "public_suffix_list.dat"
    (d / "opendmarc.conf").write_text(
        f"Socket inet:{port}@127.0.0.1\nAuthservID {AUTHSERV}\n"
        f"TrustedAuthservIDs {UPSTREAM}\nPublicSuffixList {psl}\n"
        "SPFSelfValidate false\nSPFIgnoreResults false\n"
        f"IgnoreHosts {d}/opendmarc-ignore\nRejectFailures false\n"
        "Syslog false\nBackground false\n"
        f"HistoryFile {d}/opendmarc-history.dat\n")
    proc = factory.start(
        private_resolver_argv(d, DNS53, f"opendmarc -f -c {d}/opendmarc.conf"), port)
    return Side("dmarc", "opendmarc", proc, port)


def start_opendkim(factory: ProcessFactory, ws: Workspace) -> Side:
    port = free_port()
    d = ws.root
    conf = d / "opendkim.conf"
    # RequireSafeKeys stays on (the default): the key and its directories are safe.
    conf.write_text(
        f"Syslog no\nBackground no\nSocket inet:{port}@127.0.0.1\nMode s\n"
        f"Canonicalization relaxed/relaxed\nKeyTable file:{d}/KeyTable\n"
        f"SigningTable refile:{d}/SigningTable\n"
        # Signed because the submission service's daemon name is ORIGINATING, as ours;
        # the XCLIENT address 203.0.113.10 is not in InternalHosts.
        "InternalHosts 127.0.0.1\nMTA ORIGINATING\n"
        f"AuthservID {AUTHSERV}\n")
    proc = factory.start(["opendkim", "-f", "-x", str(conf)], port)
    return Side("dkim", "opendkim", proc, port)


def start_clamav_milter(factory: ProcessFactory, ws: Workspace, clamd_socket: str) -> Side:
    """clamav-milter on `clamd_socket` (unix:PATH or tcp:HOST:PORT, our spelling)."""
    port = free_port()
    d = ws.root
    binary = shutil.which("clamav-milter") or "/usr/sbin/clamav-milter"
    cfg = d / "clamav-milter.conf"
    cfg.write_text(
        f"MilterSocket inet:{port}@127.0.0.1\nClamdSocket {clamd_socket}\nForeground yes\n"
        f"LogFile {d / 'clamav-milter.log'}\nTemporaryDirectory {d}\n"
        "AddHeader Replace\nOnInfected Reject\nOnFail Defer\n"
        "MaxFileSize 25M\nReadTimeout 120\n")
    proc = factory.start([binary, "-c", str(cfg)], port)
    return Side("clamav", "clamav-milter", proc, port)


def missing_peers() -> list[str]:
    """Peer programs (and unshare, for OpenDMARC's resolver) that are not installed."""
    needed = [*PEER_BINARIES.values(), "unshare"]
    return [b for b in needed if shutil.which(b) is None
            and not os.access(f"/usr/sbin/{b}", os.X_OK)]


# --- probe messages ----------------------------------------------------------------------


def upstream_ar(domain: str, dkim_result: str) -> bytes:
    """The border MTA's verdicts for a message from `domain`, as both dmarc filters read
    them: DKIM for the From domain, SPF none for the envelope sender."""
    return (f"Authentication-Results: {UPSTREAM}; dkim={dkim_result} header.d={domain} "
            f"header.s=sel; spf=none smtp.mailfrom=sender.example\r\n").encode()


def probe_message(domain: str, subject: str) -> bytes:
    return (f"From: Alice <alice@{domain}>\r\nTo: user@test.example\r\n"
            f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{domain}>\r\n\r\n"
            "One message through Postfix to see that the milter did its work.\r\n").encode()


def postfix_params(instance: PostfixInstance, discard: bool) -> dict[str, str]:
    """main.cf settings of every set-up. Postfix opens a milter dialogue for the
    loopback connection and another after XCLIENT (seen: two milter connections per
    session); smtpd_milter_maps disables the milters for loopback clients, so each
    message has one dialogue, for the outside client, as at a real MX; no limit of
    concurrent sessions per client. `discard`:
    accepted mail goes to discard(8) instead of the Maildir."""
    maps = instance.root / "milter_maps"
    if not maps.exists():
        maps.write_text("127.0.0.0/8 DISABLE\n")
    params = {"smtpd_milter_maps": f"cidr:{maps}",
              # After XCLIENT anvil counts the sessions against the outside address,
              # which is not in mynetworks: its default limit of 50 concurrent
              # connections per client closed a quarter of the sessions at 64. A real
              # MX gets its sessions from many clients.
              "smtpd_client_connection_count_limit": "0"}
    if discard:
        params["virtual_transport"] = "discard"
    return params


class ProbeFailed(RuntimeError):
    """A milter behind Postfix did not really evaluate: its numbers would mean nothing."""


def _delivered_one(instance: PostfixInstance, result: SendResult, what: str) -> list[
        tuple[str, str]]:
    if not result.accepted:
        raise ProbeFailed(f"{what}: not accepted: {result}")
    [msg] = instance.wait_delivered(1)
    return msg.headers


def _ours_ar(headers: list[tuple[str, str]]) -> list[str]:
    return [" ".join(v.split()) for n, v in headers
            if n.lower() == "authentication-results" and v.lower().startswith(AUTHSERV)]


def probe(side: Side, instance: PostfixInstance, ws: Workspace) -> dict[str, object]:
    """One or two messages through Postfix with only this milter attached (Maildir
    delivery): raises ProbeFailed unless the milter did its work; returns what was seen."""
    instance.set_milters([side.postfix_spec], **postfix_params(instance, discard=False))
    checks: dict[str, Callable[[], dict[str, object]]] = {
        "dmarc": lambda: _probe_dmarc(side, instance),
        "dkim": lambda: _probe_dkim(side, instance, ws),
        "clamav": lambda: _probe_clamav(side, instance),
    }
    return checks[side.pair]()


def _probe_dmarc(side: Side, instance: PostfixInstance) -> dict[str, object]:
    seen: dict[str, object] = {}
    for want in ("pass", "fail"):
        instance.reset()
        raw = upstream_ar("example.org", want) + probe_message("example.org", f"dmarc {want}")
        headers = _delivered_one(
            instance, instance.send("bounce@sender.example", ["user@test.example"], raw,
                                    xclient=OUTSIDE), f"{side.label} dmarc {want}")
        ours = _ours_ar(headers)
        if not any(f"dmarc={want}" in v for v in ours):
            raise ProbeFailed(f"{side.label}: no {AUTHSERV} dmarc={want} in the delivered "
                              f"message (IgnoreHosts? trusted AR?); its AR: {ours}")
        seen[want] = ours
    return seen


def _probe_dkim(side: Side, instance: PostfixInstance, ws: Workspace) -> dict[str, object]:
    instance.reset()
    raw = probe_message("example.org", f"dkim sign {side.label}")
    headers = _delivered_one(
        instance, instance.send("alice@example.org", ["user@test.example"], raw,
                                port=instance.submission_port, xclient=SUBMITTER),
        f"{side.label} dkim sign")
    [msg] = instance.delivered()
    signatures = [v for n, v in headers if n.lower() == "dkim-signature"]
    if len(signatures) != 1:
        raise ProbeFailed(f"{side.label}: {len(signatures)} DKIM-Signature fields, want 1")

    def dnsfunc(name: bytes, timeout: float = 5.0) -> bytes | None:
        value = ws.records.get(name.decode().rstrip("."))
        return value.encode() if value else None

    wire = msg.raw.replace(b"\n", b"\r\n")
    if not dkim.verify(wire, dnsfunc=dnsfunc):
        raise ProbeFailed(f"{side.label}: its DKIM-Signature does not verify: {signatures[0]}")
    return {"dkim_signature": " ".join(signatures[0].split())[:200], "verifies": True}


def _probe_clamav(side: Side, instance: PostfixInstance) -> dict[str, object]:
    instance.reset()
    clean = probe_message("sender.example", f"clamav clean {side.label}")
    headers = _delivered_one(
        instance, instance.send("sender@sender.example", ["user@test.example"], clean,
                                xclient=OUTSIDE), f"{side.label} clean")
    status = [v for n, v in headers if n.lower() == "x-virus-status"]
    if status != ["Clean"]:
        raise ProbeFailed(f"{side.label}: X-Virus-Status {status}, want ['Clean']")
    infected = instance.send("sender@sender.example", ["user@test.example"], eicar_in_body(),
                             xclient=OUTSIDE)
    if infected.data is None or infected.data.code != 550:
        raise ProbeFailed(f"{side.label}: EICAR not refused: {infected}")
    return {"clean": status, "virus": str(infected.data)}

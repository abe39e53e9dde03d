"""Our DMARC results against OpenDMARC 1.4 (Debian `opendmarc`, RFC 7489) on one
scenario corpus: the same messages, the same Authentication-Results from a trusted
upstream, the same loopback DNS data.

OpenDMARC has no setting for a DNS server or port: it reads /etc/resolv.conf. So
it runs in a private mount namespace (`unshare -m`) where a resolv.conf naming
our loopback DNS server on 127.0.0.153:53 is bind-mounted over the real one;
the machine's resolver is untouched. That needs root, hence the skip.

Every case where the two differ is in DIFFERENT with the RFC section that
decides it; everywhere else the result (and the policy) must be the same, for
our RFC 7489 discovery method ("psl", what OpenDMARC does) and, where RFC 9989
agrees, for the DNS Tree Walk too.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milters.client.probe import probe
from milters.core.envelope import Envelope
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.namespace import DNS53, private_resolver_usable
from tests.support.opendmarc import opendmarc_directory, start_opendmarc
from tests.support.processes import ProcessFactory, free_port

ROOT = Path(__file__).resolve().parents[2]
DNS_ADDRESS = DNS53
AUTHSERV = "mx.test.example"

pytestmark = pytest.mark.skipif(
    not private_resolver_usable("opendmarc"),
    reason="needs Debian's opendmarc, unshare and root (private resolv.conf)")


@dataclass(frozen=True)
class Case:
    name: str
    from_: str
    ar: str = ""  # trusted upstream results
    records: tuple[tuple[str, str], ...] = ()


CORPUS = [
    Case("aligned-dkim", "a@example.com", "dkim=pass header.d=example.com header.s=s1"),
    Case("dkim-fail", "a@example.com", "dkim=fail header.d=example.com header.s=s1"),
    Case("unaligned-dkim", "a@example.com", "dkim=pass header.d=example.net header.s=s1"),
    Case("aligned-spf", "a@example.com", "spf=pass smtp.mailfrom=example.com"),
    Case("unaligned-spf", "a@example.com", "spf=pass smtp.mailfrom=example.net"),
    Case("spf-softfail", "a@example.com", "spf=softfail smtp.mailfrom=example.com"),
    Case("relaxed-sub-from", "a@news.example.com", "dkim=pass header.d=example.com"),
    Case("relaxed-sub-d", "a@example.com", "dkim=pass header.d=mail.example.com"),
    Case("relaxed-sub-spf", "a@news.example.com", "spf=pass smtp.mailfrom=bounce.example.com"),
    Case("strict-dkim", "a@strict.example", "dkim=pass header.d=mail.strict.example",
         (("_dmarc.strict.example", "v=DMARC1; p=reject; adkim=s; aspf=s"),)),
    Case("strict-spf", "a@strict.example", "spf=pass smtp.mailfrom=bounce.strict.example",
         (("_dmarc.strict.example", "v=DMARC1; p=reject; adkim=s; aspf=s"),)),
    Case("strict-exact", "a@strict.example", "dkim=pass header.d=strict.example",
         (("_dmarc.strict.example", "v=DMARC1; p=reject; adkim=s; aspf=s"),)),
    Case("sp-quarantine", "a@dept.spdomain.org", "dkim=pass header.d=other.example",
         (("_dmarc.spdomain.org", "v=DMARC1; p=none; sp=quarantine"),)),
    Case("p-none-fail", "a@pn.example", "", (("_dmarc.pn.example", "v=DMARC1; p=none"),)),
    Case("no-record", "a@nothing.example", "dkim=pass header.d=nothing.example"),
    Case("unknown-tags", "a@tags.example", "dkim=fail header.d=tags.example",
         (("_dmarc.tags.example", "v=DMARC1; p=quarantine; foo=bar; pct=50; ri=3600"),)),
    Case("split-txt", "a@long.example", "",
         (("_dmarc.long.example", "v=DMARC1; p=reject; rua=" + ",".join(
             f"mailto:r{i}@long.example" for i in range(14))),)),
    Case("co-uk", "a@a.b.example.co.uk", "dkim=pass header.d=example.co.uk",
         (("_dmarc.example.co.uk", "v=DMARC1; p=reject"),)),
    Case("co-uk-fail", "a@a.b.sample.co.uk", "dkim=pass header.d=other.co.uk",
         (("_dmarc.sample.co.uk", "v=DMARC1; p=reject; sp=quarantine"),)),
]
BASE_RECORDS = (("_dmarc.example.com", "v=DMARC1; p=reject"),)

# Where OpenDMARC (RFC 7489) and we (RFC 9989) give different results, and why:
# case -> (opendmarc's result, ours with psl, ours with the tree walk, the rule).
DIFFERENT = {
    Case("duplicate-records", "a@multi.example", "",
         (("_dmarc.multi.example", "v=DMARC1; p=reject"),
          ("_dmarc.multi.example", "v=DMARC1; p=none"))):
        ("fail p=reject", "none", "none",
         "RFC 7489 §6.6.3 step 5 and RFC 9989 (DNS Tree Walk): several records, no DMARC "
         "processing; OpenDMARC takes the first"),
    Case("np-nonexistent", "a@ghost.npdomain.org", "",
         (("_dmarc.npdomain.org", "v=DMARC1; p=none; np=reject"),)):
        ("fail p=none", "fail p=reject", "fail p=reject",
         "RFC 9989 (policy record) np= (not in RFC 7489): a non-existent sub-domain takes np"),
    Case("psd-y", "a@agency.psdomain.org", "dkim=pass header.d=psdomain.org",
         (("_dmarc.psdomain.org", "v=DMARC1; p=reject; psd=y"),)):
        ("pass p=reject", "pass p=reject", "fail p=reject",
         "RFC 9989 (Organizational Domain): psd=y makes agency.psdomain.org its own Organizational "
         "Domain, so d=psdomain.org does not align (RFC 7489's PSL knows no psd=)"),
    Case("bad-p-with-rua", "a@badrua.example", "",
         (("_dmarc.badrua.example", "v=DMARC1; p=bogus; rua=mailto:r@badrua.example"),)):
        ("permerror", "fail p=none", "fail p=none",
         "RFC 7489 §6.6.3 and RFC 9989 (policy record): an invalid p= with a usable rua= is read "
         "as p=none; OpenDMARC answers permerror"),
    Case("malformed-p", "a@bad.example", "", (("_dmarc.bad.example", "v=DMARC1; p=bogus"),)):
        ("permerror", "none", "none",
         "RFC 9989 §4.10.1: an invalid p= without a usable rua= means no DMARC processing "
         "(no policy: none); OpenDMARC answers permerror"),
    Case("two-from-addresses", "a@example.com, b@example.net", "dkim=pass header.d=example.com"):
        ("", "none", "none",
         "RFC 9989 §11.5 / RFC 7489 §6.6.1: each From domain evaluated, the worst result "
         "reported (example.com passes, example.net has no record: none; a failing policy "
         "would apply); OpenDMARC writes no result (or rejects with RejectMultiValueFrom)"),
}


def results(values: list[str]) -> str:
    """`fail p=reject`: the dmarc result, and for pass/fail the policy it was held to."""
    for v in values:
        m = re.search(r"dmarc=(\w+)(?: \(p=(\w+))?", v)
        if m:
            result, policy = m.group(1), m.group(2)
            return f"{result} p={policy.lower()}" if result in ("pass", "fail") else result
    return ""


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server(DNS_ADDRESS, 53) as server:
        resolver = server.resolver
        for case in [*CORPUS, *DIFFERENT]:
            for name, value in (*BASE_RECORDS, *case.records):
                if (name.lower(), "TXT") not in resolver.records or not any(
                        value.encode()[:255] == bytes(r.data[0]) for r in
                        resolver.records[(name.lower(), "TXT")]):
                    server.txt(name, value)
        server.a("dept.spdomain.org", "192.0.2.1")
        server.a("agency.psdomain.org", "192.0.2.1")
        yield server


Probe = Callable[[Case], str]


@pytest.fixture(scope="module")
def milters(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        dict[str, Probe]]:
    factory = ProcessFactory()
    d = opendmarc_directory(tmp_path_factory.mktemp("opendmarc"))
    specs = {"opendmarc": start_opendmarc(factory, d, DNS_ADDRESS, AUTHSERV)}
    for method in ("psl", "treewalk"):
        port = free_port()
        conf = d / f"milters-{method}.toml"
        conf.write_text(
            f'[global]\nauthserv_id = "{AUTHSERV}"\n'
            f'[global.dns]\nnameservers = ["{DNS_ADDRESS}"]\nport = 53\ntimeout = 2.0\n'
            f'[dmarc]\nsocket = "inet:{port}@127.0.0.1"\ndiscovery = "{method}"\n'
            f'history = ""\nself_validate = false\n')
        factory.start([sys.executable, "-m", "milters", "run", "dmarc", "--config", str(conf)],
                      port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        specs[method] = f"inet:{port}@127.0.0.1"

    def prober(spec: str) -> Probe:
        def run_case(case: Case) -> str:
            ar = f"Authentication-Results: {AUTHSERV}; {case.ar}\r\n" if case.ar else ""
            msg = (f"{ar}From: {case.from_}\r\nTo: u@test.example\r\nSubject: {case.name}\r\n"
                   "\r\nhello\r\n").encode()
            # The envelope sender is the one the SPF result is about (OpenDMARC drops an
            # upstream spf result for another domain than MAIL FROM's).
            m = re.search(r"smtp\.mailfrom=(\S+)", case.ar)
            mail_from = "b@" + (m.group(1) if m else "example.com")
            env = Envelope(client_ip="198.51.100.7", mail_from=mail_from,
                           rcpt_to=["u@test.example"])
            r = probe(spec, msg, env, timeout=20)
            return results([e.value for e in r.header_edits
                            if e.name == "Authentication-Results"])
        return run_case

    yield {name: prober(spec) for name, spec in specs.items()}
    factory.close()


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_same_result_as_opendmarc(milters: dict[str, Probe], case: Case) -> None:
    theirs = milters["opendmarc"](case)
    assert theirs, "OpenDMARC wrote no dmarc result"
    assert milters["psl"](case) == theirs
    assert milters["treewalk"](case) == theirs


@pytest.mark.parametrize("case", list(DIFFERENT), ids=lambda c: c.name)
def test_listed_differences(milters: dict[str, Probe], case: Case) -> None:
    theirs, psl, treewalk, _rule = DIFFERENT[case]
    assert (milters["opendmarc"](case), milters["psl"](case), milters["treewalk"](case)) == (
        theirs, psl, treewalk)

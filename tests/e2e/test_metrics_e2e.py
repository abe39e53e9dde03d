"""All five filters behind the private Postfix with `[global] metrics_listen` on: each
filter's metrics port is scraped after real SMTP traffic, and `milters stats` reads them
all through the config."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.postfix import PostfixInstance
from tests.e2e.suite import (
    ALIGNED,
    ALIGNED_HELO,
    ALIGNED_IP,
    CHAIN,
    OURS,
    OUTSIDE_IP,
    RCPT,
    REJECTING,
    REPO_ROOT,
    Keys,
    Suite,
    chain_ports,
    config_text,
    dkim_sign,
    message,
)
from tests.support.clamd import Clamd, eicar_zip
from tests.support.dns import LoopbackDNS
from tests.support.processes import ProcessFactory, wait_until

pytest_plugins = ("tests.support.clamd_plugin",)

ALIGNED_CLIENT = {"ADDR": ALIGNED_IP, "NAME": ALIGNED_HELO, "HELO": ALIGNED_HELO}
OUTSIDE = {"ADDR": OUTSIDE_IP, "NAME": "mx.outside.example", "HELO": "mx.outside.example"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def five_free_ports(taken: set[int]) -> int:
    """A base port with base .. base+4 all free on 127.0.0.1 and not in `taken`.

    Drawn below the kernel's ephemeral range (32768-60999), where free_port() and
    outgoing connections take theirs, so nothing grabs one before the filters do.
    """
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 30000)
        wanted = set(range(base, base + 5))
        if wanted & taken:
            continue
        ok = True
        for port in wanted:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base


@pytest.fixture(scope="module")
def metered(factory: ProcessFactory, workdir: Path, dns: LoopbackDNS, clamd: Clamd,
            keys: Keys) -> tuple[Suite, int]:
    ports = chain_ports()
    base = five_free_ports(set(ports.values()))
    text = config_text(workdir, keys.directory / OURS, dns, clamd.tcp, ports, workers=2)
    text = text.replace("[global]\n", f'[global]\nmetrics_listen = "127.0.0.1:{base}"\n', 1)
    config = workdir / "milters-metrics.toml"
    config.write_text(text)
    argv = [sys.executable, "-m", "milters"]
    procs = {name: factory.start([*argv, "run", name, "--config", str(config)], ports[name],
                                 cwd=REPO_ROOT) for name in CHAIN}
    return Suite(ports, config, procs), base


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_all_five_filters_count_what_postfix_sent(postfix: PostfixInstance, workdir: Path,
                                                   metered: tuple[Suite, int]) -> None:
    suite, base = metered
    suite.attach(postfix)
    aligned = dkim_sign(message(ALIGNED, "aligned"), ALIGNED, "sel",
                        workdir / ALIGNED / "sel.private")
    for _ in range(3):
        assert postfix.send(f"alice@{ALIGNED}", [RCPT], aligned, xclient=ALIGNED_CLIENT).accepted
    refused = postfix.send(f"bounce@{REJECTING}", [RCPT], message(REJECTING, "no pass"),
                           xclient=OUTSIDE)
    assert refused.data is not None and refused.data.code == 550, refused
    virus = postfix.send("sender@sender.example", [RCPT], eicar_zip(), xclient=OUTSIDE)
    assert virus.data is not None and virus.data.code == 550, virus
    prize = postfix.send("sender@sender.example", [RCPT],
                         message("sender.example", "you win a prize"), xclient=OUTSIDE)
    assert prize.data is not None and prize.data.code == 550, prize

    m = {name: scrape(base + i) for i, name in enumerate(CHAIN)}
    # dkim: the three aligned messages verified (DMARC-rejected and later ones too).
    assert get(m["dkim"], "milters_results_total", filter="dkim", method="dkim",
               result="pass") == 3
    # spf: every message reaching end of data was evaluated; 3 passes.
    assert get(m["spf"], "milters_results_total", filter="spf", method="spf",
               result="pass") == 3
    # dmarc: 3 passes, and the p=reject message refused at end of message.
    assert get(m["dmarc"], "milters_results_total", filter="dmarc", method="dmarc",
               result="pass") == 3
    assert get(m["dmarc"], "milters_messages_total", filter="dmarc", stage="eom",
               verdict="reject") == 1
    # clamav: the DMARC-refused message never reached it; 5 scans, one virus.
    assert get(m["clamav"], "milters_clamav_scan_seconds_count") == 5
    assert get(m["clamav"], "milters_clamav_viruses_total") == 1
    assert get(m["clamav"], "milters_messages_total", filter="clamav", stage="eom",
               verdict="reject") == 1
    # checks: only the 4 messages that passed clamav; one rule hit, one reject.
    assert get(m["checks"], "milters_messages_total", filter="checks", stage="eom",
               verdict="accept") == 3
    rules = [(dict(labels), v) for (name, labels), v in m["checks"].items()
             if name == "milters_checks_rule_hits_total"]
    assert [(r["rule"].endswith("header_checks:1"), r["action"], v) for r, v in rules] == \
        [(True, "REJECT", 1.0)]
    for name in CHAIN:
        assert get(m[name], "milters_work_seconds_count", filter=name) >= 3, name

    done = subprocess.run([sys.executable, "-m", "milters", "stats", "--config",
                           str(suite.config_path)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    # Six messages reached dmarc (the virus and the prize have no policy: none).
    # XCLIENT makes Postfix reconnect its milters: the first connection of each
    # session comes from 127.0.0.1, an internal client that spf and dmarc accept
    # at CONNECT (issue 13), counted as one more accepted session each.
    for line in (r"dkim +6 messages: accept 6\n", r"spf +12 messages: accept 12\n",
                 r"dmarc +12 messages: accept 11  reject 1\n",
                 r"clamav +5 messages: accept 4  reject 1\n",
                 r"checks +4 messages: accept 3  reject 1\n",
                 r"all domains: 3/6 pass \(50\.0 %\)\n"):
        assert re.search(line, done.stdout), (line, done.stdout)

    # The same from the filters' own log, with DMARC per From domain.
    assert wait_until(lambda: suite.output().count("filter=checks stage=eom") == 4, timeout=10)
    done = subprocess.run([sys.executable, "-m", "milters", "stats", "--log", "-"],
                          input=suite.output(), capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    hour = done.stdout.split("== last day ==")[0]
    for line in (r"dmarc +12 messages: accept 11  reject 1\n",
                 rf"  {re.escape(ALIGNED)}: 3/3 pass \(100\.0 %\)\n",
                 rf"  {re.escape(REJECTING)}: 0/1 pass \(0\.0 %\)\n",
                 r"\n +1 +\S+header_checks:1 REJECT\n"):
        assert re.search(line, hour), (line, done.stdout)

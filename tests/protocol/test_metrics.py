"""Prometheus metrics and shadow rules of a real `milters run checks` with 2 workers,
driven over the milter protocol, scraped over HTTP; `milters stats` on that scrape
and on the filter's own log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

# Line 3 is shadow: it would reject, but must change nothing and let line 4 match.
HEADER_CHECKS = """\
/^X-Bad:/                    REJECT 5.7.1 bad header
# a rule being tried out:
# milters: shadow
/^Subject: .*watch/          REJECT 5.7.1 watched
/^Subject: watch twice/      REJECT 5.7.1 really
"""
CHECKS_OFFSET = 4  # chain position of checks: its metrics port is base + 4


class Checks:
    def __init__(self, proc: ManagedProcess, spec: str, metrics_url: str, config: Path,
                 metrics_dir: Path) -> None:
        self.proc, self.spec, self.url = proc, spec, metrics_url
        self.config, self.metrics_dir = config, metrics_dir


def metrics_port() -> int:
    while True:
        port = free_port()
        if port > 1024 + CHECKS_OFFSET:
            return port


def start_checks(factory: ProcessFactory, d: Path) -> Checks:
    """`milters run checks` with 2 workers and metrics on, its files under `d`/run."""
    (d / "header_checks").write_text(HEADER_CHECKS)
    run_dir = d / "run"
    run_dir.mkdir()
    port, mport = free_port(), metrics_port()
    config = d / "milters.toml"
    config.write_text(
        f'[global]\nauthserv_id = "mx.test.example"\n'
        f'metrics_listen = "127.0.0.1:{mport - CHECKS_OFFSET}"\n\n'
        # Only checks runs here: `milters stats` scrapes the enabled filters.
        + "".join(f"[{n}]\nenabled = false\n" for n in ("dkim", "spf", "dmarc", "clamav"))
        + f'[checks]\nsocket = "inet:{port}@127.0.0.1"\nworkers = 2\n'
        f'header_checks = "regexp:{d}/header_checks"\n'
    )
    argv = [sys.executable, "-m", "milters", "run", "checks", "--config", str(config)]
    # RUNTIME_DIRECTORY as systemd sets it: the metrics files go under it.
    env = {"PYTHONPATH": str(ROOT), "RUNTIME_DIRECTORY": str(run_dir)}
    proc = factory.start(argv, port, env=env, cwd=ROOT)
    return Checks(proc, f"inet:{port}@127.0.0.1", f"http://127.0.0.1:{mport}/metrics",
                  config, run_dir / "metrics-checks")


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checks]:
    with ProcessFactory() as factory:
        yield start_checks(factory, tmp_path_factory.mktemp("metrics"))


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def send(spec: str, subject: str, extra: str = "") -> ProbeResult:
    msg = (f"From: a@example.com\r\nTo: u@example.com\r\nSubject: {subject}\r\n{extra}\r\n"
           "hello\r\n").encode()
    env = Envelope(client_ip="198.51.100.7", client_name="mail.example.net",
                   mail_from="a@example.com", rcpt_to=["u@example.com"])
    return probe(spec, msg, env, timeout=15)


def workers(proc: ManagedProcess, exporter: int) -> list[int]:
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(k) for k in kids if int(k) != exporter]


def exporter_pid(proc: ManagedProcess) -> int:
    m = re.search(r"metrics on http://\S+ \(pid (\d+),", proc.output())
    assert m, proc.output()
    return int(m.group(1))


def test_counters_equal_what_was_sent_summed_over_workers(checks: Checks) -> None:
    before = scrape(checks.url)
    sent = {"accept": 0, "reject": 0}
    shadow_hits = 0

    def batch(n: int) -> None:
        nonlocal shadow_hits
        for i in range(n):
            if i % 4 == 0:
                r = send(checks.spec, "hi", "X-Bad: yes\r\n")
                assert r.verdict == "reject", r
                sent["reject"] += 1
            elif i % 4 == 1:
                r = send(checks.spec, "please watch this")  # shadow rule only
                assert r.verdict == "accept" and not r.header_edits, r
                sent["accept"] += 1
                shadow_hits += 1
            else:
                r = send(checks.spec, f"plain {i}")
                assert r.verdict == "accept", r
                sent["accept"] += 1

    batch(20)
    # Kill one worker: its counts must stay in the sum, and its replacement adds on.
    exporter = exporter_pid(checks.proc)
    first = workers(checks.proc, exporter)
    assert len(first) == 2, first
    os.kill(first[0], signal.SIGKILL)
    assert wait_until(lambda: len(set(workers(checks.proc, exporter)) - set(first)) == 1
                      and len(workers(checks.proc, exporter)) == 2, timeout=20)
    batch(20)

    after = scrape(checks.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for verdict, n in sent.items():
        assert delta("milters_messages_total", filter="checks", stage="eom",
                     verdict=verdict) == n, (verdict, after)
    assert delta("milters_work_seconds_count", filter="checks") == 40
    table = str(checks.config.parent / "header_checks")
    assert delta("milters_checks_rule_hits_total", table=table, rule=f"{table}:1",
                 action="REJECT", shadow="no") == sent["reject"]
    assert delta("milters_checks_rule_hits_total", table=table, rule=f"{table}:4",
                 action="REJECT", shadow="yes") == shadow_hits
    # The numbers came from more than one process: the killed worker's file is there.
    files = {p.name for p in checks.metrics_dir.glob("counter_*.db")}
    assert f"counter_{first[0]}.db" in files, files
    assert len(files - {f"counter_{checks.proc.pid}.db"}) >= 2, files


def test_shadow_rule_changes_nothing_and_matching_goes_on(checks: Checks) -> None:
    table = str(checks.config.parent / "header_checks")
    before = scrape(checks.url)
    r = send(checks.spec, "watch me")
    assert (r.verdict, r.header_edits, r.quarantine, r.replaced_body) == \
        ("accept", [], "", None), r
    # Matching goes on past the shadow rule: the real rule after it still rejects.
    r = send(checks.spec, "watch twice")
    assert r.verdict == "reject" and r.smtp_reply.startswith("550 5.7.1 really"), r
    after = scrape(checks.url)
    labels = {"table": table, "rule": f"{table}:4", "action": "REJECT", "shadow": "yes"}
    assert value(after, "milters_checks_rule_hits_total", **labels) - \
        value(before, "milters_checks_rule_hits_total", **labels) == 2
    assert wait_until(lambda: f"shadow rule {table}:4 would REJECT 5.7.1 watched: matched "
                              "Subject: watch me" in checks.proc.output(), timeout=10), \
        checks.proc.output()


def run_stats(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "milters", "stats", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_stats_on_a_real_scrape_and_a_real_log(checks: Checks, tmp_path: Path) -> None:
    for _ in range(3):
        send(checks.spec, "stats", "X-Bad: 1\r\n")
    samples = scrape(checks.url)
    accepts = int(value(samples, "milters_messages_total", filter="checks", stage="eom",
                        verdict="accept"))
    rejects = int(value(samples, "milters_messages_total", filter="checks", stage="eom",
                        verdict="reject"))
    assert rejects >= 3
    done = run_stats("--config", str(checks.config))
    assert done.returncode == 0, done.stderr
    assert "== since the filters started ==" in done.stdout
    assert re.search(rf"checks +{accepts + rejects} messages: .*reject {rejects}\b",
                     done.stdout), done.stdout
    table = checks.config.parent / "header_checks"
    hits = int(value(samples, "milters_checks_rule_hits_total", table=str(table),
                     rule=f"{table}:1", action="REJECT", shadow="no"))
    assert hits >= 3
    assert re.search(rf"\n +{hits} +{table}:1 REJECT\n", done.stdout), done.stdout
    # --state: a second reading gives the last hour as a difference.
    state = tmp_path / "stats.json"
    assert run_stats("--config", str(checks.config), "--state", str(state)).returncode == 0
    send(checks.spec, "one more", "X-Bad: 1\r\n")
    done = run_stats("--config", str(checks.config), "--state", str(state))
    assert re.search(r"== last hour \(since \d\d:\d\d\) ==\nverdicts per filter:\n"
                     r" +checks +1 messages: reject 1\n", done.stdout), done.stdout

    # The filter's own log, as a file and on stdin.
    log = tmp_path / "milters.log"
    assert wait_until(lambda: checks.proc.output().count("stage=eom") >= accepts + rejects + 1,
                      timeout=10)
    log.write_text(checks.proc.output())
    logged = checks.proc.output().count("filter=checks stage=eom")
    logged_rejects = len(re.findall(r"filter=checks stage=eom .*verdict=reject", log.read_text()))
    for done in (run_stats("--log", str(log)), run_stats("--log", "-", stdin=log.read_text())):
        assert done.returncode == 0, done.stderr
        hour = done.stdout.split("== last day ==")[0]
        assert re.search(rf"checks +{logged} messages: .*reject {logged_rejects}\b", hour), \
            done.stdout
        assert f"{table}:4 REJECT (shadow: not applied)" in hour


def test_stats_says_when_a_port_cannot_be_read(tmp_path: Path) -> None:
    done = run_stats("--url", f"http://127.0.0.1:{free_port()}/metrics")
    assert done.returncode == 1
    assert "cannot scrape" in done.stderr


def test_counts_survive_a_reload(checks: Checks) -> None:
    """SIGHUP: new workers take over from retired ones; no count is lost or reset."""
    def accepted() -> float:
        return value(scrape(checks.url), "milters_messages_total", filter="checks",
                     stage="eom", verdict="accept")

    for i in range(3):
        assert send(checks.spec, f"before {i}").verdict == "accept"
    before = accepted()
    exporter = exporter_pid(checks.proc)
    old = set(workers(checks.proc, exporter))
    os.kill(checks.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: not old & set(workers(checks.proc, exporter)), timeout=60), \
        checks.proc.output()
    for i in range(3):
        assert send(checks.spec, f"after {i}").verdict == "accept"
    assert accepted() == before + 3


def test_a_dead_exporter_is_logged_and_mail_still_flows(tmp_path: Path) -> None:
    with ProcessFactory() as factory:
        own = start_checks(factory, tmp_path)
        assert scrape(own.url) is not None
        exporter = exporter_pid(own.proc)
        os.kill(exporter, signal.SIGKILL)
        assert wait_until(lambda: f"metrics exporter (pid {exporter}) exited"
                          in own.proc.output(), timeout=20), own.proc.output()
        assert send(own.spec, "still here").verdict == "accept"
        assert send(own.spec, "x", "X-Bad: 1\r\n").verdict == "reject"

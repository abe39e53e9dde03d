"""[global] metrics_listen: parsing, the loopback rule, ports per filter; stats log times."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from milters import registry, stats
from milters.core.errors import ConfigError
from milters.core.metrics import filter_listen


def test_each_filter_adds_its_chain_position() -> None:
    cfg = registry.load_from_mapping({"global": {"metrics_listen": "127.0.0.1:9891"}})
    assert [filter_listen(cfg, n) for n in registry.FILTERS] == \
        [("127.0.0.1", 9891 + i) for i in range(5)]
    cfg = registry.load_from_mapping({"global": {"metrics_listen": "[::1]:9000"}})
    assert filter_listen(cfg, "checks") == ("::1", 9004)
    assert filter_listen(registry.load_from_mapping({}), "dkim") is None


@pytest.mark.parametrize("value, says", [
    ("0.0.0.0:9891", "loopback"),
    ("192.0.2.1:9891", "loopback"),
    ("localhost:9891", "not an IP address"),
    ("127.0.0.1", "HOST:PORT"),
    ("127.0.0.1:65534", "at most 65531"),
])
def test_bad_metrics_listen_is_refused(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        registry.load_from_mapping({"global": {"metrics_listen": value}})


def test_log_time_formats() -> None:
    now = time.mktime((2026, 12, 4, 18, 0, 0, 0, 0, -1))
    ours = stats.line_time("2026-12-04 17:30:00,123 milters[1] INFO x: queue_id=A", now)
    journal = stats.line_time("Dec 04 17:30:00 mx milters[1]: queue_id=A", now)
    assert ours == journal == now - 1800
    iso = stats.line_time("2026-12-04T17:30:00+00:00 mx milters[1]: x", now)
    assert iso is not None
    assert stats.line_time("no time here", now) is None


def test_log_tally_windows_and_dmarc_domains() -> None:
    now = time.mktime((2026, 12, 4, 18, 0, 0, 0, 0, -1))
    lines = [
        "Dec 04 17:59:00 mx milters[1]: queue_id=A filter=dmarc stage=eom client=x[1.2.3.4] "
        "verdict=accept [dmarc=pass header.from=a.example] results=dmarc=pass ms=1.0",
        "Dec 04 12:00:00 mx milters[1]: queue_id=B filter=dmarc stage=eom client=x[1.2.3.4] "
        "verdict=reject 550 5.7.1 no [dmarc=fail header.from=A.example no aligned dkim or spf "
        "pass] results=dmarc=fail ms=1.0",
        "Dec 02 12:00:00 mx milters[1]: queue_id=C filter=dmarc stage=eom client=x[1.2.3.4] "
        "verdict=accept [dmarc=fail header.from=old.example] results=dmarc=fail ms=1.0",
    ]
    tallies, used = stats.tally_log(lines, now)
    assert used == 2
    assert tallies["last hour"].verdicts == {("dmarc", "accept"): 1}
    assert tallies["last day"].verdicts == {("dmarc", "accept"): 1, ("dmarc", "reject"): 1}
    assert tallies["last day"].dmarc == {("a.example", "pass"): 1, ("a.example", "fail"): 1}
    text = stats.render(tallies, 10, per_domain=True)
    assert "a.example: 1/2 pass (50.0 %)" in text


def test_dashboard_and_docs_name_only_metrics_that_exist() -> None:
    import json
    import re

    from milters.core.metrics import ClamavMetrics

    m = ClamavMetrics()
    names = set()
    for metric in vars(m).values():
        base = metric._name
        kind = metric._type
        names |= ({f"{base}_total"} if kind == "counter"
                  else {f"{base}_bucket", f"{base}_count", f"{base}_sum", base})
    root = Path(__file__).resolve().parents[3] / "packaging" / "prometheus"
    exprs = " ".join(t["expr"] for p in json.loads((root / "grafana-dashboard.json").read_text())
                     ["panels"] for t in p["targets"])
    used = set(re.findall(r"milters_\w+", exprs))
    assert used and used <= names, used - names
    documented = set(re.findall(r"`(milters_\w+)`", (root / "README.md").read_text()))
    assert {n.removesuffix("_total") for n in documented} == \
        {n.removesuffix("_total") for n in names if not n.endswith(("_bucket", "_count", "_sum"))}


def test_garbage_log_lines_and_a_damaged_state_file_give_a_report(tmp_path: Path) -> None:
    now = time.time()
    lines = ["2026-13-45 99:99:99 milters[1] queue_id=A filter=x stage=eom verdict=accept",
             "Feb 31 10:00:00 mx milters[1]: queue_id=A filter=x stage=eom verdict=accept",
             "\x00\xff filter= verdict=", ""]
    tallies, used = stats.tally_log(lines, now)
    assert used == 0 and not tallies["last hour"].verdicts
    state = tmp_path / "state.json"
    state.write_text('[{"time": "x"}, {"time": 1, "samples": [[1]]}, 7]')
    assert stats.read_state(state) == []
    state.write_text("not json")
    assert stats.read_state(state) == []

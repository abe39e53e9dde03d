"""`milters stats`: what the filters decided over the last hour and day.

Two sources, the same report:

- the metrics of the running filters (`[global] metrics_listen`, core/metrics.py):
  each enabled filter's /metrics is scraped. Counters count from the filter's
  start, so windows need an earlier reading: with `--state FILE` every run
  appends its reading there (25 hours are kept) and a window is the difference
  from the oldest reading inside it; without one the report covers "since the
  filters started". Metrics carry no domain labels (unbounded), so DMARC per
  From domain comes from the logs only; the metrics give the overall rate.
- the log (`--log FILE`, `-` for stdin; e.g. `journalctl -u 'milters@*' --since
  -1d | milters stats --log -`): the one summary line per message per filter
  (`queue_id=... filter=... stage=... verdict=... results=...`, core/pipeline.py),
  checks' rule references (`[header_checks FILE:LINE REJECT]`), shadow-rule lines
  and dmarc's `[dmarc=RESULT header.from=DOMAIN ...]` reason. Time stamps in our own
  format, journalctl's default and `-o short-iso` are understood.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

WINDOWS = (("last hour", 3600.0), ("last day", 86400.0))
KEEP_SECONDS = 25 * 3600.0

_SUMMARY = re.compile(r"queue_id=\S+ filter=(?P<filter>\w+) stage=(?P<stage>\w+) .*?"
                      r"verdict=(?P<verdict>\w+)")
_RULE = re.compile(r"\b(?P<key>\w+_checks) (?P<rule>\S+:\d+) (?P<action>[A-Z]+)\b")
_SHADOW = re.compile(r"filter=checks shadow rule (?P<rule>\S+:\d+) would (?P<action>[A-Z]+)")
_DMARC = re.compile(r"\[dmarc=(?P<result>\w+) header\.from=(?P<domain>[^\s\]]*)")
_OURS = re.compile(r"^(?P<y>\d{4})-(?P<mo>\d\d)-(?P<d>\d\d)[ T](?P<h>\d\d):(?P<mi>\d\d):"
                   r"(?P<s>\d\d)(?P<frac>[,.]\d+)?(?P<tz>[+-]\d\d:?\d\d|Z)?")
_SYSLOG = re.compile(r"^(?P<mon>[A-Z][a-z]{2}) +(?P<d>\d{1,2}) (?P<h>\d\d):(?P<mi>\d\d):"
                     r"(?P<s>\d\d)")
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                       "Sep", "Oct", "Nov", "Dec"), start=1)}


@dataclass
class Tally:
    """Counts for one window."""

    verdicts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (filter, verdict)
    rules: Counter[tuple[str, str, bool]] = field(default_factory=Counter)  # (rule, action, shadow)
    dmarc: Counter[tuple[str, str]] = field(default_factory=Counter)  # (domain, result)
    dmarc_total: Counter[str] = field(default_factory=Counter)  # result


# --- logs ----------------------------------------------------------------------------


def line_time(line: str, now: float) -> float | None:
    """The time stamp a log line starts with, as seconds since the epoch (local time);
    None for a line without one (or with an impossible date)."""
    try:
        return _line_time(line, now)
    except (ValueError, OverflowError):
        return None


def _line_time(line: str, now: float) -> float | None:
    m = _OURS.match(line)
    if m:
        tz = m.group("tz")
        text = (f"{m['y']}-{m['mo']}-{m['d']}T{m['h']}:{m['mi']}:{m['s']}"
                + ("+00:00" if tz == "Z" else _colon(tz) if tz else ""))
        stamp = datetime.fromisoformat(text)
        return stamp.timestamp()
    m = _SYSLOG.match(line)
    if m and m["mon"] in _MONTHS:
        year = datetime.fromtimestamp(now).year
        stamp = datetime(year, _MONTHS[m["mon"]], int(m["d"]), int(m["h"]), int(m["mi"]),
                         int(m["s"]))
        if stamp.timestamp() > now + 86400:  # December's lines read in January
            stamp = stamp.replace(year=year - 1)
        return stamp.timestamp()
    return None


def _colon(tz: str) -> str:
    return tz if ":" in tz else f"{tz[:3]}:{tz[3:]}"


def tally_log(lines: Iterable[str], now: float) -> tuple[dict[str, Tally], int]:
    """Tallies per window from log lines, and how many lines were ours."""
    tallies = {name: Tally() for name, _ in WINDOWS}
    used = 0
    for line in lines:
        if "filter=" not in line:
            continue
        when = line_time(line, now)
        if when is None:
            continue
        windows = [tallies[name] for name, span in WINDOWS if now - span <= when <= now + 60]
        if not windows:
            continue
        found = _count_line(line, windows)
        used += found
    return tallies, used


def _count_line(line: str, windows: Sequence[Tally]) -> int:
    m = _SUMMARY.search(line)
    if m:
        for t in windows:
            t.verdicts[(m["filter"], m["verdict"])] += 1
        rest = line[m.end():]
        if m["filter"] == "checks":
            for r in _RULE.finditer(rest):
                for t in windows:
                    t.rules[(r["rule"], r["action"], False)] += 1
        elif m["filter"] == "dmarc":
            d = _DMARC.search(rest)
            if d:
                for t in windows:
                    t.dmarc[(d["domain"].lower(), d["result"])] += 1
                    t.dmarc_total[d["result"]] += 1
        return 1
    m = _SHADOW.search(line)
    if m:
        for t in windows:
            t.rules[(m["rule"], m["action"], True)] += 1
        return 1
    return 0


# --- metrics -------------------------------------------------------------------------

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)


def scrape(url: str, timeout: float = 5.0) -> dict[Sample, float]:
    """One filter's counters: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def tally_samples(samples: Mapping[Sample, float]) -> Tally:
    t = Tally()
    for (name, labels), value in samples.items():
        lab = dict(labels)
        n = round(value)
        if not n:
            continue
        if name == "milters_messages_total":
            t.verdicts[(lab.get("filter", "?"), lab.get("verdict", "?"))] += n
        elif name == "milters_checks_rule_hits_total":
            t.rules[(lab.get("rule", "?"), lab.get("action", "?"), lab.get("shadow") == "yes")] += n
        elif name == "milters_results_total" and lab.get("method") == "dmarc":
            t.dmarc_total[lab.get("result", "?")] += n
    return t


def difference(now: Mapping[Sample, float], then: Mapping[Sample, float]) -> dict[Sample, float]:
    """Counter increase; a counter below its earlier value was restarted: count it all."""
    out = {}
    for key, value in now.items():
        before = then.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


def read_state(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return []  # unreadable: start again rather than fail a report
    if not isinstance(data, list):
        return []
    good = []
    for r in data:
        try:
            float(r["time"])
            _decode(r["samples"])
        except (KeyError, TypeError, ValueError):
            continue  # a damaged reading: skip it, keep the others
        good.append(r)
    return good


def _encode(samples: Mapping[Sample, float]) -> list[list[Any]]:
    return [[name, [list(p) for p in labels], value] for (name, labels), value in samples.items()]


def _decode(rows: list[list[Any]]) -> dict[Sample, float]:
    return {(name, tuple((k, v) for k, v in labels)): float(value) for name, labels, value in rows}


def metrics_report(targets: Mapping[str, str], state: Path | None, now: float
                   ) -> tuple[dict[str, Tally], list[str]]:
    """Tallies per window from a scrape of `targets` (filter -> URL); and problems."""
    current: dict[Sample, float] = {}
    problems = []
    for name, url in targets.items():
        try:
            current.update(scrape(url))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            problems.append(f"{name}: cannot scrape {url}: {exc}")
    tallies: dict[str, Tally] = {}
    if state is None:
        tallies["since the filters started"] = tally_samples(current)
        return tallies, problems
    readings = [r for r in read_state(state) if now - float(r.get("time", 0)) <= KEEP_SECONDS]
    for name, span in WINDOWS:
        inside = [r for r in readings if now - float(r["time"]) <= span]
        if inside:
            base = _decode(inside[0]["samples"])
            label = f"{name} (since {time.strftime('%H:%M', time.localtime(inside[0]['time']))})"
            tallies[label] = tally_samples(difference(current, base))
        else:
            tallies[f"{name} (no earlier reading: since the filters started)"] = \
                tally_samples(current)
    readings.append({"time": now, "samples": _encode(current)})
    try:
        state.write_text(json.dumps(readings))
    except OSError as exc:
        problems.append(f"cannot keep the reading in {state}: {exc.strerror}")
    return tallies, problems


# --- the report ----------------------------------------------------------------------


def render(tallies: Mapping[str, Tally], top: int, per_domain: bool) -> str:
    out: list[str] = []
    for window, t in tallies.items():
        out.append(f"== {window} ==")
        out.append("verdicts per filter:")
        filters = sorted({f for f, _ in t.verdicts})
        if not filters:
            out.append("  (no messages)")
        for f in filters:
            counts = {v: n for (ff, v), n in t.verdicts.items() if ff == f}
            total = sum(counts.values())
            parts = "  ".join(f"{v} {n}" for v, n in sorted(counts.items(), key=lambda x: -x[1]))
            out.append(f"  {f:<8} {total:>7} messages: {parts}")
        out.append(f"top rules hit (checks, {top} at most):")
        if not t.rules:
            out.append("  (none)")
        for (rule, action, shadow), n in t.rules.most_common(top):
            out.append(f"  {n:>7}  {rule} {action}{' (shadow: not applied)' if shadow else ''}")
        out.append("DMARC pass rate per From domain:")
        total = sum(t.dmarc_total.values())
        if total:
            passed = t.dmarc_total.get("pass", 0)
            out.append(f"  all domains: {passed}/{total} pass ({100 * passed / total:.1f} %)")
        if per_domain:
            domains: Counter[str] = Counter()
            passes: Counter[str] = Counter()
            for (d, result), n in t.dmarc.items():
                domains[d] += n
                if result == "pass":
                    passes[d] += n
            for d, n in domains.most_common(top):
                out.append(f"  {d or '(none)'}: {passes[d]}/{n} pass "
                           f"({100 * passes[d] / n:.1f} %)")
        elif total:
            out.append("  (per domain: read the logs with --log; metrics carry no domains)")
        if not total:
            out.append("  (no DMARC results)")
        out.append("")
    return "\n".join(out)


def log_stats(stream: TextIO, now: float, top: int) -> str:
    tallies, used = tally_log(stream, now)
    return render(tallies, top, per_domain=True) + f"({used} log lines counted)\n"

"""The per-message CPU cost of Prometheus metrics, measured without the network.

The milter-protocol benchmark (`python -m bench.milter_bench --metrics`) measures the
whole thing, but on a busy 2-core machine its msgs/s vary by far more than the few
percent in question. This one runs the checks filter's decision (the bench/tables
rules, the `small` corpus) in one process, the way a worker thread does: the
end-of-message check and the summary line with its metrics, once with metrics off
(NullMetrics) and once with prometheus_client's multi-process counters writing to
a temporary directory, alternating rounds; it reports the best round of each (the
least disturbed by other load) and the difference per message; then the metrics
calls alone (each message's counters, histogram and rule hits) timed over the
same verdicts, which is the figure that stays steady on a loaded machine.

    python -m bench.metrics_cost [--rounds 7] [--messages 400]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import corpus
from milters import registry
from milters.core import metrics
from milters.core.envelope import Envelope
from milters.core.model import Connection
from milters.core.pipeline import Pipeline
from milters.core.runtime import Runtime
from milters.core.verdict import Verdict
from milters.offline import run_offline


def runtime(with_metrics: bool) -> Runtime:
    tables = common.TABLES_DIR
    cfg = registry.load_from_mapping({
        "global": {"metrics_listen": "127.0.0.1:9891"},
        "checks": {"header_checks": [f"regexp:{tables / 'header_checks'}"],
                   "body_checks": [f"regexp:{tables / 'body_checks'}"]},
    })
    rt = registry.build_runtime(cfg, "checks")
    m = metrics.Metrics() if with_metrics else metrics.NullMetrics()
    flt = rt.filter
    flt.env = replace(flt.env, metrics=m)
    return rt


def one_round(rt: Runtime, messages: Sequence[bytes]) -> float:
    """CPU seconds per message for one pass over `messages`."""
    env = Envelope(client_ip="198.51.100.7", client_name="mail.example.net")
    started = time.process_time()
    for raw in messages:
        report = run_offline(rt, raw, env)
        Pipeline(rt, Connection()).log(report.stage, None, report.verdict, report.ms)
    return (time.process_time() - started) / len(messages)


def hook_cost(m: metrics.NullMetrics, outcomes: Sequence[tuple[str, Verdict, float]],
              rounds: int) -> float:
    """CPU seconds per message of the metrics calls alone (best of `rounds`)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for stage, verdict, ms in outcomes:
            m.message("checks", stage, verdict, ms)
            for reason in filter(None, verdict.reason.split("; ")):
                _key, source, action = reason.split(" ", 2)
                m.rule_hit(source.rpartition(":")[0], source, action)
        best = min(best, (time.process_time() - started) / len(outcomes))
    return best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--messages", type=int, default=400)
    args = p.parse_args(argv)
    logging.disable(logging.INFO)  # the log line's formatting is not what is measured
    with tempfile.TemporaryDirectory(prefix="milters-metrics-cost-") as d:
        os.environ[metrics.MULTIPROC_ENV] = d  # before prometheus_client is imported
        off, on = runtime(False), runtime(True)
        messages = [m.raw for m in corpus("small", args.messages)]
        one_round(off, messages)
        one_round(on, messages)  # warm-up: caches, label children
        best_off, best_on = float("inf"), float("inf")
        for _ in range(args.rounds):
            best_off = min(best_off, one_round(off, messages))
            best_on = min(best_on, one_round(on, messages))
        env = Envelope(client_ip="198.51.100.7", client_name="mail.example.net")
        outcomes = []
        for raw in messages:
            r = run_offline(off, raw, env)
            outcomes.append((r.stage, r.verdict, r.ms))
        hooks_on = hook_cost(metrics.Metrics(), outcomes, args.rounds)
        hooks_off = hook_cost(metrics.NullMetrics(), outcomes, args.rounds)
    extra = best_on - best_off
    hooks = hooks_on - hooks_off
    print(f"checks, {args.messages} small messages, best of {args.rounds} rounds (CPU):")
    print(f"  decision, metrics off: {best_off * 1e6:8.1f} us/message")
    print(f"  decision, metrics on:  {best_on * 1e6:8.1f} us/message "
          f"({100 * extra / best_off:+.2f} %, within the noise of a busy machine)")
    print(f"  the metrics calls alone: {hooks * 1e6:6.1f} us/message "
          f"({100 * hooks / best_off:.2f} % of the decision)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

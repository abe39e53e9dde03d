"""`milters test`: run a message through the filters' decisions offline, no MTA, no socket.

It drives the same pipelines the milter adapter drives, stage by stage, so the
verdict printed here is the one a running filter would give. By default it runs
the live chain (core/chain.py): each filter gets the message with the previous
filters' edits applied, as Postfix would send it (forged-field removal
included), and the final verdict and the final header are printed; `--filter`
runs single filters on the original message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milters.core.chain import ChainFilter, ChainPipeline
from milters.core.envelope import Envelope
from milters.core.model import Body, Connection, Header, Transaction, parse_message
from milters.core.pipeline import Pipeline
from milters.core.plan import Plan
from milters.core.policy import describe
from milters.core.runtime import Runtime
from milters.core.verdict import Action, Verdict


@dataclass
class StepReport:
    """One filter's decision at end of message."""

    filter: str
    verdict: Verdict
    plan: Plan
    ms: float


@dataclass
class Report:
    filter: str
    stage: str  # where the decision fell: connect, helo, mail, rcpt, eom
    verdict: Verdict
    refused_rcpts: list[tuple[str, Verdict]] = field(default_factory=list)
    ms: float = 0.0
    plan: Plan = Plan()
    # The chain: each step's end-of-message decision, and the header Postfix
    # would deliver (without the Received field it adds itself).
    steps: list[StepReport] = field(default_factory=list)
    final_header: list[Header] = field(default_factory=list)


def run_offline(runtime: Runtime, message: bytes, env: Envelope) -> Report:
    """The decisions for `message` sent with envelope `env` (the same Envelope
    `milters probe` sends over the wire), by one filter or, for a chain
    runtime (registry.build_chain), by the live chain."""
    name = runtime.filter.name
    conn = Connection(
        client_addr=env.client_ip,
        client_port=env.client_port,
        client_name=env.client_name,
        helo=env.helo,
        macros={"j": env.daemon_name, "{daemon_name}": env.daemon_name, **env.macros},
    )
    if env.auth_user:
        conn.macros.update({"{auth_authen}": env.auth_user, "{auth_type}": env.auth_type})
    chain = isinstance(runtime.filter, ChainFilter)
    pipe = ChainPipeline(runtime, conn) if chain else Pipeline(runtime, conn)
    if pipe.accepted_at_connect():
        return Report(name, "connect", Verdict(reason="not checked: internal client"))
    refused = pipe.connect()
    if refused is not None:
        return Report(name, "connect", refused)
    refused = pipe.helo()
    if refused is not None:
        return Report(name, "helo", refused)
    headers, body_bytes = parse_message(message)
    body = Body()
    body.write(body_bytes)
    tx = Transaction(conn, mail_from=env.mail_from, headers=headers, body=body,
                     macros={"i": env.queue_id})
    try:
        refused = pipe.mail(tx)
        if refused is not None:
            return Report(name, "mail", refused)
        report = Report(name, "eom", Verdict())
        for rcpt in env.rcpt_to:
            r = pipe.rcpt(tx, rcpt)
            if r is not None:
                if r.action is Action.DISCARD:
                    return Report(name, "rcpt", r)
                report.refused_rcpts.append((rcpt, r))
        if not tx.rcpt_to:
            report.stage = "rcpt"
            report.verdict = report.refused_rcpts[-1][1] if report.refused_rcpts else Verdict()
            return report
        outcome = pipe.end_of_message(tx)
        report.verdict = outcome.verdict
        report.ms = outcome.ms
        report.plan = outcome.plan
        if isinstance(pipe, ChainPipeline):
            report.steps = [StepReport(p.name, o.verdict, o.plan, o.ms)
                            for p, o in pipe.outcomes]
            if outcome.verdict.action is Action.ACCEPT:
                report.final_header = list(tx.headers)
        return report
    finally:
        tx.close()


def format_report(report: Report) -> str:
    if not report.steps:
        return _format_one(report.filter, report.verdict, report.plan, report.stage,
                           report.ms, report.refused_rcpts)
    lines = [_format_one(s.filter, s.verdict, s.plan, "eom", s.ms, [])
             for s in report.steps]
    v = report.verdict
    lines.append(f"[chain] final verdict: {describe(v)} ({report.ms:.1f} ms)")
    lines += [f"  recipient {r} refused: {describe(x)}" for r, x in report.refused_rcpts]
    if v.action is Action.ACCEPT:
        lines.append("  delivered header (Postfix adds its Received field below any field "
                     "inserted at the top):")
        lines += [f"    {h.name}:{_one_line(h.value)}" for h in report.final_header]
    return "\n".join(lines)


def _format_one(name: str, v: Verdict, plan: Plan, stage: str, ms: float,
                refused_rcpts: list[tuple[str, Verdict]]) -> str:
    lines = [f"[{name}] verdict: {describe(v)} (at {stage}, {ms:.1f} ms)"]
    for rcpt, refusal in refused_rcpts:
        lines.append(f"  recipient {rcpt} refused: {describe(refusal)}")
    for res in v.results:
        props = " ".join(f"{t}.{n}={val}" for t, n, val in res.properties)
        lines.append(f"  result: {res.method}={res.result} {props}".rstrip())
    if v.action is Action.ACCEPT:
        lines += [f"  milter operation: {line}" for line in plan.lines()]
    lines += [f"  log: {n}" for n in v.log_notes]
    return "\n".join(lines)


def _one_line(value: bytes) -> str:
    return value.decode("utf-8", "replace").replace("\n", "\n      ")

"""`milters test`: run a message through the filters' decisions offline, no MTA, no socket.

It drives the same Pipeline the milter adapter drives, stage by stage, so the
verdict printed here is the one a running filter would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milters.client import Envelope
from milters.core import authresults
from milters.core.config import Config
from milters.core.model import Body, Connection, Transaction, parse_message
from milters.core.pipeline import Pipeline
from milters.core.policy import describe
from milters.core.runtime import Runtime
from milters.core.verdict import Action, Verdict


@dataclass
class Report:
    filter: str
    stage: str  # where the decision fell: connect, helo, mail, rcpt, eom
    verdict: Verdict
    refused_rcpts: list[tuple[str, Verdict]] = field(default_factory=list)
    ms: float = 0.0


def run_offline(runtime: Runtime, message: bytes, env: Envelope) -> Report:
    """The decisions for `message` sent with envelope `env` (the same Envelope
    `milters probe` sends over the wire)."""
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
    pipe = Pipeline(runtime, conn)
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
        return report
    finally:
        tx.close()


def format_report(report: Report, cfg: Config) -> str:
    v = report.verdict
    lines = [f"[{report.filter}] verdict: {describe(v)} (at {report.stage}, {report.ms:.1f} ms)"]
    for rcpt, refusal in report.refused_rcpts:
        lines.append(f"  recipient {rcpt} refused: {describe(refusal)}")
    for res in v.results:
        props = " ".join(f"{t}.{n}={val}" for t, n, val in res.properties)
        lines.append(f"  result: {res.method}={res.result} {props}".rstrip())
    if v.action is Action.ACCEPT:
        if v.results:
            value = authresults.format_value(cfg.global_.authserv_id, v.results)
            lines.append(f"  would insert at top: {authresults.FIELD_NAME}: {value}")
        lines += [f"  would {e.describe()}" for e in v.header_edits]
        lines += [f"  would add recipient {r}" for r in v.add_rcpts]
        lines += [f"  would delete recipient {r}" for r in v.del_rcpts]
        if v.replace_body is not None:
            lines.append(f"  would replace the body ({len(v.replace_body)} bytes)")
        if v.quarantine:
            lines.append(f"  would quarantine (hold): {v.quarantine}")
    lines += [f"  log: {n}" for n in v.log_notes]
    return "\n".join(lines)

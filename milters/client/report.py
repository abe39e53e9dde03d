"""What `milters probe` prints: a milter's negotiation, each stage's answer, the
verdict and the changes it asked for, for an administrator to read."""

from __future__ import annotations

from milters.client.probe import ProbeResult
from milters.core.verdict import EditKind, HeaderEdit


def format_probe(result: ProbeResult) -> str:
    """A multi-line report an administrator reads (`milters probe`)."""
    neg = result.negotiated
    lines = [f"milter {result.spec}: protocol version {neg.version}, {result.elapsed_ms:.1f} ms"]
    lines.append("  may:      " + (" ".join(neg.action_names) or "(no actions)"))
    skipped = [
        s
        for s in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "unknown")
        if not neg.wants(s)
    ]
    no_reply = [
        s
        for s in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "unknown")
        if neg.wants(s) and not neg.replies(s)
    ]
    lines.append("  skips:    " + (" ".join(skipped) or "nothing"))
    lines.append("  no reply: " + (" ".join(no_reply) or "none (answers every step)"))
    extras = [n for n in ("SKIP", "RCPT_REJ", "HDR_LEADSPC") if n in neg.protocol_names]
    if extras:
        lines.append("  options:  " + " ".join(extras))
    for stage, names in neg.macro_lists.items():
        lines.append(f"  macros asked for at {stage}: {' '.join(names) or '(none)'}")
    lines.append("")
    lines.append("stages:")
    quiet = [s for s in result.stages if s.stage == "header" and s.action == "continue"]
    summarise = len(quiet) > 3
    quiet_ids = {id(s) for s in quiet}
    for s in result.stages:
        if summarise and id(s) in quiet_ids:
            if s is quiet[0]:
                how = "no reply expected" if not s.replied else "continue"
                if not s.sent:
                    how = s.describe()
                lines.append(f"  {'header':<8} {f'({len(quiet)} fields)':<40} {how}")
            continue
        arg = f" {s.argument}" if s.argument else ""
        lines.append(f"  {s.stage:<8}{arg[:60]:<41} {s.describe()}")
    lines.append("")
    verdict = result.verdict.upper()
    if result.verdict == "continue":
        verdict = "CONTINUE (Postfix accepts)"
    where = f" at {result.decided_at}" if result.decided_at else ""
    lines.append(
        f"verdict:  {verdict}{where}" + (f" -> {result.smtp_reply}" if result.smtp_reply else "")
    )
    for rcpt, reply in result.rejected_recipients.items():
        lines.append(f"  recipient {rcpt} rejected: {reply}")
    if result.quarantine:
        lines.append(f"quarantine (Postfix hold queue): {result.quarantine}")
    if result.header_edits:
        lines.append("header changes:")
        for e in result.header_edits:
            lines.append(f"  {_describe_edit(e)}")
    if result.recipient_changes or result.sender_change:
        lines.append("envelope changes:")
        if result.sender_change:
            sc = result.sender_change
            lines.append(f"  sender -> {sc.address}" + (f" {sc.params}" if sc.params else ""))
        for c in result.recipient_changes:
            lines.append(f"  recipient {c.describe()}")
    if result.replaced_body is not None:
        lines.append(f"body replaced: {len(result.replaced_body)} bytes")
    return "\n".join(lines)


def _describe_edit(e: HeaderEdit) -> str:
    value = e.value.replace("\r", "").replace("\n", "\\n")
    if len(value) > 200:
        value = value[:200] + "..."
    if e.kind is EditKind.ADD:
        return f"add      {e.name}: {value}"
    if e.kind is EditKind.INSERT:
        return f"insert   at {e.index}: {e.name}: {value}"
    if e.kind is EditKind.CHANGE:
        return f"change   {e.name}[{max(e.index, 1)}]: {value}"
    return f"delete   {e.name}[{max(e.index, 1)}]"

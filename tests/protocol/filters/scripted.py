"""A filter for adapter tests: each message says in X-Test-* headers what to decide.

Run as `python scripted.py PORT [mode] [on_error] [bypass]`; it serves through the
real runner and adapter (pre-fork, TCP_NODELAY, policy), so protocol tests
exercise everything but a real filter's logic.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

from milters.core.config import FilterSettings, build_config
from milters.core.filter import Filter, Stage
from milters.core.logs import setup_logging
from milters.core.model import Transaction
from milters.core.policy import SitePolicy
from milters.core.runner import run_filter
from milters.core.runtime import Runtime
from milters.core.verdict import (
    Action,
    AuthResult,
    EditKind,
    HeaderEdit,
    Reply,
    Verdict,
)


@dataclass(frozen=True)
class ScriptedSettings(FilterSettings):
    pass


class ScriptedFilter(Filter):
    name = "scripted"
    default_port = 9999
    settings_class = ScriptedSettings
    stages = Stage.CONNECT | Stage.MAIL | Stage.RCPT | Stage.HEADER | Stage.BODY
    may_change_recipients = True
    may_replace_body = True
    may_quarantine = True
    ar_methods: ClassVar[frozenset[str]] = frozenset({"x-scripted"})

    def on_rcpt(self, tx: Transaction, rcpt: str) -> Verdict | None:
        if rcpt.startswith("reject-me@"):
            return Verdict(Action.REJECT, reply=Reply("550", "5.1.1", f"<{rcpt}> refused"))
        return None

    def check(self, tx: Transaction) -> Verdict:
        action = b"".join(tx.header_values("X-Test-Action")).strip().decode()
        if action == "raise":
            raise RuntimeError("scripted failure")
        if action == "reject":
            return Verdict(Action.REJECT, reply=Reply("550", "5.7.1", "scripted 100% reject"))
        if action == "tempfail":
            return Verdict(Action.TEMPFAIL, reply=Reply("451", "4.7.1", "scripted tempfail"))
        if action == "discard":
            return Verdict(Action.DISCARD)
        if action == "hold":
            return Verdict(quarantine="scripted hold")
        if action == "body":
            return Verdict(replace_body=b"replaced body\r\n")
        if action == "edits":
            return Verdict(
                header_edits=(
                    HeaderEdit(EditKind.ADD, "X-Added", "added"),
                    HeaderEdit(EditKind.INSERT, "X-Inserted", "inserted", index=1),
                    HeaderEdit(EditKind.CHANGE, "Subject", "changed", index=1),
                    HeaderEdit(EditKind.DELETE, "X-Remove", index=1),
                ),
                add_rcpts=("added@example.com",),
                del_rcpts=tuple(r for r in tx.rcpt_to if r.startswith("drop")),
            )
        size = str(tx.body.size)
        return Verdict(
            results=(AuthResult("x-scripted", "pass", properties=(("body", "size", size),)),),
        )


def main() -> int:
    port = int(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "enforce"
    on_error = sys.argv[3] if len(sys.argv) > 3 else "tempfail"
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    core = os.environ.get("SCRIPTED_MILTER_CORE", "libmilter")
    if core == "eventloop":
        # The Python core's event loop (core/eventloop.py) serves this filter.
        ScriptedFilter.waits_only_on_dns = True
        core = "python"
    cfg = build_config(
        {"global": {"authserv_id": "mx.test.example", "mode": mode, "on_error": on_error,
                    "bypass_recipients": ["postmaster@"],
                    "milter_core": core},
         "scripted": {"workers": workers}},
        "(scripted test)",
        {"scripted": ScriptedSettings},
        {"scripted": f"inet:{port}@127.0.0.1"},
    )
    setup_logging("info")

    def build(c: object, name: str) -> Runtime:
        from milters.core.filter import Env

        env = Env(cfg.global_)
        flt = ScriptedFilter(cfg.filters["scripted"], env)
        policy = SitePolicy("scripted", mode, False, on_error, cfg.global_.bypass_recipients)
        return Runtime(cfg, flt, policy)

    return run_filter("scripted", cfg, build, lambda: cfg)  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())

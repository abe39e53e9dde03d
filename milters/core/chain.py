"""Chain mode: every enabled filter in one milter dialogue, in chain order.

Behind Postfix each filter is a dialogue of its own, and Postfix pays for each
(shared/notes/milter-latency.md; about 0.9 ms of its CPU per milter per
message). In chain mode one socket serves them all: the steps run in-process,
in the order `smtpd_milters` would list them, with the chain's semantics
unchanged. Each step sees the message as Postfix would send it after the steps
before (their header edits applied as Postfix applies them, core/plan.py), the
first refusal ends the message as it would end it in Postfix, a hold is handed
on to the last step (core/hold.py), and signing, when it has a step of its own,
comes last. The adapter replays the steps' plans one after the other in the one
dialogue, which is what Postfix would have applied from five.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from milters.core.config import FilterSettings, setting
from milters.core.filter import Filter, Stage
from milters.core.model import Body, Connection, Transaction
from milters.core.pipeline import Outcome, Pipeline
from milters.core.plan import Plan, PostfixHeader
from milters.core.runtime import Runtime
from milters.core.verdict import Action, Verdict

NAME = "chain"
DEFAULT_SOCKET = "inet:8890@127.0.0.1"


@dataclass(frozen=True)
class ChainSettings(FilterSettings):
    """[chain]: one socket, one dialogue per message, for every enabled filter."""

    enabled: bool = setting(
        False,
        "serve every enabled filter on this one socket, in chain order, in one milter "
        "dialogue per message (instead of one socket each): `serve` starts only this, "
        "`postfix-config` lists only this socket",
    )


class ChainFilter(Filter):
    """What the adapter needs to know of the chain as a whole (negotiation, names).

    The decisions are the steps'; ChainPipeline drives them. A subclass per chain
    is made by `chain_filter`, with the union of the steps' needs.
    """

    name = NAME
    default_port = 8890
    settings_class = ChainSettings
    stages = Stage.NONE
    steps: tuple[Runtime, ...] = ()

    def needed_stages(self) -> Stage:
        needed = Stage.NONE
        for step in self.steps:
            needed |= step.needed
        return needed

    def check(self, tx: Transaction) -> Verdict:
        raise TypeError("the chain decides through ChainPipeline, step by step")

    def skips_internal(self) -> bool:
        # Some step may leave the session at CONNECT: the connect callback must
        # be answered (ChainPipeline.accepted_at_connect decides per step).
        return any(step.accepts_early for step in self.steps)

    def describe(self) -> list[str]:
        order = ", ".join(step.filter.name for step in self.steps)
        return [f"steps in order: {order}"] + [
            f"{step.filter.name}: {line}" for step in self.steps
            for line in step.filter.describe()]

    def load_warnings(self) -> list[str]:
        return [f"{step.filter.name}: {w}" for step in self.steps
                for w in step.filter.load_warnings()]

    def shutdown(self) -> None:
        for step in self.steps:
            step.filter.shutdown()


def chain_filter(settings: FilterSettings, steps: tuple[Runtime, ...]) -> ChainFilter:
    """The chain's filter object: a class with the union of its steps' capabilities
    (class attributes, as the adapter reads them), holding the steps."""
    if not steps:
        raise ValueError("a chain needs at least one enabled filter")
    env = steps[0].env
    ns = {
        "steps": steps,
        "may_change_headers": True,
        "may_change_recipients": any(s.filter.may_change_recipients for s in steps),
        "may_replace_body": any(s.filter.may_replace_body for s in steps),
        "may_quarantine": any(s.filter.may_quarantine or s.applies_holds for s in steps),
        "ar_methods": frozenset().union(*(s.filter.ar_methods for s in steps)),
    }
    klass = type("Chain", (ChainFilter,), ns)
    flt: ChainFilter = klass(settings, replace(env, upstream=(), downstream=()))
    return flt


class ChainPipeline(Pipeline):
    """One SMTP session through every step of the chain (see the module docstring)."""

    def __init__(self, runtime: Runtime, conn: Connection) -> None:
        super().__init__(runtime, conn)
        assert isinstance(runtime.filter, ChainFilter)
        self.steps = [Pipeline(step, conn) for step in runtime.filter.steps]
        # The steps' outcomes for the message last decided, for the log lines.
        self.outcomes: list[tuple[Pipeline, Outcome]] = []

    def accepted_at_connect(self) -> bool:
        # A step that accepts this client at CONNECT leaves the chain for the
        # session, as Postfix stops calling that milter; the chain as a whole is
        # accepted when no step is left.
        self.steps = [p for p in self.steps if not p.accepted_at_connect()]
        return not self.steps

    def connect(self) -> Verdict | None:
        return _first(p.connect() for p in self.steps)

    def helo(self) -> Verdict | None:
        return _first(p.helo() for p in self.steps)

    def mail(self, tx: Transaction) -> Verdict | None:
        self.outcomes = []
        return _first(p.mail(tx) for p in self.steps)

    def rcpt(self, tx: Transaction, address: str, record: bool = True) -> Verdict | None:
        # A recipient one step refuses is not shown to the steps after it.
        refused = _first(p.rcpt(tx, address, record=False) for p in self.steps)
        if refused is None and record:
            tx.rcpt_to.append(address)
        return refused

    def end_of_message(self, tx: Transaction) -> Outcome:
        started = time.perf_counter()
        header = PostfixHeader(tx.headers)
        plan = Plan()
        self.outcomes = []
        verdict = Verdict()
        for p in self.steps:
            outcome = p.end_of_message(tx)
            self.outcomes.append((p, outcome))
            verdict = outcome.verdict
            if verdict.action is not Action.ACCEPT:
                plan = Plan()  # the message is refused: nothing of it is kept
                break
            plan = plan.then(outcome.plan)
            _apply(tx, header, outcome.plan)
        ms = (time.perf_counter() - started) * 1000
        if verdict.action is Action.ACCEPT:
            verdict = Verdict(quarantine=plan.quarantine)
        return Outcome(verdict, ms, plan)

    def log(self, stage: str, tx: Transaction | None, verdict: Verdict, ms: float) -> None:
        """One line per step, as each filter logs behind its own socket."""
        if stage == "eom" and self.outcomes and tx is not None:
            for p, outcome in self.outcomes:
                p.log(stage, tx, outcome.verdict, outcome.ms)
            self.outcomes = []
            return
        super().log(stage, tx, verdict, ms)


def _first(verdicts: Iterable[Verdict | None]) -> Verdict | None:
    """The first refusal; the steps after it are not asked (a generator), as
    Postfix stops calling milters once one refused."""
    return next((v for v in verdicts if v is not None), None)


def _apply(tx: Transaction, header: PostfixHeader, plan: Plan) -> None:
    """The message as the next step is sent it: this step's edits applied."""
    if plan.header_ops:
        header.apply(plan.header_ops)
        tx.headers = header.visible()
    if plan.replace_body is not None:
        tx.body.close()
        tx.body = Body()
        tx.body.write(plan.replace_body)
    for rcpt in plan.del_rcpts:
        if rcpt in tx.rcpt_to:
            tx.rcpt_to.remove(rcpt)
    tx.rcpt_to.extend(r for r in plan.add_rcpts if r not in tx.rcpt_to)

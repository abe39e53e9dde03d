"""One plan of edits per message and filter: what the adapter replays, what
`milters test` prints, and what chain mode applies before the next filter.

A filter's Verdict says what it wants in its own terms (insert before the field
it saw at position p, change the n-th Subject...). Postfix applies milter edits
one after the other to the header as already edited, counts its own Received
field (which milters never see) as position 0 for inserts, and not at all for
changes (pinned in tests/e2e/test_postfix_milter_facts.py). `make_plan` turns a
verdict into the exact sequence of milter operations, with the positions and
occurrence numbers Postfix must get, and with the removal of forged
Authentication-Results fields and our own field at the top. `PostfixHeader`
applies such a sequence as Postfix does, so that a filter run in-process after
another sees what it would see behind Postfix.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from milters.core import authresults
from milters.core.model import Header
from milters.core.verdict import ABOVE_RECEIVED, EditKind, HeaderEdit, Verdict


class OpKind(enum.Enum):
    INSERT = "insert"  # smfi_insheader: at Postfix's position (0: above its Received)
    CHANGE = "change"  # smfi_chgheader: the n-th field of that name gets this value
    DELETE = "delete"  # smfi_chgheader with no value: the n-th field goes
    APPEND = "append"  # smfi_addheader: at the end of the header


@dataclass(frozen=True)
class HeaderOp:
    """One milter header operation, with the numbers Postfix must get."""

    kind: OpKind
    name: str
    value: str = ""
    # INSERT: Postfix's position; CHANGE/DELETE: 1-based occurrence among the
    # fields milters see, counted on the header as edited by the operations before.
    index: int = 0

    def describe(self) -> str:
        if self.kind is OpKind.INSERT:
            return f"insert at position {self.index}: {self.name}: {self.value}"
        if self.kind is OpKind.APPEND:
            return f"append: {self.name}: {self.value}"
        if self.kind is OpKind.CHANGE:
            return f"change {self.name}[{self.index}] to: {self.value}"
        return f"delete {self.name}[{self.index}]"


@dataclass(frozen=True)
class Plan:
    """Every change one filter makes to an accepted message, in the order to make them."""

    header_ops: tuple[HeaderOp, ...] = ()
    del_rcpts: tuple[str, ...] = ()
    add_rcpts: tuple[str, ...] = ()
    replace_body: bytes | None = None
    quarantine: str = ""

    @property
    def empty(self) -> bool:
        return not (self.header_ops or self.del_rcpts or self.add_rcpts
                    or self.replace_body is not None or self.quarantine)

    def then(self, later: Plan) -> Plan:
        """This plan followed by `later` (made on the message as this one left it),
        as one milter dialogue must replay them. Postfix takes one new body per
        message (replacebody chunks append), so the later body wins."""
        body = later.replace_body if later.replace_body is not None else self.replace_body
        return Plan(
            header_ops=self.header_ops + later.header_ops,
            del_rcpts=self.del_rcpts + later.del_rcpts,
            add_rcpts=self.add_rcpts + later.add_rcpts,
            replace_body=body,
            quarantine=later.quarantine or self.quarantine,
        )

    def lines(self) -> list[str]:
        """What `milters test` prints, one operation a line, in replay order."""
        out = [op.describe() for op in self.header_ops]
        out += [f"delete recipient {r}" for r in self.del_rcpts]
        out += [f"add recipient {r}" for r in self.add_rcpts]
        if self.replace_body is not None:
            out.append(f"replace the body ({len(self.replace_body)} bytes)")
        if self.quarantine:
            out.append(f"quarantine (hold): {self.quarantine}")
        return out


def make_plan(verdict: Verdict, headers: Sequence[Header], authserv_id: str,
              forged: Iterable[int] = ()) -> Plan:
    """The operations that carry out an accepting `verdict` on `headers` (the
    fields this filter saw), deleting the Authentication-Results occurrences in
    `forged` (core/authresults.py forged_fields) on the way."""
    ops: list[HeaderOp] = []
    # Positional inserts first, bottom-up (a stable sort keeps the order of equal
    # positions), so earlier positions stay valid. Postfix's hidden Received is
    # its position 0: "before the field seen at p" is p + 1, ABOVE_RECEIVED is 0.
    inserts = sorted((e for e in verdict.header_edits if e.kind is EditKind.INSERT),
                     key=lambda e: e.index, reverse=True)
    ops += [HeaderOp(OpKind.INSERT, e.name, e.value, e.index + 1) for e in inserts]
    # Changes and deletions by occurrence, highest first per name, merged with the
    # removal of forged fields: Postfix counts occurrences in the header as
    # already edited, so inserted fields of the same name above a target move it.
    changes = [e for e in verdict.header_edits if e.kind in (EditKind.CHANGE, EditKind.DELETE)]
    changes += [HeaderEdit(EditKind.DELETE, authresults.FIELD_NAME, index=i) for i in forged]
    for e in sorted(changes, key=lambda e: (e.name.lower(), -e.index)):
        kind = OpKind.DELETE if e.kind is EditKind.DELETE else OpKind.CHANGE
        ops.append(HeaderOp(kind, e.name, e.value, _shifted(headers, e, inserts)))
    ops += [HeaderOp(OpKind.APPEND, e.name, e.value)
            for e in verdict.header_edits if e.kind is EditKind.ADD]
    if verdict.results:
        # RFC 8601 §5: at the very top, above the Received field Postfix adds. Last,
        # after the forged fields of the same name are gone, so that it shifts no
        # occurrence number above.
        value = authresults.fold(authresults.format_value(authserv_id, verdict.results))
        ops.append(HeaderOp(OpKind.INSERT, authresults.FIELD_NAME, value, ABOVE_RECEIVED + 1))
    return Plan(tuple(ops), verdict.del_rcpts, verdict.add_rcpts, verdict.replace_body,
                verdict.quarantine)


def _shifted(headers: Sequence[Header], edit: HeaderEdit, inserts: list[HeaderEdit]) -> int:
    """The occurrence number of `edit`'s target once `inserts` are in place."""
    name = edit.name.lower()
    seen = 0
    position = len(headers)
    for i, h in enumerate(headers):
        if h.name.lower() == name:
            seen += 1
            if seen == edit.index:
                position = i
                break
    above = sum(1 for e in inserts if e.name.lower() == name and e.index <= position)
    return edit.index + above


class PostfixHeader:
    """A message header as Postfix holds it while milters edit it: the fields
    milters see, and Postfix's own Received field at the top, hidden from them."""

    def __init__(self, headers: Iterable[Header], *, verbatim: bool = False) -> None:
        self._fields: list[Header | None] = [None, *headers]  # None: Postfix's Received
        # verbatim: the operations' values are the exact bytes after the colon (a
        # milter with SMFIP_HDR_LEADSPC; the milter client says which); else a
        # value without leading white space gets one space, as our adapter's do.
        self._verbatim = verbatim

    def visible(self) -> list[Header]:
        """What the next milter is sent."""
        return [h for h in self._fields if h is not None]

    def apply(self, ops: Iterable[HeaderOp]) -> None:
        for op in ops:
            if op.kind is OpKind.INSERT:
                self._fields.insert(max(0, min(op.index, len(self._fields))), self._field(op))
            elif op.kind is OpKind.APPEND:
                self._fields.append(self._field(op))
            else:
                self._change(op)

    def _change(self, op: HeaderOp) -> None:
        name = op.name.lower()
        seen = 0
        for i, h in enumerate(self._fields):
            if h is not None and h.name.lower() == name:
                seen += 1
                if seen == op.index:
                    if op.kind is OpKind.DELETE:
                        del self._fields[i]
                    else:
                        self._fields[i] = self._field(op)
                    return
        if op.kind is OpKind.CHANGE:
            self._fields.append(self._field(op))  # past the count: Postfix adds the field

    def _field(self, op: HeaderOp) -> Header:
        # Stored as "Name: value" (a value with its own leading white space verbatim),
        # and sent to the next milter as the bytes after the colon.
        value = op.value
        if not self._verbatim and not value.startswith((" ", "\t")):
            value = " " + value
        return Header(op.name, value.encode("utf-8", "surrogateescape"))

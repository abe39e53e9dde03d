"""The header as (name, value) pairs, read from a message as Postfix sends it and
edited by a milter's header modifications as Postfix's cleanup edits it.

The tests and the benchmarks use these to rebuild the message Postfix would
store from what `probe()` reports. The edit semantics are core/plan.py's
PostfixHeader, the same that chain mode and `milters test` apply between
filters.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Sequence

from milters.client.replies import Modification
from milters.core import model
from milters.core.plan import HeaderOp, OpKind, PostfixHeader
from milters.core.verdict import EditKind, HeaderEdit

_OP_KIND = types.MappingProxyType({
    EditKind.ADD: OpKind.APPEND,
    EditKind.INSERT: OpKind.INSERT,
    EditKind.CHANGE: OpKind.CHANGE,
    EditKind.DELETE: OpKind.DELETE,
})


def parse_message(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields as (name, value after the colon) pairs and the body, as Postfix
    sends them to a milter (see milters.core.model.parse_message)."""
    headers, body = model.parse_message(message)
    return [(h.name, h.value) for h in headers], body


def apply_header_edits(
    headers: Sequence[tuple[str, bytes]],
    edits: Iterable[Modification],
    *,
    leading_space: bool = False,
) -> list[tuple[str, bytes]]:
    """Apply header modifications in order, as Postfix's cleanup does.

    `headers` are (name, value-after-colon) pairs as `parse_message` returns them;
    other modification kinds in `edits` are ignored. A value from the milter gets
    one leading space unless the milter negotiated SMFIP_HDR_LEADSPC
    (`leading_space=True`), as Postfix writes it. INSHEADER index 0 is the very
    top (in real Postfix its own Received header counts as a field there);
    CHGHEADER counts fields of that name from 1 (0 is taken as 1, as Postfix
    does); a change of a missing field appends it, a delete of one does nothing.
    """
    header = PostfixHeader((model.Header(name, value) for name, value in headers),
                           verbatim=True)
    header.apply(_op(edit, leading_space) for edit in edits if isinstance(edit, HeaderEdit))
    return [(h.name, h.value) for h in header.visible()]


def edited_message(message: bytes, edits: Iterable[Modification], *,
                   leading_space: bool = False) -> bytes:
    """`message` with the header modifications applied (apply_header_edits), as the
    wire bytes Postfix would store and forward: what a verifier downstream reads."""
    headers, body = parse_message(message)
    edited = apply_header_edits(headers, edits, leading_space=leading_space)
    return b"".join(n.encode() + b":" + v.replace(b"\n", b"\r\n") + b"\r\n"
                    for n, v in edited) + b"\r\n" + body


def _op(edit: HeaderEdit, leading_space: bool) -> HeaderOp:
    value = edit.value if leading_space else " " + edit.value
    if edit.kind is EditKind.INSERT:
        # `headers` lack Postfix's own Received field, which PostfixHeader keeps
        # hidden at position 0: index i here is its position i + 1.
        index = max(edit.index, 0) + 1
    elif edit.kind is EditKind.ADD:
        index = 0
    else:
        index = max(edit.index, 1)
    return HeaderOp(_OP_KIND[edit.kind], edit.name, value, index)

"""The clamav filter: stream each message to clamd and act on its verdict.

Built once from settings; check() keeps per-message state in locals, so
libmilter threads share one filter. The only shared mutable state is which
clamd back ends failed recently (tried last for `retry_after` seconds) and which
unix-socket ones cannot take a descriptor (streamed to from then on), kept under
a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from milters import __version__
from milters.clamav.clamd import (
    Backend,
    ClamdError,
    DescriptorRefused,
    ScanResult,
    SizeLimitExceeded,
    parse_backend,
    scan,
    scan_descriptor,
    takes_descriptor,
)
from milters.clamav.settings import ClamavSettings, parse_reply_template
from milters.core.config import FilterSettings
from milters.core.filter import Env, Filter, Stage
from milters.core.model import Transaction
from milters.core.verdict import Action, EditKind, HeaderEdit, Reply, Verdict

log = logging.getLogger(__name__)

SCANNED_HEADER = "X-Virus-Scanned"
STATUS_HEADER = "X-Virus-Status"

REPLY_SCANNER_DOWN = Reply("451", "4.3.0", "virus scanner unavailable, please try again later")
REPLY_TOO_LARGE = Reply("451", "4.3.4", "message too large to be scanned for viruses")

# An mbox "From " line first, as clamav-milter sends: without it clamd's type
# detection misses a message whose first field is not one it knows (From:,
# Received:...), and then neither decodes MIME parts nor opens attachments.
MBOX_LINE = b"From milters-clamav\r\n"


class ClamavFilter(Filter):
    """Virus scanning through clamd, replacing clamav-milter: each message goes whole
    to clamd (INSTREAM, or FILDES to a local clamd), back ends tried in order. README.md maps every
    clamav-milter.conf option onto these keys."""

    name = "clamav"
    default_port = 8894
    settings_class = ClamavSettings
    stages = Stage.HEADER | Stage.BODY
    may_change_headers = True
    may_quarantine = True

    def __init__(self, settings: FilterSettings, env: Env) -> None:
        if not isinstance(settings, ClamavSettings):
            raise TypeError("ClamavFilter needs ClamavSettings")
        super().__init__(settings, env)
        self.clamav: ClamavSettings = settings
        self.backends = tuple(parse_backend(s) for s in settings.clamd_sockets)
        self.reject_reply = parse_reply_template(settings.reject_reply)
        host = settings.report_hostname or env.global_.authserv_id
        self.scanned_value = f"milters-clamav {__version__} at {host}"
        self._lock = threading.Lock()
        self._failed_until: dict[Backend, float] = {}
        self._streamed_only: set[Backend] = set()

    def describe(self) -> list[str]:
        return [f"clamd back end {i}: {b}" for i, b in enumerate(self.backends, 1)]

    # --- the decision -------------------------------------------------------

    def skips_internal(self) -> bool:
        return self.clamav.skip_internal

    def check(self, tx: Transaction) -> Verdict:
        s = self.clamav
        conn = tx.connection
        if s.skip_authenticated and conn.sasl_user:
            return Verdict(reason=f"not scanned: authenticated as {conn.sasl_user}")
        if s.skip_internal and self.env.is_internal(conn):
            return Verdict(reason="not scanned: internal client")
        header = tx.raw_header_block()
        size = len(MBOX_LINE) + len(header) + 2 + tx.body.size
        limit = 0
        if size > s.max_scan_size:
            if s.on_oversize != "truncate":
                return self._oversize(tx, size)
            limit = s.max_scan_size
        pieces = _Pieces(header, tx, limit, size)
        started = time.perf_counter()
        try:
            backend, result, notes = self._scan_with_failover(pieces)
        except SizeLimitExceeded:
            # clamd's StreamMaxLength is below max_scan_size: the message is too
            # large for clamd whatever on_oversize says about our own limit.
            verdict = self._oversize(tx, size)
            note = "clamd refused the stream: StreamMaxLength is below max_scan_size"
            return replace(verdict, log_notes=(*verdict.log_notes, note))
        except _AllFailed as exc:
            return self._failed(tx, exc.notes)
        ms = (time.perf_counter() - started) * 1000
        self.env.metrics.clamd_scan(ms / 1000)
        # What the scan was, in the message's one log line (a line of its own per
        # message cost a tenth of the filter's CPU); `notes` holds only failovers.
        scanned = (f"clamd={backend} bytes={result.scanned} scan_ms={ms:.1f}"
                   f"{' truncated' if limit else ''}")
        if result.infected:
            return self._infected(tx, result.virus, scanned, tuple(notes))
        return Verdict(reason=f"clean {scanned}",
                       header_edits=self._headers(tx, "Clean"), log_notes=tuple(notes))

    def _infected(self, tx: Transaction, virus: str, scanned: str,
                  notes: tuple[str, ...]) -> Verdict:
        reason = f"virus={virus} {scanned}"
        self.env.metrics.virus()
        action = self.clamav.on_virus
        if action == "reject":
            r = self.reject_reply
            reply = Reply(r.code, r.xcode, r.text.replace("%v", virus))
            return Verdict(Action.REJECT, reply=reply, reason=reason, log_notes=notes)
        if action == "discard":
            return Verdict(Action.DISCARD, reason=reason, log_notes=notes)
        edits = self._headers(tx, f"Infected ({virus})", always=True)
        quarantine = f"virus {virus}" if action == "quarantine" else ""
        return Verdict(reason=reason, quarantine=quarantine, header_edits=edits,
                       log_notes=notes)

    def _oversize(self, tx: Transaction, size: int) -> Verdict:
        reason = f"not scanned: {size} bytes over max_scan_size {self.clamav.max_scan_size}"
        if self.clamav.on_oversize == "tempfail":
            return Verdict(Action.TEMPFAIL, reply=REPLY_TOO_LARGE, reason=reason)
        edits = self._headers(tx, "Not scanned (message too large)", always=True,
                              scanned=False)
        return Verdict(reason=reason, header_edits=edits)

    def _failed(self, tx: Transaction, notes: tuple[str, ...]) -> Verdict:
        if self.clamav.on_fail == "accept":
            edits = self._headers(tx, "Not scanned (scanner unavailable)", always=True,
                                  scanned=False)
            return Verdict(reason="not scanned: no clamd answered, accepted per on_fail",
                           header_edits=edits, log_notes=notes)
        return Verdict(Action.TEMPFAIL, reply=REPLY_SCANNER_DOWN,
                       reason="not scanned: no clamd answered", log_notes=notes)

    def _headers(self, tx: Transaction, status: str, always: bool = False,
                 scanned: bool = True) -> tuple[HeaderEdit, ...]:
        """X-Virus-Scanned and X-Virus-Status, as clamav-milter's AddHeader writes them.

        Mail that was not scanned gets X-Virus-Status only: an X-Virus-Scanned
        field would claim a scan that did not happen.
        """
        mode = self.clamav.add_headers
        if mode == "no":
            if not always:
                return ()
            mode = "replace"  # a tag must not sit next to a forged one
        if mode == "add":
            # clamav-milter's "Add": inserted at the top, incoming ones kept.
            edits = [HeaderEdit(EditKind.INSERT, STATUS_HEADER, status, 0)]
            if scanned:
                edits.append(HeaderEdit(EditKind.INSERT, SCANNED_HEADER, self.scanned_value, 0))
            return tuple(edits)
        edits = []
        for name in (SCANNED_HEADER, STATUS_HEADER):
            count = len(tx.header_values(name))
            edits += [HeaderEdit(EditKind.DELETE, name, index=i) for i in range(count, 0, -1)]
        if scanned:
            edits.append(HeaderEdit(EditKind.ADD, SCANNED_HEADER, self.scanned_value))
        edits.append(HeaderEdit(EditKind.ADD, STATUS_HEADER, status))
        return tuple(edits)

    # --- back ends ------------------------------------------------------------

    def _order(self) -> list[Backend]:
        """Back ends in configured order, those that failed recently last."""
        now = time.monotonic()
        with self._lock:
            down = {b for b, until in self._failed_until.items() if until > now}
        return [b for b in self.backends if b not in down] + [b for b in self.backends
                                                             if b in down]

    def _mark(self, backend: Backend, failed: bool) -> None:
        with self._lock:
            if failed:
                self._failed_until[backend] = time.monotonic() + self.clamav.retry_after
            else:
                self._failed_until.pop(backend, None)

    def _scan_with_failover(self, pieces: _Pieces) -> tuple[Backend, ScanResult, list[str]]:
        notes: list[str] = []
        for backend in self._order():
            try:
                result = self._scan(backend, pieces)
            except SizeLimitExceeded:
                self._mark(backend, failed=False)
                raise
            except ClamdError as exc:
                self._mark(backend, failed=True)
                self.env.metrics.clamd_error(str(backend))
                notes.append(f"clamd={backend} failed: {exc}")
                continue
            self._mark(backend, failed=False)
            return backend, result, notes
        raise _AllFailed(tuple(notes))

    def _scan(self, backend: Backend, pieces: _Pieces) -> ScanResult:
        s = self.clamav
        if not takes_descriptor(backend, pieces.size) or backend in self._streamed_only:
            return scan(backend, pieces, s.connect_timeout, s.scan_timeout)
        try:
            return scan_descriptor(backend, pieces, s.connect_timeout, s.scan_timeout)
        except DescriptorRefused as exc:
            refused = exc
        # Stream the same message: when that works, the descriptor was the
        # trouble (not the message, not clamd), so stop passing one to it.
        result = scan(backend, pieces, s.connect_timeout, s.scan_timeout)
        with self._lock:
            first = backend not in self._streamed_only
            self._streamed_only.add(backend)
        if first:
            # Expected where AppArmor confines clamd (Debian's profile refuses a
            # memory file passed to it): worth a line, not a warning.
            log.info("clamd %s could not scan a passed descriptor (%s): streaming "
                     "every message to it with INSTREAM instead (an AppArmor profile "
                     "refusing it? README, clamav)", backend, refused)
        return result


class _AllFailed(ClamdError):
    """every clamd back end failed"""

    def __init__(self, notes: tuple[str, ...]) -> None:
        super().__init__("; ".join(notes))
        self.notes = notes


class _Pieces:
    """The message as clamd sees it, iterable again for each back end tried."""

    def __init__(self, header: bytes, tx: Transaction, limit: int, whole: int) -> None:
        self.header = header
        self.tx = tx
        self.limit = limit
        self.size = min(whole, limit) if limit else whole  # bytes clamd is sent

    def __iter__(self) -> Iterator[bytes]:
        pieces = self._all()
        if not self.limit:
            yield from pieces
            return
        left = self.limit
        for piece in pieces:
            if len(piece) >= left:
                yield piece[:left]
                return
            left -= len(piece)
            yield piece

    def _all(self) -> Iterator[bytes]:
        yield MBOX_LINE
        yield self.header
        yield b"\r\n"
        yield from self.tx.body.chunks()

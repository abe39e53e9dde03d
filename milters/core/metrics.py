"""Prometheus metrics: what each filter decided, counted across its pre-forked workers.

Off unless `[global] metrics_listen` is set. Then `milters run NAME` (the parent of
the workers, see runner.py) does three things before it builds anything, through
`start_exporter`:

- makes a private directory for prometheus_client's multi-process mode (under
  systemd's $RUNTIME_DIRECTORY, /run/milters, else a temporary directory), empties
  it, and names it in $PROMETHEUS_MULTIPROC_DIR: each worker writes its counters
  into its own mmap file there (prometheus_client's per-pid files), so forked
  workers add up and a dead worker's counts are kept;
- binds the metrics port (`metrics_listen` plus the filter's chain position:
  dkim +0, spf +1, dmarc +2, clamav +3, checks +4, as 8891-8895 for the milter
  sockets), refusing at start if it is taken;
- forks one small exporter process that answers `GET /metrics` by summing the
  directory (prometheus_client.multiprocess.MultiProcessCollector). The
  supervisor never forks from a process that has threads, so the HTTP server is
  a process, not a thread in the parent.

The filters count through the `Metrics` object in their Env: `NullMetrics` (every
method a no-op) when metrics are off, so the hot path pays one method call.
Labels have bounded values only (filter, stage, verdict, result words, table
file and line); no domain, address or virus name becomes a label.

prometheus_client picks its value store when it is first imported, from the
environment: it is imported here lazily, after $PROMETHEUS_MULTIPROC_DIR is set.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milters.core.errors import MiltersError

if TYPE_CHECKING:
    from milters.core.config import Config
    from milters.core.verdict import Verdict

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds of a filter's own work per message (end of message); milter latency
# budgets are tens of ms, DNS-bound checks reach seconds.
WORK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0)
SCAN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0)


def check_listen(value: str) -> str | None:
    """Config check for metrics_listen: empty, or a loopback HOST:PORT."""
    if not value:
        return None
    try:
        host, port = parse_listen(value)
    except ValueError as exc:
        return str(exc)
    if port > 65535 - 4:
        return "a port of at most 65531 (each filter adds its chain position, up to +4)"
    if not ipaddress.ip_address(host).is_loopback:
        # The counters name tables, rules and results: not for the network at
        # large. Put a TLS/auth proxy on the loopback port to scrape from afar.
        return "a loopback address such as 127.0.0.1:9891 or [::1]:9891"
    return None


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:9891' or '[::1]:9891' -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("HOST:PORT such as 127.0.0.1:9891 or [::1]:9891")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"an IP address and port ({host!r} is not an IP address)") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("a port from 1 to 65535")
    return host, port


def filter_listen(cfg: Config, name: str) -> tuple[str, int] | None:
    """Where filter `name` serves its metrics: base port + chain position; None if off."""
    listen = cfg.global_.metrics_listen
    if not listen:
        return None
    host, port = parse_listen(listen)
    # Config.filters is in chain order (registry.FILTERS).
    return host, port + list(cfg.filters).index(name)


def enabled() -> bool:
    """True in a process whose parent set up the multi-process directory."""
    return MULTIPROC_ENV in os.environ


class NullMetrics:
    """Metrics off: every count is a no-op. The base of the real thing."""

    def message(self, filter_name: str, stage: str, verdict: Verdict, ms: float) -> None:
        """A final decision: at end of message, or a refusal at an earlier stage."""

    def error(self, filter_name: str, stage: str, exc: BaseException) -> None:
        """The backstop caught `exc` (timeouts included) and applied on_error."""

    def rule_hit(self, table: str, source: str, action: str, shadow: bool = False) -> None:
        """A checks rule matched (`source` is file:line)."""

    def virus(self) -> None:
        """clamd found a virus."""

    def clamd_error(self, backend: str) -> None:
        """One clamd back end failed (connect, timeout, protocol)."""

    def clamd_scan(self, seconds: float) -> None:
        """A completed clamd scan and how long it took."""


class Metrics(NullMetrics):
    """The counters of one filter process (its workers share the files)."""

    def __init__(self) -> None:
        # Imported here, never at module level: see the module docstring.
        from prometheus_client import Counter, Histogram

        # registry=None: the multi-process collector reads the files, and two
        # Metrics objects (a reload builds a new runtime) may coexist.
        self.messages = Counter(
            "milters_messages", "Messages decided, by filter, SMTP stage and verdict",
            ("filter", "stage", "verdict"), registry=None)
        self.results = Counter(
            "milters_results", "Authentication results written (RFC 8601 method=result)",
            ("filter", "method", "result"), registry=None)
        self.errors = Counter(
            "milters_errors", "Internal errors and timeouts caught by the backstop (on_error)",
            ("filter", "stage", "error"), registry=None)
        self.work = Histogram(
            "milters_work_seconds", "Each filter's own work per message at end of message",
            ("filter",), buckets=WORK_BUCKETS, registry=None)
        self.rules = Counter(
            "milters_checks_rule_hits", "checks table rules that matched (shadow: watched only)",
            ("table", "rule", "action", "shadow"), registry=None)

    def message(self, filter_name: str, stage: str, verdict: Verdict, ms: float) -> None:
        action = verdict.action.name.lower()
        self.messages.labels(filter_name, stage, action).inc()
        for r in verdict.results:
            self.results.labels(filter_name, r.method, r.result).inc()
        if stage == "eom":
            self.work.labels(filter_name).observe(ms / 1000)

    def error(self, filter_name: str, stage: str, exc: BaseException) -> None:
        self.errors.labels(filter_name, stage, type(exc).__name__).inc()

    def rule_hit(self, table: str, source: str, action: str, shadow: bool = False) -> None:
        self.rules.labels(table, source, action, "yes" if shadow else "no").inc()


class ClamavMetrics(Metrics):
    """The clamav filter's own counters on top (unlabelled ones would show, as zeros,
    in every filter's scrape)."""

    def __init__(self) -> None:
        super().__init__()
        from prometheus_client import Counter, Histogram

        self.viruses = Counter("milters_clamav_viruses", "Messages clamd found infected",
                               registry=None)
        self.clamd_errors = Counter("milters_clamav_clamd_errors",
                                    "clamd back ends that failed a scan", ("backend",),
                                    registry=None)
        self.scans = Histogram("milters_clamav_scan_seconds", "clamd scan time per message",
                               buckets=SCAN_BUCKETS, registry=None)

    def virus(self) -> None:
        self.viruses.inc()

    def clamd_error(self, backend: str) -> None:
        self.clamd_errors.labels(backend).inc()

    def clamd_scan(self, seconds: float) -> None:
        self.scans.observe(seconds)


def for_process(cfg: Config, name: str) -> NullMetrics:
    """The Metrics for filter `name`'s runtime being built here (Null when off).

    On only in a `milters run` whose exporter is set up (not in `milters test`,
    `check-config` or the `serve` parent, which build runtimes too).
    """
    if not (cfg.global_.metrics_listen and enabled()):
        return NullMetrics()
    return ClamavMetrics() if name == "clamav" else Metrics()


# --- the exporter --------------------------------------------------------------


@dataclass(frozen=True)
class Exporter:
    """The running exporter of one filter process group (or none: metrics off)."""

    directory: Path | None = None
    address: tuple[str, int] | None = None
    pid: int = 0

    def worker_exited(self, pid: int) -> None:
        """The supervisor reaped child `pid`: prometheus_client's bookkeeping."""
        if self.directory is None:
            return
        if pid == self.pid:
            # Not restarted: the mail keeps flowing and counting; only scrapes fail.
            log.error("metrics exporter (pid %d) exited: metrics are not served until "
                      "the filter is restarted", pid)
            return
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]


def start_exporter(cfg: Config, name: str) -> Exporter:
    """Set up metrics for filter `name` (see the module docstring); Exporter() if off."""
    where = filter_listen(cfg, name)
    if where is None:
        os.environ.pop(MULTIPROC_ENV, None)
        return Exporter()
    directory = _private_dir(name)
    os.environ[MULTIPROC_ENV] = str(directory)
    if "prometheus_client.values" in sys.modules:
        # Imported before the variable was set (by a tool in this process): the
        # store it chose would count per process only; choose again.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise MiltersError(
            f"filter {name}: cannot serve metrics on {where[0]}:{where[1]}: {exc.strerror}"
        ) from None
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _serve(sock, directory, name, parent)  # never returns
    sock.close()
    log.info("filter %s: metrics on http://%s:%d/metrics (pid %d, %s)",
             name, _host(where[0]), where[1], pid, directory)
    return Exporter(directory, where, pid)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _private_dir(name: str) -> Path:
    """A directory only this process group writes to, emptied now.

    Files left by an earlier run would add their old counts to ours (and a
    reused pid would continue them), so the directory starts empty.
    """
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime and os.access(runtime, os.W_OK):
        directory = Path(runtime) / f"metrics-{name}"
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)
        directory.mkdir(mode=0o700)
        return directory
    directory = Path(tempfile.mkdtemp(prefix=f"milters-metrics-{name}-"))
    parent = os.getpid()

    def remove() -> None:
        if os.getpid() == parent:  # not in a forked child that happens to exit normally
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    return directory


def _serve(sock: socket.socket, directory: Path, name: str, parent: int) -> None:
    """Body of the exporter process: answer scrapes until the filter's parent exits."""
    from milters.core.supervisor import child_signals, die_with_parent

    child_signals()
    die_with_parent(signal.SIGTERM, parent)
    status = 0
    try:
        server = _Server(directory, sock)
        server.serve_forever()
    except Exception:  # dying anyway: say why
        log.exception("filter %s: metrics exporter failed", name)
        status = 1
    logging.shutdown()
    os._exit(status)


class _Server(HTTPServer):
    def __init__(self, directory: Path, sock: socket.socket) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket = sock
        self.directory = directory


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is here")
            return
        body, content_type = render(self.server.directory)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # one line per scrape would drown the mail log


def render(directory: Path) -> tuple[bytes, str]:
    """The summed counters of every worker, in the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def sample_scrape_targets(cfg: Config, served: Sequence[str]) -> Mapping[str, str]:
    """name -> host:port of the metrics of what is `served` (registry.units: the
    filters' sockets, or the chain's one), for the docs and `milters stats`."""
    out: dict[str, str] = {}
    for name in served:
        where = filter_listen(cfg, name)
        if where is not None:
            out[name] = f"{_host(where[0])}:{where[1]}"
    return out

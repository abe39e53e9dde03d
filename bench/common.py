"""What both benchmarks share: percentiles, process memory and CPU from /proc, results.

Memory is read from /proc/PID/status (VmRSS, VmHWM) and /proc/PID/smaps_rollup
(Pss). RSS summed over a pre-forked filter counts the pages the workers still
share with the parent once per process, so it overstates; PSS splits shared pages
between the processes that map them, so its sum is the memory the filter really
holds. Both are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support.processes import ManagedProcess, ProcessFactory

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
TABLES_DIR = BENCH_DIR / "tables"

# A p50 in this range means a delayed-ACK/Nagle stall (shared/notes/milter-latency.md):
# Linux delays an ACK by about 40 ms, so one stall per message shows as 40-90 ms.
STALL_MS = 30.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def ensure_repo_on_path() -> None:
    """Let `python bench/x.py` import `bench` and `tests` as `python -m bench.x` does."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


# --- statistics -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low))


def latency_summary(values_ms: Iterable[float]) -> dict[str, float | int]:
    """count, mean, p50, p95, p99 and max of latencies in milliseconds (3 decimals)."""
    values = sorted(values_ms)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "mean": round(sum(values) / len(values), 3),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(values[-1], 3),
    }


def stall_suspected(p50_ms: float | None, cpu_ms_per_msg: float | None,
                    connections: int) -> bool:
    """Whether a median latency looks like a delayed-ACK stall rather than work.

    A stall is waiting with nothing to do: p50 at or above STALL_MS while the filter
    spent far less CPU per message. A filter that is merely busy (a large body, many
    rules) has p50 near its CPU time per message, times the connections queued on
    it at worst; 1.5 x that plus 20 ms is the most we put down to work.
    """
    if p50_ms is None or p50_ms < STALL_MS:
        return False
    if cpu_ms_per_msg is None:
        return True
    return p50_ms > 1.5 * cpu_ms_per_msg * connections + 20.0


def stall_fraction(values_ms: Iterable[float], threshold: float = STALL_MS) -> float:
    """Share of latencies at or above `threshold` (a stall costs ~40 ms each)."""
    values = list(values_ms)
    if not values:
        return 0.0
    return round(sum(v >= threshold for v in values) / len(values), 4)


# --- processes ----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (a pre-forked filter: parent and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time of these processes (threads included)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process tree, reaped children included.

    Each live process counts its own time plus that of the children it has reaped
    (stat's cutime/cstime), so the difference of two readings is the tree's CPU in
    between even when Postfix's smtpd and cleanup processes come and go: a process
    that exits moves its time into its parent's reaped total.
    """
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / _CLK_TCK


def system_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine, all CPUs, from /proc/stat.

    Processes that come and go during a run (Postfix's smtpd and cleanup, client
    processes) are counted too, which per-process accounting would miss.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal (guest time is inside user).
    values = [int(v) for v in fields[:8]]
    busy = sum(values) - values[3] - values[4]
    return busy / _CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of the calling process so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_STATUS_KB = re.compile(rb"^(VmRSS|VmHWM|Threads):\s+(\d+)", re.MULTILINE)
_PSS_KB = re.compile(rb"^Pss:\s+(\d+) kB", re.MULTILINE)


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory in KiB, and its thread count."""

    pid: int
    rss_kb: int
    hwm_kb: int  # peak RSS over the process's life
    pss_kb: int
    threads: int


def process_memory(pid: int) -> ProcessMemory | None:
    try:
        status = Path(f"/proc/{pid}/status").read_bytes()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {m.group(1).decode(): int(m.group(2)) for m in _STATUS_KB.finditer(status)}
    pss = _PSS_KB.search(rollup)
    return ProcessMemory(
        pid,
        values.get("VmRSS", 0),
        values.get("VmHWM", 0),
        int(pss.group(1)) if pss else 0,
        values.get("Threads", 0),
    )


def tree_memory(root: int) -> dict[str, Any]:
    """Memory of a process tree: sums in MiB and each process."""
    procs = [m for m in (process_memory(p) for p in process_tree(root)) if m is not None]
    mib = 1024.0
    return {
        "processes": len(procs),
        "rss_mib": round(sum(p.rss_kb for p in procs) / mib, 2),
        "pss_mib": round(sum(p.pss_kb for p in procs) / mib, 2),
        "hwm_mib": round(sum(p.hwm_kb for p in procs) / mib, 2),
        "threads": sum(p.threads for p in procs),
        "each": [asdict(p) for p in procs],
    }


def wait_cpu_idle(pids: Sequence[int], quiet_polls: int = 3, interval: float = 0.05,
                  timeout: float = 10.0) -> None:
    """Poll until these processes use no CPU for `quiet_polls` polls in a row.

    Used before reading memory: the filter may still be digesting what we sent.
    """
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pids)
    quiet = 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        time.sleep(interval)
        now = cpu_seconds(pids)
        quiet = quiet + 1 if now == last else 0
        last = now


# --- command line ---------------------------------------------------------------------


def arg_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`: the first paragraph of `doc` as description,
    defaults shown in --help."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.split("\n\n")[0] if doc else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


# --- starting filters ---------------------------------------------------------------


def spec_for(port: int) -> str:
    """The libmilter socket spec of a milter listening on 127.0.0.1:port."""
    return f"inet:{port}@127.0.0.1"


def wait_workers(pid: int, workers: int, timeout: float = 10.0) -> None:
    """The parent forks its workers once the socket is open: wait until all are there."""
    deadline = time.monotonic() + timeout
    while len(process_tree(pid)) < workers + 1 and time.monotonic() < deadline:
        time.sleep(0.02)


def start_milters(factory: ProcessFactory, name: str, config: Path, port: int,
                  workers: int | None = None) -> ManagedProcess:
    """`milters run NAME --config CONFIG` from this checkout, listening on `port`;
    with `workers`, also wait until that many workers are forked."""
    argv = [sys.executable, "-m", "milters", "run", name, "--config", str(config)]
    proc = factory.start(argv, port, env={"PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)
    if workers is not None:
        wait_workers(proc.pid, workers)
    return proc


# --- results -------------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    """What the numbers depend on: CPUs, kernel, Python, Postfix version."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        proc = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True,
                              text=True, timeout=10)
        if proc.returncode == 0:
            info["postfix"] = proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import Milter  # only to record its version

        info["pymilter"] = getattr(Milter, "__version__", "?")
    except ImportError:
        pass
    return info


def new_result(benchmark: str, **fields: Any) -> dict[str, Any]:
    """A result's head: its name, when it started, the host, then `fields`."""
    return {"benchmark": benchmark, "started": timestamp(), "host": host_info(), **fields}


def timestamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_results(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    """Write `data` as JSON to `out` or bench/results/NAME-TIMESTAMP.json."""
    path = out or RESULTS_DIR / f"{name}-{timestamp()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def report(name: str, result: dict[str, Any], tables: Iterable[str],
           out: Path | None = None) -> Path:
    """Write `result` (write_results), print each table and a blank line, then the path."""
    path = write_results(name, result, out)
    for text in tables:
        print(text)
        print()
    print(f"results: {path}")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = []
        for i, text in enumerate(row):
            numeric = n > 0 and _is_number(text)
            parts.append(text.rjust(widths[i]) if numeric else text.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return False
    return True

"""Evaluation of the milter server core: what a dialogue costs in pymilter and
libmilter, against the same dialogue served by a small pure-Python protocol loop.

Issue 13 asks where our CPU per message goes and, if the libmilter thread model is
the floor, for numbers on another core. Three servers do the same minimal work
(take every callback a header and body filter needs, keep the header fields and
body, add one field at end of message, accept), each in one process:

- `pymilter`: a plain Milter.Base subclass (what any pymilter filter pays);
- `python`: the milter protocol read and answered in Python (milters.client.wire
  constants), one thread per connection with blocking sockets, packets parsed
  from one buffer;
- `ours, libmilter core` and `ours, python core`: our adapter and pipeline with
  the core-only `scripted` test filter (bench/milter_bench.py --filter scripted),
  under `[global] milter_core = "libmilter"` and `"python"` (core/pyserver.py).

bench/milter_bench.py drives each as Postfix would (one milter connection per
message, no TCP_NODELAY on the client) and reports the filter's CPU; this prints
the CPU milliseconds per message of each server side by side.

    python -m bench.core_eval [--count 3000] [--connections 1 4]

The bare `python` loop keeps no macros and has no limits: it is the floor of a
Python core; `ours, python core` is the real one.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python bench/core_eval.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from milters.client import wire
from tests.support.processes import ProcessFactory, free_port

_HEAD = struct.Struct(">I")
# What the minimal filter negotiates: no UNKNOWN, no reply for headers and body
# chunks (as our adapter does), header values with their leading space.
_PROTOCOL = int(wire.ProtocolFlag.NOUNKNOWN | wire.ProtocolFlag.NR_HDR
                | wire.ProtocolFlag.NR_BODY | wire.ProtocolFlag.HDR_LEADSPC)
_CONTINUE = _HEAD.pack(1) + wire.SMFIR_CONTINUE


def _python_session(conn: socket.socket) -> None:
    """One milter connection: packets read from one buffer, answered in place."""
    buf = b""
    headers: list[tuple[bytes, bytes]] = []
    body: list[bytes] = []
    protocol = 0
    try:
        while True:
            while len(buf) < 4 or len(buf) < 4 + _HEAD.unpack_from(buf)[0]:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            size = _HEAD.unpack_from(buf)[0]
            cmd, data = buf[4:5], buf[5:4 + size]
            buf = buf[4 + size:]
            if cmd == wire.SMFIC_OPTNEG:
                _, actions, offered = struct.unpack(">III", data[:12])
                protocol = _PROTOCOL & offered
                conn.sendall(_HEAD.pack(13) + wire.SMFIC_OPTNEG + struct.pack(
                    ">III", 6, int(wire.ActionFlag.ADDHDRS) & actions, protocol))
            elif cmd == wire.SMFIC_MACRO or cmd == wire.SMFIC_ABORT:
                continue
            elif cmd == wire.SMFIC_HEADER:
                name, value, _ = data.split(b"\0", 2)
                headers.append((name, value))
                if not protocol & int(wire.ProtocolFlag.NR_HDR):
                    conn.sendall(_CONTINUE)
            elif cmd == wire.SMFIC_BODY:
                body.append(data)
                if not protocol & int(wire.ProtocolFlag.NR_BODY):
                    conn.sendall(_CONTINUE)
            elif cmd == wire.SMFIC_BODYEOB:
                field = b"X-Floor\0 1\0"
                conn.sendall(_HEAD.pack(5 + len(field)) + wire.SMFIR_INSHEADER
                             + struct.pack(">I", 0) + field
                             + _HEAD.pack(1) + wire.SMFIR_ACCEPT)
                headers, body = [], []
            elif cmd == wire.SMFIC_QUIT:
                return
            elif cmd == wire.SMFIC_QUIT_NC:
                headers, body = [], []
            else:  # connect, helo, mail, rcpt, data, end of header
                conn.sendall(_CONTINUE)
    finally:
        conn.close()


def serve_python(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_python_session, args=(conn,), daemon=True).start()


def serve_pymilter(port: int) -> None:
    import Milter

    class Minimal(Milter.Base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.fields: list[tuple[str, bytes]] = []
            self.chunks: list[bytes] = []

        def connect(self, hostname: str, family: int, hostaddr: object) -> int:
            return int(Milter.CONTINUE)

        def hello(self, helo: str) -> int:
            return int(Milter.CONTINUE)

        def envfrom(self, mail_from: str, *params: str) -> int:
            return int(Milter.CONTINUE)

        def envrcpt(self, rcpt: str, *params: str) -> int:
            return int(Milter.CONTINUE)

        def data(self) -> int:
            return int(Milter.CONTINUE)

        @Milter.noreply  # type: ignore[misc]
        def header(self, name: str, value: bytes) -> int:
            self.fields.append((name, value))
            return int(Milter.CONTINUE)

        def eoh(self) -> int:
            return int(Milter.CONTINUE)

        @Milter.noreply  # type: ignore[misc]
        def body(self, chunk: bytes) -> int:
            self.chunks.append(chunk)
            return int(Milter.CONTINUE)

        def eom(self) -> int:
            self.addheader("X-Floor", " 1", 0)
            return int(Milter.ACCEPT)

    Milter.header_leading_space(Minimal)
    Milter.factory = Minimal
    Milter.set_flags(Milter.ADDHDRS)
    # The listening socket with TCP_NODELAY, as our runner sets it: without it the
    # plain pymilter filter pays the 40 ms stalls (shared/notes/milter-latency.md),
    # which cost no CPU but would hide nothing here either.
    Milter.runmilter("core-eval", f"inet:{port}@127.0.0.1", 60)


def _bench(spec: str, pid: int | None, args: argparse.Namespace,
           extra: Sequence[str] = ()) -> list[dict[str, float]]:
    out_file = Path(tempfile.mkdtemp(prefix="core-eval-")) / "result.json"
    argv = [sys.executable, "-m", "bench.milter_bench", "--corpus", "small", "--count",
            str(args.count), "--no-memory", "--quiet", "--out", str(out_file), *extra]
    if pid is not None:
        argv += ["--socket", spec, "--pid", str(pid)]
    for n in args.connections:
        argv += ["--connections", str(n)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1200,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0 or not out_file.exists():
        raise SystemExit(f"milter_bench failed:\n{out.stdout}\n{out.stderr}")
    data = json.loads(out_file.read_text())
    rows = []
    for case in data["cases"]:
        rate = float(case["msgs_per_s"])
        cpu = float(case["filter_cpu_pct"] or 0.0)
        rows.append({"connections": case["connections"], "msgs_per_s": rate,
                     "cpu_ms_per_msg": round(cpu / 100 / rate * 1000, 3) if rate else 0.0})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    p.add_argument("--serve", choices=("python", "pymilter"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        (serve_python if args.serve == "python" else serve_pymilter)(args.port)
        return 0
    results: dict[str, list[dict[str, float]]] = {}
    with ProcessFactory() as factory:
        for name in ("pymilter", "python"):
            port = free_port()
            proc = factory.start([sys.executable, "-m", "bench.core_eval", "--serve", name,
                                  "--port", str(port)], port,
                                 cwd=Path(__file__).resolve().parents[1])
            results[name] = _bench(f"inet:{port}@127.0.0.1", proc.pid, args)
            proc.kill()
    for core in ("libmilter", "python"):
        results[f"ours, {core} core"] = _bench("", None, args, (
            "--filter", "scripted", "--workers", "1", "--milter-core", core))
    print("server core            connections  msgs/s   CPU ms per message")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:<22} {r['connections']:>11}  {r['msgs_per_s']:>6.0f}   "
                  f"{r['cpu_ms_per_msg']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

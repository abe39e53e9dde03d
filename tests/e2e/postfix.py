"""A private Postfix instance on 127.0.0.1 for end-to-end tests.

The instance lives in its own directory (mkdtemp under /tmp, mode 755: pytest's
tmp_path is 0700 and the postfix user could not traverse it) with its own main.cf,
master.cf, queue, data directory, log file and one Maildir that receives every
recipient in `test.example`. It never touches the default instance in /etc/postfix.

Everything here waits by polling against a deadline (ports, the Maildir, the queue,
the log), never by fixed sleeps, so a slow machine makes tests slower, not flaky.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from functools import cached_property
from pathlib import Path

from tests.support.processes import LOOPBACK, free_port, wait_until

POSTFIX = Path("/usr/sbin/postfix")
SENDMAIL = Path("/usr/sbin/sendmail")
POSTQUEUE = Path("/usr/sbin/postqueue")
POSTSUPER = Path("/usr/sbin/postsuper")
DEFAULT_CONFIG_DIR = Path("/etc/postfix")

MAIL_DOMAIN = "test.example"
MYHOSTNAME = "mx.test.example"
# Maildir files belong to this static uid/gid (virtual(8) refuses uid 0).
MAILBOX_UID = 5000

# Generous: a loaded CI machine can be many times slower than a laptop.
DELIVERY_TIMEOUT = 30.0
RESTART_TIMEOUT = 30.0
SETTLE_TIMEOUT = 10.0

# Queues a message passes through on its way to delivery (postqueue -j queue_name).
IN_FLIGHT = frozenset({"maildrop", "incoming", "active"})

_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


class PostfixError(RuntimeError):
    """A postfix command failed or the instance did not reach the expected state."""


def unavailable_reason() -> str | None:
    """Why the e2e tier cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "end-to-end tests need root to run a private Postfix instance"
    if not POSTFIX.exists():
        return f"{POSTFIX} is missing (install the Debian package 'postfix')"
    return None


# --- results ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code and text (lines of a multi-line reply joined with newline)."""

    code: int
    text: str

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code at the start of the text, if any."""
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.text)
        return m.group(1) if m else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


# A reply that stands for "the server hung up" (smtplib's SMTPServerDisconnected).
DISCONNECTED = -1


@dataclass
class SendResult:
    """What the SMTP server answered at each step of one transaction.

    `data` is None when no recipient was accepted, so DATA was never sent.
    """

    banner: Reply
    ehlo: Reply
    xclient: Reply | None = None
    mail: Reply | None = None
    rcpts: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None

    @property
    def accepted(self) -> bool:
        """The message was accepted for delivery (250 at end of DATA)."""
        return self.data is not None and self.data.code == 250

    @property
    def queue_id(self) -> str | None:
        """The queue id from "250 2.0.0 Ok: queued as ID"."""
        if self.data is None:
            return None
        m = _QUEUED_AS.search(self.data.text)
        return m.group(1) if m else None


@dataclass(frozen=True)
class DeliveredMessage:
    """A message as virtual(8) wrote it into the Maildir (LF line endings)."""

    path: Path
    raw: bytes

    @cached_property
    def raw_headers(self) -> list[tuple[str, bytes]]:
        """(name, value) in file order; value is the exact bytes after the colon,
        folding and leading space kept, final newline removed."""
        head = self.raw.split(b"\n\n", 1)[0]
        fields: list[tuple[str, bytes]] = []
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t") and fields:
                # A continuation line: part of the previous field's value.
                fields[-1] = (fields[-1][0], fields[-1][1] + b"\n" + line)
                continue
            raw_name, sep, value = line.partition(b":")
            if sep:
                fields.append((raw_name.decode("ascii", "replace"), value))
        return fields

    @cached_property
    def headers(self) -> list[tuple[str, str]]:
        """(name, value) in file order; value decoded, leading whitespace removed,
        folds kept as newline + whitespace."""
        return [
            (name, value.decode("utf-8", "surrogateescape").lstrip(" \t"))
            for name, value in self.raw_headers
        ]

    @property
    def header_names(self) -> list[str]:
        return [name for name, _ in self.headers]

    def get_all(self, name: str) -> list[str]:
        """Every value of the header `name` (case-insensitive), in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        """The first value of the header `name`, or None."""
        values = self.get_all(name)
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        parts = self.raw.split(b"\n\n", 1)
        return parts[1] if len(parts) == 2 else b""

    @cached_property
    def message(self) -> Message:
        """The parsed message (compat32 keeps header order and raw values)."""
        return BytesParser(policy=compat32).parsebytes(self.raw)

    @property
    def delivered_to(self) -> str | None:
        """The envelope recipient virtual(8) delivered this copy for."""
        return self.get("Delivered-To")


# --- the instance ---------------------------------------------------------------


def _master_cf(source: str, smtp_port: int, submission_port: int) -> str:
    """Debian's master.cf with chroot off, and smtpd listening on our loopback ports.

    Chroot is off on every service: a chroot would need copies of /etc files in the
    queue directory. The second smtpd imitates a submission service: its daemon name
    tells filters that mail arriving there is ours (SASL is not set up here).
    """
    out: list[str] = []
    for line in source.splitlines():
        if not line.strip() or line.startswith("#") or line[0].isspace():
            out.append(line)
            continue
        cols = line.split()
        if len(cols) >= 8:
            cols[4] = "n"
            if cols[0] == "smtp" and cols[1] == "inet":
                cols[0] = f"{LOOPBACK}:{smtp_port}"
        out.append("  ".join(cols[:8]) + ("  " + " ".join(cols[8:]) if cols[8:] else ""))
    out += [
        f"{LOOPBACK}:{submission_port} inet  n  -  n  -  -  smtpd",
        "  -o syslog_name=postfix/submission",
        "  -o milter_macro_daemon_name=ORIGINATING",
        "  -o smtpd_sasl_auth_enable=no",
    ]
    return "\n".join(out) + "\n"


class PostfixInstance:
    """One private Postfix instance: configure it, send to it, look at what it did."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="milters-postfix-", dir="/tmp"))
        # mkdtemp makes 0700; the postfix and uid-5000 processes must traverse it.
        os.chmod(self.root, 0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "log"
        self.log_file = self.log_dir / "maillog"
        self.mail_base = self.root / "mail"
        self.maildir = self.mail_base / "Maildir"
        self.port = free_port()
        self.submission_port = free_port()
        while self.submission_port == self.port:
            self.submission_port = free_port()
        self._generation = 0
        self._current: dict[str, str] | None = None
        self._log_mark = 0
        self._running = False

    # -- configuration -------------------------------------------------------

    def base_config(self) -> dict[str, str]:
        """main.cf settings every test starts from (no milters)."""
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # maillog_file must sit under one of these prefixes, else Postfix dies
            # silently when there is no tty; our own directory is added to the list.
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.log_dir}",
            "maillog_file": str(self.log_file),
            "myhostname": MYHOSTNAME,
            "mydomain": MAIL_DOMAIN,
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": "",
            "virtual_mailbox_domains": MAIL_DOMAIN,
            "virtual_mailbox_base": str(self.mail_base),
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{MAILBOX_UID}",
            "virtual_gid_maps": f"static:{MAILBOX_UID}",
            "smtpd_peername_lookup": "no",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # No 1 s penalty sleeps after rejections: tests reject on purpose.
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "no",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            # Short enough that a hung test milter fails a test quickly, long enough
            # that a slow machine does not trip them.
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "20s",
            "smtpd_milters": "",
            "non_smtpd_milters": "",
        }

    def _write_main_cf(self, params: Mapping[str, str]) -> None:
        self._generation += 1
        lines = [f"# written by tests/e2e/postfix.py, generation {self._generation}"]
        # The banner names the generation: send() checks it, so a test can never talk
        # to an smtpd still running an earlier configuration.
        lines.append(f"smtpd_banner = $myhostname ESMTP gen-{self._generation}")
        lines += [f"{k} = {v}" for k, v in params.items()]
        main_cf = self.config_dir / "main.cf"
        main_cf.write_text("\n".join(lines) + "\n")
        # Postfix 3.7's start stalls until main.cf is a second or two old (seen: 1.5 to
        # 2.4 s versus 0.03 s). An mtime in the past avoids that, and a full stop and
        # start re-reads the file whatever its mtime.
        past = time.time() - 10
        os.utime(main_cf, (past, past))

    def configure(self, **params: str) -> None:
        """Set main.cf to the base config plus `params`; restart only if it changed.

        Earlier calls do not leak: every call starts again from `base_config()`.
        """
        wanted = self.base_config()
        wanted.update({k: str(v) for k, v in params.items()})
        if wanted == self._current and self._running:
            return
        self._write_main_cf(wanted)
        self._current = wanted
        if self._running:
            self.restart()

    def set_milters(
        self,
        smtpd_milters: Sequence[str],
        non_smtpd_milters: Sequence[str] | None = None,
        **extra_main_cf: str,
    ) -> None:
        """Attach these milters ("inet:127.0.0.1:PORT" each) and apply the new config.

        When this returns, new SMTP sessions and new pickups use the new settings.
        """
        self.configure(
            smtpd_milters=", ".join(smtpd_milters),
            non_smtpd_milters=", ".join(non_smtpd_milters or ()),
            **extra_main_cf,
        )

    # -- life cycle ----------------------------------------------------------

    def setup(self) -> None:
        """Create the tree and config, check it, start the master."""
        self.config_dir.mkdir()
        self.queue_dir.mkdir()  # root-owned; `postfix check` creates the tree inside
        self.log_dir.mkdir()
        self.data_dir.mkdir()
        shutil.chown(self.data_dir, "postfix", "postfix")
        self.mail_base.mkdir()
        os.chown(self.mail_base, MAILBOX_UID, MAILBOX_UID)
        master = (DEFAULT_CONFIG_DIR / "master.cf").read_text()
        (self.config_dir / "master.cf").write_text(
            _master_cf(master, self.port, self.submission_port)
        )
        self._current = self.base_config()
        self._write_main_cf(self._current)
        # The first `check` creates the queue tree (about 2.5 s).
        self._postfix("check", timeout=120)
        self.start()

    def _postfix(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(POSTFIX), "-c", str(self.config_dir), command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise PostfixError(
                f"postfix {command} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
                f"log tail:\n{self.log_tail()}"
            )
        return proc

    def master_pid(self) -> int | None:
        """The pid of this instance's running master, or None."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        # The pid file outlives the master; make sure a reused pid is not someone
        # else's process: our master runs in our queue directory.
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        if not _alive(pid) or Path(cwd) != self.queue_dir:
            return None
        return pid

    def start(self) -> None:
        """Start the master and wait until the current config's smtpd answers."""
        atexit.register(self.stop)  # never leave an orphaned master behind
        self._postfix("start")
        self._running = True
        self._wait_serving()

    def stop(self) -> None:
        """Stop the master and every child; safe to call when already stopped.

        SIGTERM to the master (it passes SIGTERM to its process group), then poll until
        the whole group is gone: a lingering child still holds the listening sockets,
        and a `postfix start` racing it fails. `postfix stop` itself would sleep in
        whole seconds while it waits.
        """
        self._running = False
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not _alive(pid), RESTART_TIMEOUT, interval=0.005):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Children usually exit within milliseconds, but one now and then lingers for
        # a second; the tests reconfigure only between messages, so kill stragglers.
        if not wait_until(lambda: not _group(pid), 0.3, interval=0.005):
            for child in _group(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            if not wait_until(lambda: not _group(pid), RESTART_TIMEOUT, interval=0.01):
                raise PostfixError(f"Postfix processes {_group(pid)} survived SIGKILL")

    def restart(self) -> None:
        """Apply main.cf: a full stop and start (well under 0.1 s), so no old smtpd with
        the previous milters can take the next connection, as it could after a reload."""
        self.stop()
        self._start_quick()

    def _start_quick(self) -> None:
        # postfix-script skips its integrity checks (about 2 s: postsuper scans the
        # queue, find(1) checks permissions) once when this file exists; `setup`
        # already ran them and the tree has not changed since.
        (self.queue_dir / "quick-start").touch()
        self._postfix("start")
        self._running = True
        self._wait_serving()

    def _wait_serving(self) -> None:
        """Poll until the new master listens on both smtpd ports.

        Listening is read from /proc/net/tcp rather than by connecting: an SMTP
        session would reach the milters and show up in what the test's probes saw.
        The old master and all its children are gone by now (see `stop`), so the
        listener belongs to the new master, which has read the current main.cf.
        """
        ports = {self.port, self.submission_port}
        if not wait_until(lambda: ports <= _listening_ports(), RESTART_TIMEOUT, interval=0.01):
            raise PostfixError(
                f"Postfix is not listening on ports {sorted(ports - _listening_ports())}; "
                f"log tail:\n{self.log_tail()}"
            )

    def destroy(self, keep: bool = False) -> None:
        """Stop and remove the instance directory (kept when `keep`, for debugging)."""
        self.stop()
        atexit.unregister(self.stop)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def reset(self) -> None:
        """Between tests: empty the Maildir and every queue, start a new log section.

        A message the previous test sent but did not wait for may still be on its way
        to the Maildir, where it would count as the next test's delivery. So first
        let in-flight mail settle (nothing in maildrop, incoming or active; held and
        deferred mail stays put), then delete the queue, then empty the Maildir.
        If mail does not settle, stop Postfix, which ends every delivery, and start
        it again after cleaning.
        """
        settled = not self._running or wait_until(
            lambda: not any(m.get("queue_name") in IN_FLIGHT for m in self.queue()),
            SETTLE_TIMEOUT,
            interval=0.02,
        )
        if not settled:
            self.stop()
        self.delete_queue()
        self.clear_mailbox()
        self.mark_log()
        if not settled:
            self._start_quick()

    # -- sending -------------------------------------------------------------

    def send(
        self,
        mail_from: str,
        rcpts: Iterable[str],
        message: bytes,
        xclient: Mapping[str, str] | None = None,
        port: int | None = None,
        helo: str = "client.test.example",
        timeout: float = 60,
    ) -> SendResult:
        """One SMTP transaction; every reply is captured, none raises.

        `xclient` (e.g. {"ADDR": "192.0.2.5", "NAME": "mail.sender.example",
        "HELO": "mail.sender.example"}) is sent as XCLIENT, followed by a new EHLO
        (with the XCLIENT HELO name, so the two agree), as a proxy would do.
        """
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        smtp = smtplib.SMTP(timeout=timeout)
        code, text = smtp.connect(LOOPBACK, port or self.port)
        result = SendResult(banner=_reply(code, text), ehlo=Reply(0, ""))
        if f"gen-{self._generation}" not in result.banner.text:
            smtp.close()
            raise PostfixError(f"smtpd runs an old configuration: {result.banner}")
        try:
            result.ehlo = _reply(*smtp.ehlo(helo))
            if xclient:
                attrs = " ".join(f"{k.upper()}={v}" for k, v in xclient.items())
                result.xclient = _reply(*smtp.docmd("XCLIENT", attrs))
                if result.xclient.code != 220:
                    return result
                helo_after = next((v for k, v in xclient.items() if k.upper() == "HELO"), helo)
                result.ehlo = _reply(*smtp.ehlo(helo_after))
            result.mail = _reply(*smtp.mail(mail_from))
            if result.mail.code != 250:
                return result
            for rcpt in rcpt_list:
                result.rcpts[rcpt] = _reply(*smtp.rcpt(rcpt))
            if not any(r.code in (250, 251) for r in result.rcpts.values()):
                return result
            try:
                result.data = _reply(*smtp.data(message))
            except smtplib.SMTPDataError as exc:  # DATA itself refused (before 354)
                result.data = _reply(exc.smtp_code, exc.smtp_error)
        except smtplib.SMTPServerDisconnected as exc:
            reply = Reply(DISCONNECTED, str(exc))
            if result.mail is None:
                result.mail = reply
            else:
                result.data = reply
            return result
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()
        return result

    def sendmail(
        self, mail_from: str, rcpts: Iterable[str], message: bytes, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Submit through /usr/sbin/sendmail (postdrop, pickup, cleanup), the path
        that runs non_smtpd_milters. Raises PostfixError if sendmail fails."""
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        proc = subprocess.run(
            [str(SENDMAIL), "-C", str(self.config_dir), "-f", mail_from, "-i", "--", *rcpt_list],
            input=message,
            capture_output=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise PostfixError(
                f"sendmail exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
            )
        return proc

    # -- looking at results ----------------------------------------------------

    def delivered(self) -> list[DeliveredMessage]:
        """Messages in Maildir/new now, oldest first.

        virtual(8) writes into tmp/ and renames into new/, so files here are complete.
        """
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        files = []
        for p in new.iterdir():
            with contextlib.suppress(FileNotFoundError):
                files.append((p.stat().st_mtime_ns, p.name, p))
        return [DeliveredMessage(p, p.read_bytes()) for _, _, p in sorted(files)]

    def wait_delivered(
        self, count: int = 1, timeout: float = DELIVERY_TIMEOUT
    ) -> list[DeliveredMessage]:
        """Poll the Maildir until at least `count` messages are there; return them all."""
        if not wait_until(lambda: len(self.delivered()) >= count, timeout, interval=0.02):
            raise AssertionError(
                f"expected {count} delivered message(s) within {timeout:g} s, found "
                f"{len(self.delivered())}; queue: {self.queue()}\nlog:\n{self.log_text()}"
            )
        return self.delivered()

    def clear_mailbox(self) -> None:
        for sub in ("new", "cur", "tmp"):
            d = self.maildir / sub
            if d.is_dir():
                for p in d.iterdir():
                    p.unlink(missing_ok=True)

    def queue(self) -> list[dict[str, object]]:
        """postqueue -j: one dict per queued message (queue_name, queue_id, ...)."""
        proc = subprocess.run(
            [str(POSTQUEUE), "-c", str(self.config_dir), "-j"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise PostfixError(f"postqueue -j exited {proc.returncode}: {proc.stderr}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def queue_ids(self, queue_name: str | None = None) -> list[str]:
        """Queue ids of every queued message, or of those in `queue_name` only."""
        return [
            str(m["queue_id"])
            for m in self.queue()
            if queue_name is None or m.get("queue_name") == queue_name
        ]

    def hold_queue(self) -> list[str]:
        """Queue ids in the hold queue (where a milter's quarantine puts a message)."""
        return self.queue_ids("hold")

    def wait_held(self, count: int = 1, timeout: float = DELIVERY_TIMEOUT) -> list[str]:
        """Poll until at least `count` messages are on hold; return their queue ids."""
        if not wait_until(lambda: len(self.hold_queue()) >= count, timeout, interval=0.05):
            raise AssertionError(
                f"expected {count} held message(s) within {timeout:g} s; "
                f"queue: {self.queue()}\nlog:\n{self.log_text()}"
            )
        return self.hold_queue()

    def wait_queue_empty(self, timeout: float = DELIVERY_TIMEOUT) -> None:
        """Poll until nothing is queued (every message delivered, bounced or dropped)."""
        if not wait_until(lambda: not self.queue(), timeout, interval=0.05):
            raise AssertionError(f"queue not empty after {timeout:g} s: {self.queue()}")

    def delete_queue(self) -> None:
        """Delete every queued message, hold queue included."""
        subprocess.run(
            [str(POSTSUPER), "-c", str(self.config_dir), "-d", "ALL"],
            capture_output=True,
            timeout=60,
            check=True,
        )

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (postqueue -f)."""
        subprocess.run(
            [str(POSTQUEUE), "-c", str(self.config_dir), "-f"],
            capture_output=True,
            timeout=60,
            check=True,
        )

    # -- the log -------------------------------------------------------------

    def _read_log(self) -> str:
        try:
            return self.log_file.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def mark_log(self) -> None:
        """From now on, log_text() shows only what is logged after this point."""
        self._log_mark = len(self._read_log())

    def log_text(self, everything: bool = False) -> str:
        """The maillog since the last mark_log() (the start of the test), or all of it."""
        text = self._read_log()
        return text if everything else text[self._log_mark :]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._read_log().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = DELIVERY_TIMEOUT) -> re.Match[str]:
        """Poll the log (since the mark) until the regex `pattern` matches."""
        found: list[re.Match[str]] = []

        def match() -> bool:
            m = re.search(pattern, self.log_text())
            if m:
                found.append(m)
            return m is not None

        if not wait_until(match, timeout, interval=0.05):
            raise AssertionError(
                f"log did not show {pattern!r} within {timeout:g} s:\n{self.log_text()}"
            )
        return found[0]


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    """Whether `pid` runs and is not a zombie (the master is not our child: we
    cannot reap it, and a zombie still answers kill(pid, 0))."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(entry)
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def _listening_ports() -> set[int]:
    """TCP ports in LISTEN state on 127.0.0.1 or any address, from /proc/net/tcp."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, port = fields[1].split(":")
        # State 0A is TCP_LISTEN; 0100007F is 127.0.0.1 in host (little-endian) order.
        if fields[3] == "0A" and addr in ("0100007F", "00000000"):
            ports.add(int(port, 16))
    return ports


def _reply(code: int, text: bytes | str) -> Reply:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return Reply(code, text)

"""The `milters` command: run, serve, check, test and probe the suite's filters."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import textwrap
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from milters import __version__, chaincheck, registry
from milters.client.errors import MilterClientError
from milters.client.probe import probe
from milters.client.report import format_probe
from milters.core.config import Config, render_config
from milters.core.envelope import Envelope
from milters.core.errors import ConfigError, MiltersError
from milters.core.logs import setup_logging

if TYPE_CHECKING:
    from milters.dmarc.settings import DmarcSettings

log = logging.getLogger("milters")

EX_NOINPUT = 66
EX_SOFTWARE = 70
EX_CONFIG = 78

DESCRIPTION = """\
One suite of mail filters (milters) for Postfix: DKIM, SPF, DMARC, ClamAV and
Postfix-style header/body checks. Each filter is its own process on its own
socket; all of them read one TOML config file.

Config file: --config FILE, else $MILTERS_CONFIG, else /etc/milters/milters.toml
(if that is missing, the built-in defaults: every filter enabled on loopback).
"""

ENVELOPE_HELP = """\
The envelope options describe the SMTP session as Postfix would see it: the
client's address and verified name, HELO, MAIL FROM, RCPT TO, and the SASL
login of an authenticated client."""

EPILOG = """\
commands:
  run NAME          run one filter in the foreground (what systemd calls)
  serve             run every enabled filter, each as its own process
  check-config      print the effective configuration, or every error in it
  test FILE.eml     run a message through the filters offline and show verdicts
  probe SOCKET FILE.eml
                    send a message to a running milter (ours or any other) as
                    Postfix would, and print every action it answers
  dkim genkey|testkey
                    make a DKIM key pair and its TXT record; check a published key
  dmarc report|failures|stats
                    send DMARC aggregate and failure reports; print pass/fail statistics
  postfix-config    print the main.cf lines (smtpd_milters ...) for the enabled
                    filters; --master-cf: the submission service override
  install           lay down the system user, /etc/milters, /var/lib/milters
                    and the systemd units after a pip install
  is-enabled NAME   exit 0 if the filter is enabled in the config, 1 if not
  stats             verdicts, top rules and DMARC pass rates of the last hour
                    and day, from the filters' metrics or from the log

Postfix main.cf wiring (see README.md; `milters postfix-config` prints it all):
  smtpd_milters = inet:127.0.0.1:8891, ..., inet:127.0.0.1:8895
  non_smtpd_milters = $smtpd_milters
  milter_default_action = tempfail
  milter_protocol = 6
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="config file (default: $MILTERS_CONFIG or /etc/milters/milters.toml)")


def _add_envelope(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("envelope", ENVELOPE_HELP)
    g.add_argument("--client-ip", default="192.0.2.1", metavar="IP",
                   help="SMTP client address (default: %(default)s)")
    g.add_argument("--client-name", default="unknown", metavar="HOST",
                   help="client's verified host name, or 'unknown' (default: %(default)s)")
    g.add_argument("--helo", default="", metavar="NAME", help="HELO/EHLO name")
    g.add_argument("--from", dest="mail_from", default="", metavar="ADDR",
                   help="envelope sender, MAIL FROM (default: the null sender <>)")
    g.add_argument("--rcpt", action="append", metavar="ADDR",
                   help="envelope recipient, RCPT TO; repeat for several "
                        "(default: postmaster@localhost)")
    g.add_argument("--auth", dest="auth_user", default="", metavar="USER",
                   help="SASL login name: the client is authenticated")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milters", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"milters {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = ", ".join(registry.RUNNABLE)

    p = sub.add_parser(
        "run", help="run one filter in the foreground",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
            Run one filter in the foreground on the socket from its config table
            (what the systemd unit milters@NAME.service calls). Filters: {names}.

            Logs go to stderr, one line per message with the Postfix queue id.
            SIGTERM stops accepting, lets open sessions finish, then exits.
            SIGHUP re-reads the config and table files: if they are valid, new
            workers take over; if not, the error is logged and the running
            configuration stays in force.
            Exit status: 0 after SIGTERM, {EX_CONFIG} on a config error."""),
    )
    p.add_argument("name", metavar="NAME", help=f"the filter: {names}")
    _add_config(p)

    p = sub.add_parser(
        "serve", help="run every enabled filter as its own process",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Run every enabled filter, each as a child process (`milters run NAME`)
            on its own socket: the single-host way to run the suite without
            systemd. A child that dies is logged and restarted. SIGTERM stops
            all of them cleanly; SIGHUP re-validates the config and passes the
            reload on (a bad config is refused and logged; the old one stays)."""),
    )
    _add_config(p)

    p = sub.add_parser(
        "check-config", help="print the effective configuration or its errors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
            Read the config file and every table and key file it names, and print
            the effective configuration (every key, defaults included) as TOML.
            On errors, print each one, naming the file, table and key, and exit
            with status {EX_CONFIG}. Table lines Postfix would skip with a
            warning are skipped with the same warning (shown as `warning:`
            lines). When Postfix's postconf is on this host, also warn where
            smtpd_milters does not list the enabled filters in chain order (the
            first filter removes forged Authentication-Results fields, dmarc
            trusts the filters enabled before it, the last one applies holds:
            a disabled filter must be disabled in the config too). --strict
            turns all these warnings into errors. With --sample, print the
            fully commented sample config instead (every key with its
            default)."""),
    )
    _add_config(p)
    p.add_argument("--sample", action="store_true",
                   help="print the commented sample config (conf/milters.toml)")
    p.add_argument("--strict", action="store_true",
                   help="treat warnings (table lines Postfix would skip, a Postfix "
                        "chain that differs from the config's) as errors")

    p = sub.add_parser(
        "test", help="run a message through the filters offline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Run a message (a .eml file, or - for stdin) through the filters'
            decisions offline, as if it came over SMTP with the envelope below.
            By default it runs the live chain, as Postfix does: every enabled
            filter in chain order, each given the message with the edits of the
            filters before it applied (forged Authentication-Results removed,
            results added, checks edits), signing last; it prints each filter's
            results, verdict and milter operations, then the final verdict and
            the delivered header. --filter runs single filters on the message
            as given. No MTA and no running filter are needed.
            Exit status: 0 if the message is accepted, 1 if it is refused."""),
    )
    p.add_argument("message", metavar="FILE.eml", help="the message, or - for stdin")
    p.add_argument("--filter", action="append", metavar="NAME",
                   help="only this filter, alone on the message as given (repeat for "
                        "several; default: the live chain of every enabled one)")
    _add_config(p)
    _add_envelope(p)

    p = sub.add_parser(
        "probe", help="send a message to a running milter and show its answers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Connect to a running milter (ours, OpenDKIM, clamav-milter, ...) over
            the milter protocol, as Postfix does, send the message with the
            envelope below, and print every reply and modification it answers:
            negotiated options, per-stage replies, headers added or changed,
            recipients, quarantine, the final verdict and the time taken.
            SOCKET: inet:PORT@HOST, inet:HOST:PORT or unix:/PATH.
            Exit status: 0 accepted, 1 refused, 69 milter unreachable."""),
    )
    p.add_argument("socket", metavar="SOCKET", help="the milter's socket")
    p.add_argument("message", metavar="FILE.eml", help="the message, or - for stdin")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="per-reply timeout (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--queue-id", default="", metavar="ID", help="the `i` macro to send")
    _add_envelope(p)
    _add_stats(sub)
    _add_dkim(sub)
    _add_dmarc(sub)
    _add_server(sub, names)
    return parser


def _add_server(sub: argparse._SubParsersAction[argparse.ArgumentParser], names: str) -> None:
    p = sub.add_parser(
        "postfix-config", help="print the Postfix main.cf lines for the enabled filters",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Print the lines to add to /etc/postfix/main.cf for the filters enabled
            in the config, each commented: smtpd_milters with each filter's socket
            in Postfix's spelling, in chain order (dkim, spf, dmarc, clamav,
            checks: DMARC must see the DKIM and SPF results), non_smtpd_milters,
            milter_default_action = tempfail, milter_protocol = 6 and the
            timeouts. The macros the filters read are among Postfix's defaults.
            With --master-cf, print instead the master.cf override for the
            submission service (milter_macro_daemon_name=ORIGINATING) that marks
            submitted mail as ours. packaging/postfix/ holds both texts for the
            default config.

              milters postfix-config >> /etc/postfix/main.cf && postfix reload"""),
    )
    p.add_argument("--master-cf", action="store_true",
                   help="print the master.cf override for the submission service")
    _add_config(p)

    p = sub.add_parser(
        "install", help="lay down the user, directories, config and systemd units",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            After `pip install`, lay down what a server needs, then print the next
            steps. Run it as root; running it again changes nothing that is in
            place.

              - the system user and group (useradd --system, home /var/lib/milters,
                shell /usr/sbin/nologin) if missing
              - /etc/milters/milters.toml: the commented sample (mode 0640, group
                USER); an existing config is never overwritten
              - /etc/milters/dkim (0750, for DKIM keys) and /var/lib/milters (0750,
                the DMARC history), owned by USER
              - /etc/systemd/system/milters@.service and milters.target, with
                ExecStart naming this installation's `milters` (rewritten when
                they differ: put local changes in drop-ins)

            It does not run systemctl or touch Postfix: the next steps say how.
            --prefix DIR writes under DIR only (no useradd, no chown: each is
            listed as skipped), for staging and tests."""),
    )
    p.add_argument("--prefix", default="/", metavar="DIR",
                   help="install under DIR instead of / (default: %(default)s)")
    p.add_argument("--user", default="milters", metavar="USER",
                   help="the unprivileged user the filters run as (default: %(default)s)")
    p.add_argument("--no-systemd", dest="systemd", action="store_false",
                   help="do not write the systemd units (run `milters serve` yourself)")
    p.add_argument("--executable", metavar="PATH",
                   help="the milters command the units run (default: the one next to "
                        "this Python, else the one on PATH)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be done and change nothing")

    p = sub.add_parser(
        "is-enabled", help="exit 0 if a filter is enabled in the config, 1 if not",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
            Say whether NAME ({names}) is served under the config: an enabled
            filter on its own socket, dkim-sign when dkim signs last, chain when
            [chain] is enabled (then the filters are its steps, not served alone).
            Exit 0 if it is, 1 if it is not. milters@.service runs this as its
            ExecCondition, so milters.target starts only what is served.
            A config with errors gives 255, so that systemd marks the unit failed
            (with the errors in its journal) rather than skipped."""),
    )
    p.add_argument("name", metavar="NAME", help=f"the filter: {names}")
    p.add_argument("--in-chain", action="store_true",
                   help="enabled as a filter at all, on its own socket or as a step of "
                        "[chain] (the DMARC report units ask this)")
    _add_config(p)


def _add_dmarc(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dmarc", help="DMARC aggregate reports and statistics from the history",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Read the DMARC history ([dmarc] history) that the dmarc filter writes.

              milters dmarc report                 yesterday's reports (UTC), sent by SMTP
              milters dmarc report --dry-run DIR   write them to DIR instead
              milters dmarc failures               send the spooled failure reports (ruf=)
              milters dmarc stats --hours 24       pass/fail per From domain and source"""),
    )
    dsub = p.add_subparsers(dest="dmarc_command", metavar="TOOL", required=True)
    r = dsub.add_parser(
        "report", help="build and send RFC 9990 aggregate reports",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Build one aggregate report (RFC 9990 XML, gzipped) per policy domain
            that asked for reports (rua=) for the period [--begin, --end), by
            default the previous whole UTC day, as opendmarc-reports does from
            OpenDMARC's history. Destinations outside the policy domain must
            authorize us in DNS (POLICYDOMAIN._report._dmarc.DEST); the others
            are skipped and named. Reports go through [dmarc] report_smtp_host
            and report_smtp_port (report_smtp_tls, report_smtp_user for STARTTLS
            and AUTH), one message per destination, or into a directory with
            --dry-run. Every send is kept in the history's sent-report log: a
            second run does not send a report again, and a failed send is
            retried by a later run (1 h, 2 h, 4 h ... at most a day apart, 8
            attempts), also for earlier periods. The systemd timer
            milters-dmarc-report.timer runs this daily.
            Exit status: 0 done, 1 a report could not be sent."""),
    )
    r.add_argument("--begin", metavar="TIME",
                   help="start: YYYY-MM-DD, YYYY-MM-DDTHH:MM (UTC) or Unix seconds")
    r.add_argument("--end", metavar="TIME", help="end (excluded), same forms")
    r.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                   help="only this policy domain (repeatable)")
    r.add_argument("--dry-run", metavar="DIR",
                   help="write the .xml.gz files to DIR instead of sending them")
    r.add_argument("--resend", action="store_true",
                   help="send again to destinations the sent-report log says have it")
    r.add_argument("--now", metavar="TIME",
                   help="take TIME as the current time (the default period and retries)")
    _add_config(r)
    f = dsub.add_parser(
        "failures", help="send the RFC 9991 failure reports the filter spooled",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Send the failure reports ([dmarc] failure_reports = true) that the dmarc
            filter left in [dmarc] failure_spool, in the AFRF format (RFC 6591), the
            header only (redacted unless failure_redact = false), through the
            report relay (report_smtp_*). Destinations outside the policy domain
            must authorize us (POLICYDOMAIN._report._dmarc.DEST). At most
            failure_max_per_domain reports per policy domain per run; a report
            the relay refused is retried by the next run for a day. The systemd
            timer milters-dmarc-failures.timer runs this every five minutes.
            Exit status: 0 done, 1 a report could not be sent."""),
    )
    _add_config(f)
    st = dsub.add_parser("stats", help="pass/fail counts per From domain and source IP")
    st.add_argument("--hours", type=float, default=24.0, metavar="N",
                    help="the last N hours (default: %(default)s)")
    _add_config(st)


def _add_dkim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dkim", help="DKIM key tools: genkey, testkey",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            DKIM key tools, in place of opendkim-genkey and opendkim-testkey.

              milters dkim genkey --domain example.com --selector mail --dir /etc/milters/dkim
              milters dkim testkey --domain example.com --selector mail \\
                  --key /etc/milters/dkim/mail.private"""),
    )
    dsub = p.add_subparsers(dest="dkim_command", metavar="TOOL", required=True)
    g = dsub.add_parser(
        "genkey", help="make a key pair and its DNS TXT record",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Make a DKIM key pair as opendkim-genkey does: DIR/SELECTOR.private, the
            private key (PEM, created with mode 0600; OpenDKIM reads it too), and
            DIR/SELECTOR.txt, the TXT record to publish at
            SELECTOR._domainkey.DOMAIN in zone-file form, its text cut into
            strings of at most 255 bytes (some DNS servers refuse longer ones).
            Existing files are never overwritten. Then point [dkim] at the key:
            domain, selector and key_file (or a key_table line), and run testkey
            once the record is published. Keys are made in-process by the
            cryptography package (OpenSSL); no openssl command is run. DIR must
            exist (it is not created: its owner and mode are yours to choose)."""),
    )
    g.add_argument("--domain", required=True, metavar="DOMAIN", help="the signing domain (d=)")
    g.add_argument("--selector", required=True, metavar="SELECTOR",
                   help="the selector (s=), e.g. mail or 2026-11")
    g.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (RSA-SHA256, every verifier) or ed25519 (RFC 8463, sign with "
                        "both side by side); default: %(default)s")
    g.add_argument("--bits", type=int, default=2048, metavar="N",
                   help="RSA key size, 1024-4096 (default: %(default)s)")
    g.add_argument("--dir", default=".", metavar="DIR",
                   help="where to write the files (default: the current directory)")
    t = dsub.add_parser(
        "testkey", help="check that DNS publishes a private key's public half",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Look up the TXT record at SELECTOR._domainkey.DOMAIN through the
            suite's resolver ([global.dns] of the config) and say whether it
            publishes the public half of the private key in FILE, as
            opendkim-testkey does.
            Exit status: 0 the record matches, 1 it is missing or differs,
            75 the lookup failed for now."""),
    )
    t.add_argument("--domain", required=True, metavar="DOMAIN", help="the signing domain (d=)")
    t.add_argument("--selector", required=True, metavar="SELECTOR", help="the selector (s=)")
    t.add_argument("--key", required=True, metavar="FILE", help="the private key file")
    _add_config(t)


def _add_stats(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stats", help="what the filters decided over the last hour and day",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Print, for the last hour and the last day: the verdicts of each
            filter (accept, reject, tempfail, discard), the checks table rules
            hit most (file:line and action; shadow rules marked), and the DMARC
            pass rate, per From domain when reading logs.

            From the metrics (default): scrapes the /metrics port of every
            enabled filter ([global] metrics_listen, each filter at its chain
            position: dkim +0, spf +1, dmarc +2, clamav +3, checks +4). The
            counters run from each filter's start; give --state FILE to keep
            readings (25 hours of them) so that later runs can report the last
            hour and day as differences. Without --state the report says
            "since the filters started".

            From the log (--log FILE, or - for stdin), needed when metrics are
            off and for DMARC per From domain: the filters' summary lines, in
            our own format or as journalctl prints them, e.g.
              journalctl -u 'milters@*' --since -1d | milters stats --log -
            Exit status: 0; 1 if a metrics port could not be read."""),
    )
    _add_config(p)
    p.add_argument("--log", metavar="FILE", help="read this log instead (- for stdin)")
    p.add_argument("--url", action="append", metavar="URL",
                   help="scrape this metrics URL instead of the configured ports (repeat)")
    p.add_argument("--state", type=Path, metavar="FILE",
                   help="keep metrics readings here for hour/day windows")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="rules and domains to list (default: %(default)s)")


def cmd_stats(args: argparse.Namespace) -> int:
    from milters import stats
    from milters.core.metrics import sample_scrape_targets

    now = time.time()
    if args.log:
        if args.log == "-":
            stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
            sys.stdout.write(stats.log_stats(stdin, now, args.top))
        else:
            try:
                with open(args.log, encoding="utf-8", errors="replace") as f:
                    sys.stdout.write(stats.log_stats(f, now, args.top))
            except OSError as exc:
                raise MiltersError(f"cannot read {args.log}: {exc.strerror}") from None
        return 0
    if args.url:
        targets = {f"url {i + 1}": u for i, u in enumerate(args.url)}
    else:
        cfg = registry.load(args.config)
        targets = {name: f"http://{where}/metrics"
                   for name, where in sample_scrape_targets(cfg, registry.units(cfg)).items()}
        if not targets:
            raise MiltersError(f"metrics are off in {cfg.source} ([global] metrics_listen); "
                               "read the log instead: milters stats --log FILE")
    tallies, problems = stats.metrics_report(targets, args.state, now)
    for problem in problems:
        print(f"milters stats: {problem}", file=sys.stderr)
    sys.stdout.write(stats.render(tallies, args.top, per_domain=False))
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(COMMANDS[args.command](args))
    except ConfigError as exc:
        print(f"milters: configuration error:\n{_indent(str(exc))}", file=sys.stderr)
        return EX_CONFIG
    except MiltersError as exc:
        print(f"milters: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    except KeyboardInterrupt:
        return 130


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def cmd_run(args: argparse.Namespace) -> int:
    from milters.core.runner import run_filter

    cfg = registry.load(args.config)
    registry.filter_class(args.name)
    setup_logging(cfg.global_.log_level)
    if args.name not in registry.units(cfg):
        log.warning("%s is not served under %s (disabled, or a step of [chain]); "
                    "running it anyway as asked", args.name, cfg.source)
    _warn_about_the_chain(cfg)
    return run_filter(args.name, cfg, registry.build_runtime, lambda: registry.load(args.config))


def _warn_about_the_chain(cfg: Config) -> list[str]:
    """Log where Postfix's smtpd_milters and the config's chain disagree (chaincheck.py)."""
    milters = chaincheck.postfix_milters()
    if milters is None:
        return []
    problems = chaincheck.disagreements(cfg, milters)
    for p in problems:
        log.warning("chain: %s", p)
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.sample:
        sys.stdout.write(registry.sample_config())
        return 0
    cfg = registry.load(args.config)
    problems: list[str] = []
    described: list[str] = []
    for name in registry.units(cfg):
        try:
            rt = registry.build_runtime(cfg, name)
        except ConfigError as exc:
            problems += exc.problems
            continue
        described += [f"# {name}: {line}" for line in rt.filter.describe()]
        if args.strict:
            problems += [f"{name}: {w} (--strict)" for w in rt.filter.load_warnings()]
    milters = chaincheck.postfix_milters()
    if milters is not None:
        for p in chaincheck.disagreements(cfg, milters):
            if args.strict:
                problems.append(f"{p} (--strict)")
            else:
                print(f"milters: warning: {p}", file=sys.stderr)
    if problems:
        raise ConfigError(problems=problems)
    sys.stdout.write(render_config(cfg))
    if described:
        print()
        print("\n".join(described))
    return 0


def _read_message(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise MiltersError(f"{path}: cannot read: {exc.strerror}") from None


def _envelope(args: argparse.Namespace, helo_default: str = "") -> Envelope:
    """The envelope options of `test` and `probe`, as the one Envelope both use."""
    return Envelope(
        client_ip=args.client_ip, client_name=args.client_name,
        helo=args.helo or helo_default, mail_from=args.mail_from,
        rcpt_to=list(args.rcpt or ["postmaster@localhost"]), auth_user=args.auth_user,
    )


def cmd_test(args: argparse.Namespace) -> int:
    from milters.offline import format_report, run_offline

    cfg = registry.load(args.config)
    setup_logging("warning")
    message = _read_message(args.message)
    env = _envelope(args)
    if not args.filter:
        # The live chain: what Postfix does with every enabled filter.
        report = run_offline(registry.build_chain(cfg), message, env)
        print(format_report(report))
        return 1 if report.verdict.final else 0
    for n in args.filter:
        registry.filter_class(n)
    refused = False
    for name in args.filter:
        report = run_offline(registry.build_runtime(cfg, name), message, env)
        print(format_report(report))
        refused = refused or report.verdict.final
    return 1 if refused else 0


def cmd_probe(args: argparse.Namespace) -> int:
    message = _read_message(args.message)
    env = _envelope(args, helo_default="probe.invalid")
    if args.queue_id:
        env.queue_id = args.queue_id
    try:
        result = probe(args.socket, message, env, timeout=args.timeout)
    except (OSError, MilterClientError) as exc:
        print(f"milters probe: {args.socket}: {exc}", file=sys.stderr)
        return 69
    print(result.to_json() if args.json else format_probe(result))
    return 0 if result.verdict in ("accept", "continue") else 1


def cmd_dkim(args: argparse.Namespace) -> int:
    from milters.core.resolver import Resolver
    from milters.dkim import keytools

    if args.dkim_command == "genkey":
        made = keytools.genkey(args.domain, args.selector, args.algorithm, args.bits, args.dir)
        print(f"wrote {made.private_path} (private key, mode 0600) and {made.txt_path}")
        print(f"publish this TXT record in the zone of {args.domain}:")
        sys.stdout.write(made.zone)
        return 0
    cfg = registry.load(args.config)
    result = keytools.testkey(args.domain, args.selector, args.key, Resolver(cfg.global_.dns))
    print(result.message)
    if result.ok:
        return 0
    return 75 if result.temporary else 1


def _when(text: str) -> int:
    import datetime as dt

    if text.isdigit():
        return int(text)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise MiltersError(f"not a time: {text!r} (YYYY-MM-DD, YYYY-MM-DDTHH:MM or "
                           "Unix seconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def cmd_dmarc(args: argparse.Namespace) -> int:
    import time

    from milters.core.resolver import Resolver
    from milters.dmarc import DmarcSettings
    from milters.dmarc import report as reports
    from milters.dmarc.history import open_history

    cfg = registry.load(args.config)
    settings = cfg.filters["dmarc"]
    assert isinstance(settings, DmarcSettings)
    if args.dmarc_command == "failures":
        return _dmarc_failures(cfg, settings)
    store = open_history(settings.history, settings.history_journal or None)
    if store is None:
        raise MiltersError("[dmarc] history is empty: no history to read")
    now = int(time.time())
    if args.dmarc_command == "stats":
        lines = reports.stats(store.entries(now - int(args.hours * 3600), now + 1))
        print(f"{'from domain':<40} {'source':<40} {'pass':>6} {'fail':>6} {'other':>6}")
        for line in lines:
            print(f"{line.domain:<40} {line.source_ip:<40} {line.passed:>6} "
                  f"{line.failed:>6} {line.other:>6}")
        return 0
    if args.now:
        now = _when(args.now)
    day = now - now % 86400
    begin = _when(args.begin) if args.begin else day - 86400
    end = _when(args.end) if args.end else begin + 86400
    org = settings.report_org_name or cfg.global_.authserv_id
    run = reports.send_reports(
        store, begin, end, args.domain, org,
        reports.report_sender(settings, cfg.global_.authserv_id), now,
        Resolver(cfg.global_.dns), settings.discovery, reports.relay_from_settings(settings),
        dry_run=args.dry_run, resend=args.resend)
    for rep, auth, path in run.reports:
        for address, why in auth.refused:
            print(f"{rep.policy_domain}: not sending to {address}: {why}")
        if path is not None:
            print(f"{rep.policy_domain}: {rep.messages} messages, {rep.rows} rows -> {path}"
                  f" (would send to: {', '.join(auth.allowed) or 'nobody'})")
    done = run.delivery
    names = {r.report_id: f"{r.policy_domain} {r.begin}-{r.end}" for r, _, _ in run.reports}
    for rid, address in done.sent:
        print(f"{names[rid]}: sent to {address}")
    for rid, address, why in done.skipped:
        print(f"{names[rid]}: not sent to {address}: {why}")
    for rid, address, why in done.failed:
        print(f"{names[rid]}: sending to {address} failed (retried later): {why}",
              file=sys.stderr)
    if not run.reports:
        print("no reports for this period")
    store.close()
    return 1 if done.failed else 0


def _dmarc_failures(cfg: Config, settings: DmarcSettings) -> int:
    from milters.core.resolver import Resolver
    from milters.dmarc.failure import send_spool
    from milters.dmarc.report import relay_from_settings, report_sender

    run = send_spool(settings.failure_spool, Resolver(cfg.global_.dns), settings.discovery,
                     relay_from_settings(settings),
                     report_sender(settings, cfg.global_.authserv_id),
                     settings.failure_max_per_domain)
    for name, address in run.sent:
        print(f"{name}: sent to {address}")
    for name, address, why in run.refused:
        print(f"{name}: not sending to {address}: {why}")
    for domain, count in sorted(run.dropped.items()):
        print(f"{domain}: {count} failure reports dropped (failure_max_per_domain)")
    for name, address, why in run.failed:
        print(f"{name}: sending to {address} failed: {why}", file=sys.stderr)
    return 1 if run.failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from milters.core.serve import serve_units

    cfg = registry.load(args.config)
    setup_logging(cfg.global_.log_level)

    def child_argv(name: str) -> list[str]:
        argv = [sys.executable, "-m", "milters", "run", name]
        if args.config:
            argv += ["--config", args.config]
        return argv

    return serve_units(cfg, registry.units, registry.build_runtime,
                       lambda: registry.load(args.config), child_argv)


def cmd_postfix_config(args: argparse.Namespace) -> int:
    from milters import install

    if args.master_cf:
        sys.stdout.write(install.postfix_master_cf())
        return 0
    sys.stdout.write(install.postfix_main_cf(registry.load(args.config)))
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from milters import install

    installer = install.Installer(
        prefix=Path(args.prefix),
        executable=args.executable or install.find_executable(),
        sample_config=registry.sample_config(),
        filter_names=registry.RUNNABLE,
        user=args.user,
        systemd=args.systemd,
        dry_run=args.dry_run,
    )
    if installer.real_system and not args.dry_run and os.geteuid() != 0:
        raise MiltersError("install needs root (or --prefix DIR, or --dry-run)")
    for line in installer.run():
        print(line)
    print()
    sys.stdout.write(install.next_steps(installer))
    return 0


def cmd_is_enabled(args: argparse.Namespace) -> int:
    registry.filter_class(args.name)
    try:
        cfg = registry.load(args.config)
    except ConfigError as exc:
        print(f"milters: configuration error:\n{_indent(str(exc))}", file=sys.stderr)
        return 255
    if args.in_chain:
        enabled = args.name in registry.chain_steps(cfg) or (
            args.name == registry.CHAIN and registry.chain_mode(cfg))
    else:
        enabled = args.name in registry.units(cfg)
    print(f"{args.name}: {'enabled' if enabled else 'disabled'} in {cfg.source}")
    return 0 if enabled else 1


COMMANDS = types.MappingProxyType({
    "run": cmd_run,
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "test": cmd_test,
    "probe": cmd_probe,
    "dkim": cmd_dkim,
    "dmarc": cmd_dmarc,
    "postfix-config": cmd_postfix_config,
    "install": cmd_install,
    "is-enabled": cmd_is_enabled,
    "stats": cmd_stats,
})

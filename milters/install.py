"""What a server needs besides the Python package: the Postfix wiring, the systemd
units, and `milters install`, which lays down the user, directories, config and units.

The texts here are the single source: packaging/postfix/*.snippet and
packaging/systemd/* are these texts for the default config (tests/qa checks it), so
a pip-installed package, which has no packaging/ directory, can still write them.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from milters import registry
from milters.core.config import Config
from milters.core.errors import MiltersError
from milters.core.macros import DEFAULT_MACRO_LISTS, NEEDED_MACROS
from milters.core.sockets import parse_socket

PLACEHOLDER_EXECUTABLE = "/usr/bin/milters"
DEFAULT_USER = "milters"
CONFIG_DIR = "etc/milters"
STATE_DIR = "var/lib/milters"
UNIT_DIR = "etc/systemd/system"


def postfix_main_cf(cfg: Config) -> str:
    """The main.cf lines for what `serve` starts, in chain order (registry.units)."""
    enabled = [(name, parse_socket(cfg.filters[name].socket)) for name in registry.units(cfg)]
    lines = [
        "# milters: add to /etc/postfix/main.cf, then `postfix reload`.",
        "# (`milters postfix-config` prints these lines for the config in force.)",
        "# They replace any earlier smtpd_milters and milter_* lines there.",
        "#",
    ]
    if enabled:
        width = max(len(name) for name, _ in enabled)
        if registry.chain_mode(cfg):
            lines += [
                "# Chain mode ([chain] enabled): one socket runs every enabled filter in",
                "# one dialogue per message, in chain order: "
                f"{', '.join(registry.chain_steps(cfg))}.",
            ]
        else:
            lines += [
                "# The enabled filters in chain order. Postfix calls them in this order, so",
                "# DMARC sees the DKIM and SPF results the filters before it added, and the",
                "# content checks run last. The first one removes forged",
                "# Authentication-Results fields that claim our authserv-id.",
            ]
        if registry.SIGN_STEP in registry.chain_steps(cfg):
            lines += [
                "# dkim verifies first, on mail as received; dkim-sign signs last, after",
                "# every edit of the other filters, so that the signature covers them.",
            ]
        lines += [f"#   {name:<{width}}  {spec.postfix}" for name, spec in enabled]
        if any(spec.family == "unix" for _, spec in enabled):
            lines += [
                "# smtpd and cleanup run chrooted in /var/spool/postfix on Debian: a unix",
                "# socket must lie under it and is named here as seen from inside.",
            ]
        # One socket per continuation line (Postfix: a line starting with
        # whitespace continues the previous one).
        lines.append("smtpd_milters =")
        lines += [f"    {spec.postfix}" for _, spec in enabled]
    else:
        lines += ["# No filter is enabled in the config: no milter to call.",
                  "smtpd_milters ="]
    lines += [
        "# Mail that does not come over SMTP (sendmail(1), local submission) passes",
        "# through the same filters.",
        "non_smtpd_milters = $smtpd_milters",
        "# A filter that is down or times out: defer the mail (4xx) and let the",
        "# sender retry, rather than let it through unchecked.",
        "milter_default_action = tempfail",
        "# Protocol 6 lets each filter negotiate away the steps it does not need",
        "# (an SPF filter never receives the body) and keeps header values byte-exact.",
        "milter_protocol = 6",
        "# Timeouts: connecting, each SMTP command, and each content step (the body",
        "# scan of a large message by ClamAV takes the longest).",
        "milter_connect_timeout = 10s",
        "milter_command_timeout = 30s",
        "milter_content_timeout = 300s",
    ]
    missing = {stage: [m for m in needed if m not in DEFAULT_MACRO_LISTS[stage]]
               for stage, needed in NEEDED_MACROS.items()}
    if any(missing.values()):  # pragma: no cover - Postfix's defaults cover ours today
        lines += [f"milter_{stage}_macros = " + " ".join((*DEFAULT_MACRO_LISTS[stage], *names))
                  for stage, names in missing.items() if names]
    else:
        lines += [
            "# Macros: the filters read {daemon_name} (at connect), {auth_authen} and i",
            "# (at MAIL FROM). Postfix sends all three by default, so no",
            "# milter_*_macros line is needed (if you set those lists, keep these).",
        ]
    lines += [
        "# Mail submitted on the submission port is marked as ours by its daemon",
        "# name: see `milters postfix-config --master-cf` for the master.cf override.",
    ]
    return "\n".join(lines) + "\n"


def postfix_master_cf() -> str:
    """The master.cf override that marks submitted mail as ours (DKIM signs it)."""
    return """\
# milters: in /etc/postfix/master.cf, add the last -o line to the submission
# service (and to submissions, port 465, if you use it), then `postfix reload`.
# Its daemon name ORIGINATING makes the dkim filter sign mail submitted there
# ([dkim] sign_daemons). The inbound checks (spf, dmarc) skip only clients that
# authenticated with SASL or sit in [global] internal_networks, not a daemon
# name: so let only authenticated users submit there (the restrictions line).
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o milter_macro_daemon_name=ORIGINATING
"""


# The hardening every unit of ours shares: a mail filter (or a report run) reads
# its config and talks on sockets, little else.
HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077
"""


def systemd_unit(executable: str = PLACEHOLDER_EXECUTABLE, user: str = DEFAULT_USER) -> str:
    """milters@.service, running `EXECUTABLE run %i` as USER."""
    exe = shlex.quote(executable)
    return f"""\
# One filter of the milters suite: milters@dkim.service, milters@spf.service, ...
# milters.target starts what the config serves; this unit's ExecCondition skips a filter that
# is not enabled in /etc/milters/milters.toml. Local changes: a drop-in
# (systemctl edit milters@.service), not this file: `milters install` rewrites it.
[Unit]
Description=milters %i filter for Postfix
Documentation=https://example.invalid/milters
After=network.target
Before=postfix.service
PartOf=milters.target

[Service]
Type=simple
User={user}
Group={user}
# Exit 1 (disabled in the config): the unit is skipped, not failed.
ExecCondition={exe} is-enabled %i
ExecStart={exe} run %i
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM: stop accepting, let open SMTP sessions finish (at most 30 s), then exit.
# mixed: SIGTERM to the main process only (it stops its workers itself), SIGKILL
# to whatever is left after TimeoutStopSec.
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=2s
# Open files: one per MTA connection and a few more. The default soft limit
# (1,024) is too low for many held connections; each worker also caps its
# connections (max_connections) and stops accepting before running out.
LimitNOFILE=65536

# /etc/milters (config, tables, DKIM keys) and /var/lib/milters (the DMARC history).
ConfigurationDirectory=milters
StateDirectory=milters
StateDirectoryMode=0750
# /run/milters for unix sockets, shared by the instances: kept when one stops.
# A unix socket is made with the umask below (0600): Postfix (user postfix)
# connects to loopback TCP by default; for a unix socket, set UMask=0007 in a
# drop-in and add postfix to the {user} group.
RuntimeDirectory=milters
RuntimeDirectoryPreserve=yes

# Hardening: a mail filter needs to read its config and talk on sockets, little else.
{HARDENING}
[Install]
WantedBy=milters.target
"""


def systemd_target(names: tuple[str, ...]) -> str:
    """milters.target: wants every filter; each instance skips itself when disabled."""
    wants = " ".join(f"milters@{name}.service" for name in names)
    return f"""\
# The whole milters suite: systemctl enable --now milters.target
# It wants every filter; an instance whose filter is disabled in
# /etc/milters/milters.toml is skipped (`milters is-enabled NAME`, the units'
# ExecCondition). After enabling or disabling a filter in the config:
#   systemctl restart milters.target
[Unit]
Description=milters: mail filters for Postfix
Wants={wants}
Before=postfix.service

[Install]
WantedBy=multi-user.target
"""


REPORT_SERVICE = "milters-dmarc-report.service"
REPORT_TIMER = "milters-dmarc-report.timer"
FAILURES_SERVICE = "milters-dmarc-failures.service"
FAILURES_TIMER = "milters-dmarc-failures.timer"


def report_service(executable: str = PLACEHOLDER_EXECUTABLE, user: str = DEFAULT_USER,
                   failures: bool = False) -> str:
    """milters-dmarc-report.service: one `milters dmarc report` run (started by its
    timer); with failures=True milters-dmarc-failures.service (`dmarc failures`)."""
    exe = shlex.quote(executable)
    if failures:
        head = """\
# Sends the DMARC failure reports (RFC 9991) the dmarc filter spooled when
# [dmarc] failure_reports = true (`milters dmarc failures`); nothing to do
# otherwise. Started by milters-dmarc-failures.timer.
[Unit]
Description=milters: send DMARC failure reports"""
        command = "dmarc failures"
    else:
        head = """\
# Sends yesterday's DMARC aggregate reports (RFC 9990) from the history, and retries
# the sends that failed before (`milters dmarc report`; its sent-report log keeps a
# second run from sending anything twice). Started by milters-dmarc-report.timer.
[Unit]
Description=milters: send DMARC aggregate reports"""
        command = "dmarc report"
    return head + f"""
Documentation=https://example.invalid/milters
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
User={user}
Group={user}
# Exit 1 (dmarc disabled in the config): skipped, not failed.
ExecCondition={exe} is-enabled --in-chain dmarc
ExecStart={exe} {command}
# The history, its crash journal, the sent-report log and the failure spool are in
# /var/lib/milters; the config (and report_smtp_password_file) in /etc/milters.
ConfigurationDirectory=milters
StateDirectory=milters
StateDirectoryMode=0750
TimeoutStartSec=30min

{HARDENING}"""


def report_timer(failures: bool = False) -> str:
    """milters-dmarc-report.timer: daily, after the UTC day the reports cover; with
    failures=True milters-dmarc-failures.timer, every five minutes."""
    if failures:
        return """\
# DMARC failure reports (RFC 9991), sent soon after the message:
#   systemctl enable --now milters-dmarc-failures.timer
# (only useful with [dmarc] failure_reports = true).
[Unit]
Description=milters: DMARC failure reports every five minutes

[Timer]
OnCalendar=*:0/5
Persistent=true

[Install]
WantedBy=timers.target
"""
    return """\
# Daily DMARC aggregate reports: systemctl enable --now milters-dmarc-report.timer
# Reports cover the previous UTC day, so the run is shortly after 00:00 UTC (spread
# over half an hour, so that the MX hosts of a site do not all send at once); a run
# missed while the machine was off is made up at boot (Persistent).
[Unit]
Description=milters: daily DMARC aggregate reports

[Timer]
OnCalendar=*-*-* 00:15:00 UTC
RandomizedDelaySec=30min
Persistent=true

[Install]
WantedBy=timers.target
"""


def find_executable() -> str:
    """This installation's `milters` script: next to the running Python, else on PATH."""
    beside = Path(sys.executable).parent / "milters"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("milters")
    if found:
        return str(Path(found).absolute())
    raise MiltersError("cannot find the `milters` executable next to "
                       f"{sys.executable} or on PATH; name it with --executable")


@dataclass
class Installer:
    """Lays down what a server needs. With a prefix other than /, it only writes
    files under it: no user is created and no owner is changed (recorded instead)."""

    prefix: Path
    executable: str
    sample_config: str
    filter_names: tuple[str, ...]
    user: str = DEFAULT_USER
    systemd: bool = True
    dry_run: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def real_system(self) -> bool:
        return self.prefix.resolve() == Path("/")

    def path(self, relative: str) -> Path:
        return self.prefix / relative

    def run(self) -> list[str]:
        self.ensure_user()
        self.ensure_dir(CONFIG_DIR, 0o755, owner="root")
        self.ensure_dir(f"{CONFIG_DIR}/dkim", 0o750, owner=self.user)
        self.ensure_dir(STATE_DIR, 0o750, owner=self.user)
        self.ensure_config()
        if self.systemd:
            self.ensure_dir(UNIT_DIR, 0o755, owner="root")
            self.ensure_file(f"{UNIT_DIR}/milters@.service",
                             systemd_unit(self.executable, self.user), 0o644)
            self.ensure_file(f"{UNIT_DIR}/milters.target",
                             systemd_target(self.filter_names), 0o644)
            self.ensure_file(f"{UNIT_DIR}/{REPORT_SERVICE}",
                             report_service(self.executable, self.user), 0o644)
            self.ensure_file(f"{UNIT_DIR}/{REPORT_TIMER}", report_timer(), 0o644)
            self.ensure_file(f"{UNIT_DIR}/{FAILURES_SERVICE}",
                             report_service(self.executable, self.user, failures=True), 0o644)
            self.ensure_file(f"{UNIT_DIR}/{FAILURES_TIMER}", report_timer(failures=True),
                             0o644)
        return self.log

    def note(self, text: str) -> None:
        self.log.append(("would " + text) if self.dry_run else text)

    def ensure_user(self) -> None:
        argv = ["useradd", "--system", "--user-group", "--home-dir", f"/{STATE_DIR}",
                "--no-create-home", "--shell", "/usr/sbin/nologin", self.user]
        if not self.real_system:
            self.log.append(f"skipped (--prefix): {shlex.join(argv)}")
            return
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            pass
        else:
            self.log.append(f"user {self.user} exists")
            return
        self.note(f"run: {shlex.join(argv)}")
        if not self.dry_run:
            _run(argv)

    def ensure_dir(self, relative: str, mode: int, owner: str) -> None:
        p = self.path(relative)
        if p.is_dir():
            if (p.stat().st_mode & 0o777) != mode:
                self.note(f"chmod {mode:o} {p}")
                if not self.dry_run:
                    p.chmod(mode)
            else:
                self.log.append(f"{p} exists")
        else:
            self.note(f"create {p} (mode {mode:o})")
            if not self.dry_run:
                p.mkdir(parents=True, exist_ok=True)
                p.chmod(mode)
        self.ensure_owner(p, owner)

    def ensure_owner(self, p: Path, owner: str) -> None:
        if not self.real_system:
            if owner != "root":
                self.log.append(f"skipped (--prefix): chown {owner}:{owner} {p}")
            return
        if owner == "root":
            return
        if self.dry_run:
            self.note(f"chown {owner}:{owner} {p}")
            return
        try:
            entry = pwd.getpwnam(owner)
        except KeyError:
            raise MiltersError(f"user {owner} does not exist; cannot own {p}") from None
        st = p.stat()
        if (st.st_uid, st.st_gid) != (entry.pw_uid, entry.pw_gid):
            self.note(f"chown {owner}:{owner} {p}")
            os.chown(p, entry.pw_uid, entry.pw_gid)

    def ensure_config(self) -> None:
        p = self.path(f"{CONFIG_DIR}/milters.toml")
        if p.exists():
            self.log.append(f"{p} exists: kept as it is")
            return
        self.note(f"write {p} (the commented sample: every filter on loopback, "
                  "every key at its default)")
        if self.dry_run:
            return
        # 0640 root:USER: the config may hold a database password (DMARC history).
        self.write(p, self.sample_config, 0o640)
        if self.real_system:
            entry = pwd.getpwnam(self.user)
            os.chown(p, 0, entry.pw_gid)

    def ensure_file(self, relative: str, text: str, mode: int) -> None:
        p = self.path(relative)
        if p.is_file() and p.read_text() == text:
            self.log.append(f"{p} is up to date")
            return
        self.note(f"{'update' if p.exists() else 'write'} {p}")
        if not self.dry_run:
            self.write(p, text, mode)

    @staticmethod
    def write(p: Path, text: str, mode: int) -> None:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(p)


def _run(argv: list[str]) -> None:
    import subprocess

    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise MiltersError(f"{argv[0]} not found; run: {shlex.join(argv)}") from None
    except subprocess.CalledProcessError as exc:
        raise MiltersError(f"{shlex.join(argv)} failed: {exc.stderr.strip()}") from None


def next_steps(installer: Installer) -> str:
    """What the administrator does after `milters install`."""
    exe = installer.executable
    steps = [
        "next steps:",
        f"  1. edit /{CONFIG_DIR}/milters.toml (authserv_id, which filters are enabled,",
        "     [dkim] domain, selector and key), make DKIM keys as the filters' user:",
        f"     runuser -u {installer.user} -- {exe} dkim genkey --domain DOMAIN "
        f"--selector SELECTOR --dir /{CONFIG_DIR}/dkim",
        f"     and check it all: {exe} check-config",
    ]
    if installer.systemd:
        steps += [
            "  2. systemctl daemon-reload && systemctl enable --now milters.target",
            f"     DMARC aggregate reports, daily: systemctl enable --now {REPORT_TIMER}",
            f"     (failure reports, if failure_reports = true: {FAILURES_TIMER})",
        ]
    else:
        steps += [f"  2. run the filters: {exe} serve (under your own supervisor)"]
    steps += [
        f"  3. {exe} postfix-config >> /etc/postfix/main.cf",
        f"     {exe} postfix-config --master-cf   (the submission service override)",
        "     postfix reload",
    ]
    return "\n".join(steps) + "\n"

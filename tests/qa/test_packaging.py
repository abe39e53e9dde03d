"""packaging/ is what the code writes: the Postfix snippets are `milters postfix-config`
for the default config, the systemd units are what `milters install` lays down, and
Postfix and systemd accept them without a warning (where their tools exist)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from milters import install, registry
from milters.core.config import Config
from milters.core.macros import DEFAULT_MACRO_LISTS, NEEDED_MACROS
from milters.core.sockets import parse_socket

ROOT = Path(__file__).resolve().parents[2]
POSTFIX = ROOT / "packaging" / "postfix"
SYSTEMD = ROOT / "packaging" / "systemd"
POSTCONF = Path("/usr/sbin/postconf")
DEBIAN_MASTER_CF = Path("/etc/postfix/master.cf")


def default_config() -> Config:
    return registry.load_from_mapping({}, "(built-in defaults)")


def test_postfix_snippets_are_the_command_output_for_the_default_config() -> None:
    assert (POSTFIX / "main.cf.snippet").read_text() == install.postfix_main_cf(
        default_config())
    assert (POSTFIX / "master.cf.snippet").read_text() == install.postfix_master_cf()


def test_systemd_units_are_what_install_writes() -> None:
    assert (SYSTEMD / "milters@.service").read_text() == install.systemd_unit()
    assert (SYSTEMD / "milters.target").read_text() == install.systemd_target(
        registry.RUNNABLE)
    assert (SYSTEMD / install.REPORT_SERVICE).read_text() == install.report_service()
    assert (SYSTEMD / install.REPORT_TIMER).read_text() == install.report_timer()
    assert (SYSTEMD / install.FAILURES_SERVICE).read_text() == install.report_service(
        failures=True)
    assert (SYSTEMD / install.FAILURES_TIMER).read_text() == install.report_timer(
        failures=True)


def test_report_timer_runs_the_report_daily() -> None:
    def settings(text: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))

    service = settings(install.report_service("/opt/milters/bin/milters"))
    assert service["Type"] == "oneshot" and service["User"] == "milters"
    assert service["ExecStart"] == "/opt/milters/bin/milters dmarc report"
    assert service["ExecCondition"] == "/opt/milters/bin/milters is-enabled --in-chain dmarc"
    assert service["StateDirectory"] == "milters" and service["ProtectSystem"] == "strict"
    timer = settings(install.report_timer())
    assert timer["OnCalendar"] == "*-*-* 00:15:00 UTC" and timer["Persistent"] == "true"
    assert timer["WantedBy"] == "timers.target"
    failures = settings(install.report_service("/opt/milters/bin/milters", failures=True))
    assert failures["ExecStart"] == "/opt/milters/bin/milters dmarc failures"
    assert settings(install.report_timer(failures=True))["OnCalendar"] == "*:0/5"


def test_unit_has_the_hardening_a_mail_filter_should_have() -> None:
    unit = install.systemd_unit("/opt/milters/bin/milters")
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["ExecStart"] == "/opt/milters/bin/milters run %i"
    assert settings["ExecCondition"] == "/opt/milters/bin/milters is-enabled %i"
    assert settings["User"] == "milters" and settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict" and settings["PrivateTmp"] == "yes"
    assert settings["StateDirectory"] == "milters"
    assert settings["ConfigurationDirectory"] == "milters"
    assert settings["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["KillMode"] == "mixed"
    # The drain (core/runner.py: DRAIN_SECONDS, then its supervisor's grace) fits.
    from milters.core.runner import DRAIN_SECONDS

    assert int(settings["TimeoutStopSec"]) >= DRAIN_SECONDS + 10


def test_target_wants_every_filter() -> None:
    target = install.systemd_target(registry.RUNNABLE)
    wants = next(line for line in target.splitlines() if line.startswith("Wants="))
    assert wants.split("=", 1)[1].split() == [f"milters@{n}.service" for n in registry.RUNNABLE]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing (Debian package 'systemd')")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: name one that does.
    exe = shutil.which("true") or "/bin/true"
    (tmp_path / "milters@.service").write_text(install.systemd_unit(exe))
    (tmp_path / "milters.target").write_text(install.systemd_target(registry.RUNNABLE))
    (tmp_path / install.REPORT_SERVICE).write_text(install.report_service(exe))
    (tmp_path / install.REPORT_TIMER).write_text(install.report_timer())
    units = [str(tmp_path / f"milters@{n}.service") for n in registry.FILTERS]
    (tmp_path / install.FAILURES_SERVICE).write_text(install.report_service(exe, failures=True))
    (tmp_path / install.FAILURES_TIMER).write_text(install.report_timer(failures=True))
    units += [str(tmp_path / n) for n in (install.REPORT_SERVICE, install.REPORT_TIMER,
                                           install.FAILURES_SERVICE, install.FAILURES_TIMER)]
    out = subprocess.run(["systemd-analyze", "verify", *units, str(tmp_path / "milters.target")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


@pytest.mark.skipif(not (POSTCONF.exists() and DEBIAN_MASTER_CF.exists()),
                    reason="Postfix is not installed (Debian package 'postfix')")
def test_postconf_accepts_the_snippets_without_a_warning(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(
        "compatibility_level = 3.6\n" + (POSTFIX / "main.cf.snippet").read_text())
    (tmp_path / "master.cf").write_text(
        DEBIAN_MASTER_CF.read_text() + (POSTFIX / "master.cf.snippet").read_text())
    out = subprocess.run([str(POSTCONF), "-c", str(tmp_path), "-n"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    params = dict(line.split(" = ", 1) for line in out.stdout.splitlines())
    sockets = [registry.FILTERS[n].default_socket() for n in registry.FILTERS]
    assert params["smtpd_milters"].split() == [
        parse_socket(s).postfix for s in sockets]
    assert params["milter_default_action"] == "tempfail"
    assert params["milter_protocol"] == "6"
    override = subprocess.run(
        [str(POSTCONF), "-c", str(tmp_path), "-P", "submission/inet/milter_macro_daemon_name"],
        capture_output=True, text=True, timeout=60)
    assert override.stdout.strip().endswith("= ORIGINATING"), override.stderr


@pytest.mark.skipif(not POSTCONF.exists(), reason="Postfix is not installed")
def test_the_macros_we_read_are_among_postfix_defaults() -> None:
    out = subprocess.run([str(POSTCONF), "-d", "milter_connect_macros", "milter_mail_macros"],
                         capture_output=True, text=True, timeout=60)
    defaults = dict(line.split(" = ", 1) for line in out.stdout.splitlines())
    for stage, names in NEEDED_MACROS.items():
        have = defaults[f"milter_{stage}_macros"].split()
        assert set(names) <= set(have)
        assert tuple(have) == DEFAULT_MACRO_LISTS[stage]

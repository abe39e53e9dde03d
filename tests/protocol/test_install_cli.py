"""`milters postfix-config`, `milters install` and `milters is-enabled` as an
administrator runs them (subprocesses, a temporary prefix instead of /)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from milters import registry
from tests.protocol.test_cli import milters

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["postfix-config", "install", "is-enabled"])
def test_new_commands_explain_themselves(command: str) -> None:
    out = milters(command, "--help")
    assert out.returncode == 0 and "usage: milters " + command in out.stdout
    assert len(out.stdout.splitlines()) > 6


def test_postfix_config_with_default_config_is_the_packaged_snippet(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    out = milters("postfix-config", "--config", str(empty))
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "packaging/postfix/main.cf.snippet").read_text()
    out = milters("postfix-config", "--master-cf", "--config", str(empty))
    assert out.stdout == (ROOT / "packaging/postfix/master.cf.snippet").read_text()


def smtpd_milters(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("smtpd_milters =")
    out = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        out.append(line.strip())
    return out


def test_postfix_config_follows_enabled_filters_and_sockets(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[spf]\nenabled = false\n[clamav]\nenabled = false\n'
                   '[dkim]\nsocket = "inet:10026@127.0.0.1"\n'
                   '[checks]\nsocket = "inet6:[::1]:9000"\n'
                   '[dmarc]\nsocket = "unix:/run/milters/dmarc.sock"\n')
    out = milters("postfix-config", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert smtpd_milters(out.stdout) == [
        "inet:127.0.0.1:10026", "unix:/run/milters/dmarc.sock", "inet6:[::1]:9000"]
    listed = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("#   ")]
    assert listed == ["dkim", "dmarc", "checks"]
    assert "chrooted" in out.stdout  # a unix socket: the chroot is explained
    assert "non_smtpd_milters = $smtpd_milters" in out.stdout


def test_postfix_config_with_nothing_enabled(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("".join(f"[{n}]\nenabled = false\n" for n in registry.FILTERS))
    out = milters("postfix-config", "--config", str(cfg))
    assert out.returncode == 0 and "\nsmtpd_milters =\n# " in out.stdout


def test_is_enabled(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("[spf]\nenabled = false\n")
    assert milters("is-enabled", "dkim", "--config", str(cfg)).returncode == 0
    assert milters("is-enabled", "spf", "--config", str(cfg)).returncode == 1
    cfg.write_text("[spf]\nenabld = false\n")
    bad = milters("is-enabled", "spf", "--config", str(cfg))
    assert bad.returncode == 255 and "enabld" in bad.stderr
    assert milters("is-enabled", "nope", "--config", str(cfg)).returncode == 78


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_into_a_prefix_twice(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    exe = "/opt/milters/bin/milters"
    first = milters("install", "--prefix", str(prefix), "--executable", exe)
    assert first.returncode == 0, first.stderr
    assert "skipped (--prefix): useradd --system" in first.stdout
    assert "systemctl enable --now milters.target" in first.stdout
    conf = prefix / "etc/milters/milters.toml"
    assert conf.read_text() == registry.sample_config() and mode(conf) == 0o640
    assert mode(prefix / "etc/milters/dkim") == 0o750
    assert mode(prefix / "var/lib/milters") == 0o750
    unit = (prefix / "etc/systemd/system/milters@.service").read_text()
    assert f"\nExecStart={exe} run %i\n" in unit
    assert f"\nExecCondition={exe} is-enabled %i\n" in unit
    assert (prefix / "etc/systemd/system/milters.target").exists()
    report = (prefix / "etc/systemd/system/milters-dmarc-report.service").read_text()
    assert f"\nExecStart={exe} dmarc report\n" in report
    assert (prefix / "etc/systemd/system/milters-dmarc-report.timer").exists()
    failures = (prefix / "etc/systemd/system/milters-dmarc-failures.service").read_text()
    assert f"\nExecStart={exe} dmarc failures\n" in failures
    assert (prefix / "etc/systemd/system/milters-dmarc-failures.timer").exists()
    assert "systemctl enable --now milters-dmarc-report.timer" in first.stdout

    # The administrator edits the config; a second install keeps it, changes nothing.
    conf.write_text('[global]\nmode = "report"\n')
    second = milters("install", "--prefix", str(prefix), "--executable", exe)
    assert second.returncode == 0, second.stderr
    assert "exists: kept as it is" in second.stdout
    assert "is up to date" in second.stdout and "write " not in second.stdout
    assert conf.read_text() == '[global]\nmode = "report"\n'

    # A new installation path (another venv) rewrites the units only.
    third = milters("install", "--prefix", str(prefix), "--executable", "/srv/m/bin/milters")
    assert "update " in third.stdout
    assert "ExecStart=/srv/m/bin/milters run %i" in (
        prefix / "etc/systemd/system/milters@.service").read_text()


def test_install_dry_run_and_no_systemd(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    out = milters("install", "--prefix", str(prefix), "--dry-run", "--executable", "/x/milters")
    assert out.returncode == 0, out.stderr
    assert "would write" in out.stdout and not prefix.exists()
    out = milters("install", "--prefix", str(prefix), "--no-systemd", "--executable",
                  "/x/milters")
    assert out.returncode == 0 and (prefix / "etc/milters/milters.toml").exists()
    assert not (prefix / "etc/systemd").exists()
    assert "milters serve" in out.stdout


def test_install_finds_this_installation(tmp_path: Path) -> None:
    out = milters("install", "--prefix", str(tmp_path), "--dry-run")
    if out.returncode != 0:
        assert "cannot find the `milters` executable" in out.stderr
        pytest.skip("no milters script beside this Python (not pip-installed)")
    assert "ExecStart" not in out.stdout and "milters postfix-config" in out.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may install into /")
def test_install_into_root_needs_root() -> None:
    out = milters("install")
    assert out.returncode == 70 and "needs root" in out.stderr


def _private_root_reason() -> str | None:
    if os.geteuid() != 0:
        return "installing into / needs root"
    if shutil.which("unshare") is None or shutil.which("useradd") is None:
        return "unshare or useradd is missing"
    return None


@pytest.mark.skipif(_private_root_reason() is not None, reason=str(_private_root_reason()))
def test_install_into_root_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """The real thing as root: useradd, chown, modes; /etc and /var/lib are copies
    bind-mounted in a private mount namespace, so the machine is left untouched. The
    new user can read the config and write its state and key directories."""
    etc, var_lib = tmp_path / "etc", tmp_path / "var-lib"
    var_lib.mkdir()
    script = f"""
        set -e
        cp -a /etc {etc}
        mount --bind {etc} /etc
        mount --bind {var_lib} /var/lib
        cd {ROOT}
        {sys.executable} -m milters install --executable /opt/milters/bin/milters
        echo ---
        {sys.executable} -m milters install --executable /opt/milters/bin/milters
        echo ---
        stat -c '%n %U:%G %a' /etc/milters/milters.toml /etc/milters/dkim /var/lib/milters
        echo ---
        runuser -u milters -- sh -c 'test -r /etc/milters/milters.toml && echo reads config'
        runuser -u milters -- sh -c 'test -w /var/lib/milters && echo writes state'
        runuser -u milters -- sh -c 'test -w /etc/milters/dkim && echo writes keys'
    """
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    first, second, owners, access = out.stdout.split("---\n")
    assert "run: useradd --system" in first and "chown milters:milters" in first
    assert "user milters exists" in second and "write " not in second
    assert owners.split("\n")[:3] == [
        "/etc/milters/milters.toml root:milters 640",
        "/etc/milters/dkim milters:milters 750",
        "/var/lib/milters milters:milters 750",
    ]
    assert access.split("\n")[:3] == ["reads config", "writes state", "writes keys"]


def test_postfix_config_signs_last_and_chain_mode_lists_one_socket(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    signing = '[dkim]\ndomain = ["ours.example"]\nselector = "s"\nkey_file = "/k.pem"\n'
    cfg.write_text(signing)
    out = milters("postfix-config", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert smtpd_milters(out.stdout) == [f"inet:127.0.0.1:{p}" for p in range(8891, 8897)]
    assert "dkim-sign signs last" in out.stdout
    assert milters("is-enabled", "dkim-sign", "--config", str(cfg)).returncode == 0
    assert milters("is-enabled", "chain", "--config", str(cfg)).returncode == 1
    cfg.write_text(signing + '[chain]\nenabled = true\nsocket = "inet:9900@127.0.0.1"\n')
    out = milters("postfix-config", "--config", str(cfg))
    assert smtpd_milters(out.stdout) == ["inet:127.0.0.1:9900"]
    assert "dkim, spf, dmarc, clamav, checks, dkim-sign" in out.stdout
    # The filters are the chain's steps now, not served alone; the DMARC report
    # units still run (is-enabled --in-chain).
    assert milters("is-enabled", "chain", "--config", str(cfg)).returncode == 0
    assert milters("is-enabled", "dmarc", "--config", str(cfg)).returncode == 1
    assert milters("is-enabled", "--in-chain", "dmarc", "--config", str(cfg)).returncode == 0


def test_check_config_warns_when_signing_comes_before_edits(tmp_path: Path) -> None:
    from milters.dkim.keytools import genkey

    genkey("ours.example", "s", "rsa", 2048, str(tmp_path))
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[dkim]\ndomain = ["ours.example"]\nselector = "s"\n'
                   f'key_file = "{tmp_path}/s.private"\nsign_socket = ""\n')
    strict = milters("check-config", "--strict", "--config", str(cfg))
    assert strict.returncode == 78 and "sign_socket is empty" in strict.stderr, strict.stderr
    assert milters("check-config", "--config", str(cfg)).returncode == 0

"""The `milters` command as an administrator meets it: help, check-config, test, serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from milters import registry
from tests.support.processes import ProcessFactory, free_port, port_accepts, wait_until

ROOT = Path(__file__).resolve().parents[2]


def milters(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "milters", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=full_env)


@pytest.mark.parametrize("command", ["run", "serve", "check-config", "test", "probe"])
def test_every_command_explains_itself(command: str) -> None:
    out = milters(command, "--help")
    assert out.returncode == 0 and "usage: milters " + command in out.stdout
    assert len(out.stdout.splitlines()) > 6


def test_top_level_help_lists_commands() -> None:
    out = milters("--help")
    assert out.returncode == 0
    for command in ("run", "serve", "check-config", "test", "probe", "smtpd_milters"):
        assert command in out.stdout


def test_check_config_with_no_file_prints_defaults(tmp_path: Path) -> None:
    out = milters("check-config", env={"MILTERS_CONFIG": ""})
    # /etc/milters/milters.toml normally does not exist here: built-in defaults.
    if Path("/etc/milters/milters.toml").exists():
        pytest.skip("a system config exists on this machine")
    assert out.returncode == 0, out.stderr
    assert "(built-in defaults)" in out.stdout and "[checks]" in out.stdout


def test_check_config_names_file_key_and_suggestion(tmp_path: Path) -> None:
    cfg = tmp_path / "milters.toml"
    cfg.write_text('[global]\nmod = "report"\n[checks]\nheader_check = "regexp:/x"\n')
    out = milters("check-config", "--config", str(cfg))
    assert out.returncode == 78
    assert f"unknown key 'mod' in [global] of {cfg}; did you mean 'mode'?" in out.stderr
    assert "did you mean 'header_checks'?" in out.stderr


def test_missing_table_file_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "milters.toml"
    cfg.write_text(f'[checks]\nheader_checks = "regexp:{tmp_path}/nope"\n')
    out = milters("check-config", "--config", str(cfg))
    assert out.returncode == 78 and f"{tmp_path}/nope" in out.stderr
    assert "header_checks" in out.stderr


def test_config_env_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[global]\nmode = "report"\n')
    out = milters("check-config", env={"MILTERS_CONFIG": str(cfg)})
    assert out.returncode == 0 and 'mode = "report"' in out.stdout


def test_offline_test_command_from_stdin(tmp_path: Path) -> None:
    (tmp_path / "hc").write_text("/^Subject: .*money/ REJECT 5.7.1 no money talk\n")
    cfg = tmp_path / "m.toml"
    # clamav off: it would tempfail here, with no clamd to scan with.
    cfg.write_text(f'[checks]\nheader_checks = "regexp:{tmp_path}/hc"\n'
                   '[clamav]\nenabled = false\n')
    msg = "From: a@example.com\nSubject: =?UTF-8?B?bW9uZXkgbW9uZXk=?=\n\nhi\n"
    out = milters("test", "-", "--config", str(cfg), "--from", "a@example.com",
                  "--rcpt", "u@example.com", stdin=msg)
    assert out.returncode == 1, out.stderr
    assert "[checks] verdict: reject 550 5.7.1 no money talk" in out.stdout
    assert "[chain] final verdict: reject 550 5.7.1 no money talk" in out.stdout
    # Only checks: clamav would tempfail here, with no clamd to scan with.
    clean = milters("test", "-", "--config", str(cfg), "--filter", "checks",
                    stdin="Subject: hi\n\nhi\n")
    assert clean.returncode == 0 and "verdict: accept" in clean.stdout


def test_probe_unreachable_milter() -> None:
    out = milters("probe", f"inet:{free_port()}@127.0.0.1", "-", stdin="Subject: x\n\nx\n")
    assert out.returncode == 69 and "milters probe" in out.stderr


def test_serve_restarts_a_dead_filter_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "m.toml"
    # Only checks: the other filters would take their default ports.
    others = "".join(f"[{n}]\nenabled = false\n" for n in registry.FILTERS if n != "checks")
    cfg.write_text(f'[checks]\nsocket = "inet:{port}@127.0.0.1"\n' + others)
    factory = ProcessFactory()
    try:
        serve = factory.start([sys.executable, "-m", "milters", "serve", "--config", str(cfg)],
                              port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        children = Path(f"/proc/{serve.pid}/task/{serve.pid}/children")
        first = children.read_text().split()
        assert len(first) == 1
        os.kill(int(first[0]), signal.SIGKILL)
        assert wait_until(lambda: "died: killed by SIGKILL" in serve.output(), 20)
        # The restarted filter listens (the killed one's workers may still hold
        # the port for a moment while they drain: the port alone proves nothing).
        assert wait_until(lambda: serve.output().count("listening on") == 2
                          and port_accepts(port), 20)

        cfg.write_text(f'[checks]\nsocket = "inet:{port}@127.0.0.1"\nworkerz = 2\n' + others)
        os.kill(serve.pid, signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in serve.output(), 20)
        assert "did you mean 'workers'?" in serve.output()
        assert port_accepts(port)

        os.kill(serve.pid, signal.SIGTERM)
        assert wait_until(lambda: serve.proc.poll() is not None, 60), serve.output()
        assert serve.proc.returncode == 0
        assert not port_accepts(port)
    finally:
        factory.close()


def test_serve_reload_moves_a_filter_and_starts_a_newly_enabled_one(tmp_path: Path) -> None:
    checks_port, moved_port, spf_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "m.toml"
    others = "".join(f"[{n}]\nenabled = false\n" for n in registry.FILTERS
                     if n not in ("checks", "spf"))
    cfg.write_text(f'[checks]\nsocket = "inet:{checks_port}@127.0.0.1"\n'
                   '[spf]\nenabled = false\n' + others)
    factory = ProcessFactory()
    try:
        serve = factory.start([sys.executable, "-m", "milters", "serve", "--config", str(cfg)],
                              checks_port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        cfg.write_text(f'[checks]\nsocket = "inet:{moved_port}@127.0.0.1"\n'
                       f'[spf]\nsocket = "inet:{spf_port}@127.0.0.1"\n' + others)
        os.kill(serve.pid, signal.SIGHUP)
        assert wait_until(lambda: "configuration reloaded" in serve.output(), 20)
        assert wait_until(lambda: port_accepts(moved_port) and port_accepts(spf_port), 30), \
            serve.output()
        assert wait_until(lambda: not port_accepts(checks_port), 30), serve.output()
        children = Path(f"/proc/{serve.pid}/task/{serve.pid}/children")
        assert wait_until(lambda: len(children.read_text().split()) == 2, 30), serve.output()
    finally:
        factory.close()


def test_serve_with_nothing_enabled_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("".join(f"[{n}]\nenabled = false\n" for n in registry.FILTERS))
    out = milters("serve", "--config", str(cfg))
    assert out.returncode == 78 and "no filter is enabled" in out.stderr, out.stderr


def test_genkey_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    out = milters("dkim", "genkey", "--domain", "example.com", "--selector", "s",
                  "--dir", str(missing))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert f"{missing}: no such directory" in out.stderr
    assert not missing.exists()


def test_genkey_help_names_no_openssl_command() -> None:
    out = milters("dkim", "genkey", "--help")
    assert out.returncode == 0 and "openssl genrsa" not in out.stdout

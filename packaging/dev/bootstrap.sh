#!/bin/bash
# Install everything the suite and its tests need on a Debian 12 machine:
# the libmilter runtime and headers (pymilter compiles against them), Postfix and
# the peers the tests talk to, then a virtualenv in .venv with the package.
# With --runtime: only what serving needs (libmilter, the package), no test peers.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

APT_PACKAGES=(libmilter-dev postfix postfix-pcre swaks clamav-daemon clamav-milter opendkim opendkim-tools dkimpy-milter miltertest opendmarc postgresql)
EXTRA='[test]'
if [ "${1:-}" = "--runtime" ]; then
    APT_PACKAGES=(libmilter-dev)
    EXTRA=''
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not create or start a default instance: the tests run their own.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".$EXTRA"

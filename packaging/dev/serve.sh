#!/bin/bash
# Install, then serve every enabled filter on its default loopback socket with the
# embedded default config (or the file named by MILTERS_CONFIG / /etc/milters/milters.toml).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash packaging/dev/bootstrap.sh --runtime
exec .venv/bin/milters serve "$@"

#!/usr/bin/env bash
# Set-up from nothing, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The browser tests open the report in Debian's Chromium; they skip, saying why, without it.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
        || echo "chromium could not be installed: the browser tests will skip"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider tests

#!/usr/bin/env bash
# Installs vlmux with its test dependencies, and Debian's Chromium, which the tests use to look at the run report.
set -euo pipefail
cd "$(dirname "$0")"
echo "install.sh: installing vlmux with its test dependencies (pip, a few minutes)..."
python3 -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "install.sh: install Chromium (Debian: apt-get install chromium) for the report test" >&2
    fi
fi

#!/usr/bin/env bash
# Installs vlmux with its test dependencies, and Debian's Chromium, which the tests use to look at the run report,
# the dashboard and the review page. One line per step says what it installs and why before it starts.
set -euo pipefail
cd "$(dirname "$0")"
echo "install.sh: 1/2 pip: vlmux (editable) with its test extras: torch, transformers, FastAPI, Ray, Playwright... (a few minutes on a fresh machine)"
python3 -m pip install -q -e ".[test]"
if command -v chromium >/dev/null 2>&1; then
    echo "install.sh: 2/2 Chromium for the page tests: already installed ($(command -v chromium))"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "install.sh: 2/2 apt: Debian's chromium, which the tests drive headless to check the report, dashboard and review pages (about a minute)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "install.sh: 2/2 skipped: install Chromium (Debian: apt-get install chromium) for the page tests" >&2
fi
echo "install.sh: done; try: vlmux demo"

#!/usr/bin/env bash
# Installs vlmux with its test dependencies, and Debian's Chromium, which the tests use to look at the run report
# and the dashboard. One line per step: what it installs, why, and how long it took.
set -euo pipefail
cd "$(dirname "$0")"
step() { echo "install.sh: $*"; }
started=$SECONDS
step "1/2 pip: vlmux (editable) with its test dependencies: torch, transformers, FastAPI, pyarrow, Playwright... (a few minutes on a fresh machine)"
python3 -m pip install -q -e ".[test]"
step "1/2 done in $((SECONDS - started)) s"
if command -v chromium >/dev/null 2>&1; then
    step "2/2 Chromium: already installed ($(command -v chromium)); the dashboard and report tests drive it headless"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    started=$SECONDS
    step "2/2 apt-get: Debian's chromium package, which the dashboard and report tests drive headless through Playwright"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    step "2/2 done in $((SECONDS - started)) s"
else
    step "2/2 skipped: install Chromium yourself (Debian: apt-get install chromium) for the dashboard and report tests" >&2
fi
step "finished: run the tests with python3 -m pytest"

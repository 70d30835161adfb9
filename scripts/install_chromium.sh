#!/usr/bin/env bash
# Debian's headless Chromium for the browser tests (tests/browser), installed from Debian's packages
# when missing and we are root; Playwright drives it (no browser is ever downloaded by a test tool).
# Not root and missing: say how to install it; the browser tests then skip (MOR_LAB_REQUIRE_BROWSER=1
# makes that a failure, as in CI).
set -uo pipefail
CHROMIUM=${MOR_LAB_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
    [ -x "$CHROMIUM" ] && exit 0
    echo "chromium install failed" >&2
    exit 1
fi
echo "no $CHROMIUM: the browser tests will be skipped (install it: sudo apt-get install -y chromium)" >&2
exit 0

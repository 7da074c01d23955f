#!/usr/bin/env bash
# The playground's browser test (tests/test_playground.py) drives Debian's Chromium through chromedriver: installed
# from Debian's packages when either is missing (as root; with sudo otherwise). Only the tests need it.
set -euo pipefail
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver \
        >/dev/null
fi

#!/usr/bin/env bash
# Headless Chromium for the gallery's real-browser test (tests/e2e/test_gallery_browser.py): Debian's
# `chromium` package. Does nothing when it is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium

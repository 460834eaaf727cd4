#!/usr/bin/env bash
# Install headless Chromium for tests/test_report.py (renders the HTML evaluation report).
# Idempotent: does nothing when /usr/bin/chromium already exists. Debian 12, run as root.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    # Not root: use sudo when there is one, otherwise say what is needed.
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "install_browser.sh: need root (or sudo) to apt-get install chromium" >&2
        exit 1
    fi
else
    SUDO=""
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
/usr/bin/chromium --version

#!/usr/bin/env bash
# A real browser for the documentation's screenshots (scripts/screenshots.py): Debian's
# `chromium` (apt) and the `playwright-core` npm package (no bundled browsers: it drives that
# chromium) in a folder of its own, outside the repo and the venv:
#
#   scripts/install_browser.sh        # prints the folder: PIPELINE_BROWSER_DIR for the script
#
# Idempotent: apt runs only when /usr/bin/chromium is missing, npm only when the pinned
# playwright-core is not there yet. Needs root or sudo for apt, node and npm on PATH.
set -euo pipefail

PLAYWRIGHT_CORE_VERSION=1.65.2
DIR="${PIPELINE_BROWSER_DIR:-$HOME/.cache/train-and-deploy/browser}"

if ! command -v chromium >/dev/null 2>&1; then
    # shellcheck source=lib/apt_install.sh
    . "$(dirname "$0")/lib/apt_install.sh"
    apt_install install_browser chromium
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install_browser: npm not found: install Node.js (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
installed="$DIR/node_modules/playwright-core/package.json"
if [ ! -f "$installed" ] || ! grep -q "\"version\": \"$PLAYWRIGHT_CORE_VERSION\"" "$installed"; then
    mkdir -p "$DIR"
    npm install --silent --no-audit --no-fund --prefix "$DIR" "playwright-core@$PLAYWRIGHT_CORE_VERSION"
fi
echo "install_browser: $(chromium --version), playwright-core $PLAYWRIGHT_CORE_VERSION in $DIR"

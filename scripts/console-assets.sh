#!/usr/bin/env bash
# Installs what the gateway's browser console needs: noVNC (served by the
# gateway from gateway/console/node_modules/@novnc/novnc) and playwright-core
# (for gateway/console/test/screenshot.mjs), both at the versions pinned in
# gateway/console/package-lock.json, plus Debian's Chromium at
# /usr/bin/chromium for the screenshot check and Debian's spice-html5 at
# /usr/share/spice-html5 for the SPICE console page (each installed when
# missing, which needs root; the gateway serves spice-html5 from there, or
# from --console-spice-html5-dir). Never downloads a browser build of its
# own. spice-html5 comes from Debian rather than npm: npm's
# @spice-project/spice-html5 is an older release (0.2.1) than Debian's
# (0.3.0), and the Debian package is what the distribution maintains.
# Source this file and call ensure_console_assets, or run it.

console_log() { echo "[console-assets] $*" >&2; }

HCP_CONSOLE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/gateway/console"

# Succeeds when node_modules holds exactly the versions the lockfile pins.
console_modules_current() {
  [ -d "$HCP_CONSOLE_DIR/node_modules" ] || return 1
  node -e '
    const fs = require("fs");
    const dir = process.argv[1];
    const lock = JSON.parse(fs.readFileSync(dir + "/package-lock.json", "utf8"));
    for (const [path, entry] of Object.entries(lock.packages || {})) {
      if (!path.startsWith("node_modules/")) continue;
      const installed = JSON.parse(fs.readFileSync(dir + "/" + path + "/package.json", "utf8"));
      if (installed.version !== entry.version) process.exit(1);
    }
  ' "$HCP_CONSOLE_DIR" 2>/dev/null
}

ensure_console_modules() {
  if ! command -v npm >/dev/null 2>&1; then
    console_log "npm is missing: install Node.js 20 or newer"; return 1
  fi
  if console_modules_current; then
    console_log "noVNC and playwright-core already installed in $HCP_CONSOLE_DIR/node_modules"
    return 0
  fi
  console_log "installing noVNC and playwright-core from package-lock.json (npm ci)"
  # --include=dev: playwright-core is a dev dependency and CI may set
  # NODE_ENV=production. Neither package has install scripts; ignore any.
  npm ci --prefix "$HCP_CONSOLE_DIR" --no-audit --no-fund --ignore-scripts \
    --include=dev --loglevel=error </dev/null >&2
}

ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    console_log "/usr/bin/chromium is missing and we are not root: install Debian's chromium"
    return 1
  fi
  console_log "installing Debian's chromium"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium </dev/null >&2; then
    console_log "install failed; updating the package lists and trying again"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium </dev/null >&2 || return 1
  fi
  [ -x /usr/bin/chromium ] || { console_log "chromium installed but /usr/bin/chromium is missing"; return 1; }
}

# Debian's package name, and a file it installs.
SPICE_HTML5_PACKAGE=spice-html5
SPICE_HTML5_MAIN=/usr/share/spice-html5/main.js

ensure_spice_html5() {
  if [ -f "$SPICE_HTML5_MAIN" ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    console_log "$SPICE_HTML5_MAIN is missing and we are not root: install Debian's $SPICE_HTML5_PACKAGE"
    return 1
  fi
  console_log "installing Debian's $SPICE_HTML5_PACKAGE"
  # Its recommended websockify is a proxy of its own; the gateway is HCP's.
  local install=(apt-get install -y -qq --no-install-recommends "$SPICE_HTML5_PACKAGE")
  if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" </dev/null >&2; then
    console_log "install failed; updating the package lists and trying again"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 || return 1
    DEBIAN_FRONTEND=noninteractive "${install[@]}" </dev/null >&2 || return 1
  fi
  [ -f "$SPICE_HTML5_MAIN" ] || { console_log "$SPICE_HTML5_PACKAGE installed but $SPICE_HTML5_MAIN is missing"; return 1; }
}

ensure_console_assets() {
  ensure_console_modules || return 1
  ensure_chromium || return 1
  ensure_spice_html5 || return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_console_assets
fi

#!/usr/bin/env bash
# Installs the tools of the API contract tests (cli/tests/contract.rs), once:
# a Python venv with schemathesis and openapi-python-client (PyPI, the exact
# versions of gateway/clients/python/requirements.txt) and the TypeScript
# tools of gateway/clients/ts (npm, `npm ci` from its package-lock.json).
# Each is reinstalled only when its pin file (or the python3/node it was
# made with) changed; concurrent callers wait for one install.
#
# Prints what the tests need, one KEY=VALUE a line:
#   HCP_CONTRACT_BIN  the venv's bin (python, schemathesis, openapi-python-client, ruff)
#   HCP_CONTRACT_TS   the TypeScript project, node_modules installed
# Exits 3 when a registry cannot be reached (the tests skip, except under
# CI), 1 on any other failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${HCP_CONTRACT_TOOLS_DIR:-$root/target/contract-tools}"
requirements="$root/gateway/clients/python/requirements.txt"
ts="$root/gateway/clients/ts"
log() { echo "[contract-tools] $*" >&2; }

for tool in python3 node npm flock sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || { log "$tool is missing"; exit 1; }
done
mkdir -p "$dir"
exec 9>"$dir/lock"
flock 9

# What an install was made from: the pin file and the interpreter.
stamp_of() { { sha256sum <"$1"; "$2" --version; } 2>&1 | sha256sum | cut -d' ' -f1; }

venv="$dir/venv"
want="$(stamp_of "$requirements" python3)"
if [ "$(cat "$venv/.hcp-stamp" 2>/dev/null)" != "$want" ]; then
  log "installing schemathesis and openapi-python-client (PyPI) in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2; then
    rm -rf "$venv"
    if ! python3 -m pip index versions schemathesis >/dev/null 2>&1; then
      log "PyPI cannot be reached"; exit 3
    fi
    log "pip install -r $requirements failed"; exit 1
  fi
  echo "$want" >"$venv/.hcp-stamp"
fi

want="$(stamp_of "$ts/package-lock.json" node)"
if [ "$(cat "$ts/node_modules/.hcp-stamp" 2>/dev/null)" != "$want" ]; then
  log "installing openapi-typescript, openapi-fetch and typescript (npm ci) in $ts"
  if ! (cd "$ts" && npm ci --no-audit --no-fund --loglevel=error >&2); then
    rm -rf "$ts/node_modules"
    if ! npm ping >/dev/null 2>&1; then
      log "the npm registry cannot be reached"; exit 3
    fi
    log "npm ci in $ts failed"; exit 1
  fi
  echo "$want" >"$ts/node_modules/.hcp-stamp"
fi

echo "HCP_CONTRACT_BIN=$venv/bin"
echo "HCP_CONTRACT_TS=$ts"

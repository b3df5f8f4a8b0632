#!/usr/bin/env bash
# Mints a token core accepts when it verifies with a shared HS256 secret
# ([auth] hs256_secret_file): for an operator's first token and the
# gateway's service token in a deployment without an identity provider.
# Needs bash and openssl (Debian's). Anyone holding the secret can mint any
# token: run it where the secret is (as root), and keep tokens short-lived.
#
# Usage: deploy/hcp-token.sh SECRET_FILE ISSUER SUBJECT TTL_SECONDS ROLE [TENANT [PROJECT...]]
#   deploy/hcp-token.sh /etc/credstore/hcp-jwt-secret https://hcp.example.com/ ops-alice 3600 ops.admin
#   deploy/hcp-token.sh /etc/credstore/hcp-jwt-secret https://hcp.example.com/ console-proxy 31536000 console.proxy
# The audience is "hcp" (core's auth.audience default); HCP_TOKEN_AUDIENCE
# changes it.
set -euo pipefail
if [ "$#" -lt 5 ]; then
  sed -n '8,12p' "$0" >&2
  exit 2
fi
secret_file="$1" issuer="$2" subject="$3" ttl="$4" role="$5"
shift 5
tenant="${1:-}"
[ "$#" -gt 0 ] && shift
audience="${HCP_TOKEN_AUDIENCE:-hcp}"

# JSON strings: these values are names, so anything that would need
# escaping is refused rather than escaped.
for value in "$issuer" "$subject" "$role" "$tenant" "$audience" "$@"; do
  case "$value" in
    *'"'* | *'\'* | *[[:cntrl:]]*) echo "refusing a value with a quote, backslash or control character: $value" >&2; exit 2 ;;
  esac
done
case "$ttl" in '' | *[!0-9]*) echo "TTL_SECONDS must be a number of seconds: $ttl" >&2; exit 2 ;; esac

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now="$(date +%s)"
claims="{\"sub\":\"$subject\",\"iss\":\"$issuer\",\"aud\":\"$audience\",\"iat\":$now,\"exp\":$((now + ttl)),\"roles\":[\"$role\"]"
if [ -n "$tenant" ]; then
  projects=""
  for p in "$@"; do projects="${projects:+$projects,}\"$p\""; done
  claims="$claims,\"tenant\":\"$tenant\",\"projects\":[$projects]"
fi
claims="$claims}"
signing_input="$(printf '{"alg":"HS256","typ":"JWT"}' | b64url).$(printf '%s' "$claims" | b64url)"
# Core's key is the file's bytes without trailing ASCII whitespace (as
# read_hs256_secret reads it); openssl takes it as hex, so any byte works.
key_hex="$(od -An -v -tx1 "$secret_file" | tr -d ' \n')"
while :; do
  case "$key_hex" in
    *20 | *09 | *0a | *0c | *0d) key_hex="${key_hex%??}" ;;
    *) break ;;
  esac
done
signature="$(printf '%s' "$signing_input" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$key_hex" -binary | b64url)"
printf '%s.%s\n' "$signing_input" "$signature"

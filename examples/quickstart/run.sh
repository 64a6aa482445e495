#!/bin/sh
# Quickstart: create keys and demo secrets on first run, then run sidekey in the
# foreground on this directory's config (local encrypted store, SQLite state).
# Ctrl-C (SIGINT) or SIGTERM stops it cleanly. `run.sh --setup-only` creates them and
# exits (examples/mcp-content-api/run.sh daemon runs the daemon on its own config).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -x "$root/.venv/bin/sidekey" ]; then sidekey="$root/.venv/bin/sidekey"; else sidekey=sidekey; fi
cfg="$here/sidekey.yaml"

mkdir -p "$here/keys" "$here/state" "$here/run"
chmod 700 "$here/keys" "$here/state"
[ -f "$here/keys/local.key" ] || "$sidekey" keygen local --out "$here/keys/local.key"
[ -f "$here/keys/token-keys.json" ] || "$sidekey" keygen tokens --config "$cfg"
[ -f "$here/keys/demo-issuer.pem" ] || "$sidekey" keygen issuer \
  --out "$here/keys/demo-issuer.pem" --jwks "$here/keys/demo-issuer-jwks.json"

# One random demo secret per tool (values never appear on the command line).
existing=$("$sidekey" secrets list --config "$cfg")
for name in content-api/read-key content-api/write-key content-api/publish-key analytics-db/readonly-dsn; do
  case "$existing" in *"$name"*) continue ;; esac
  printf 'demo-%s-%s' "$(echo "$name" | tr '/' '-')" "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    | "$sidekey" secrets put "$name" --config "$cfg"
done

"$sidekey" check-config --config "$cfg"
[ "${1:-}" = "--setup-only" ] && exit 0
echo "starting sidekey; in another terminal:"
echo "  curl --unix-socket $here/run/sidekey.sock http://sidekey/v1/health"
echo "  export SIDEKEY_USER_TOKEN=\$($sidekey token user --config $cfg --key $here/keys/demo-issuer.pem --jwks $here/keys/demo-issuer-jwks.json --server content-api --user alice)"
echo "  $sidekey call --config $cfg --server content-api --tool create_article --agent content-writer"
exec "$sidekey" serve --config "$cfg"

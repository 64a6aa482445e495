#!/bin/sh
# Run the example MCP server next to the quickstart daemon (examples/quickstart/run.sh).
#   run.sh [stdio|http] [content-api|analytics-db] [extra server.py options]
#   run.sh token [content-api|analytics-db] [agent]   # a demo user token with an azp claim
#   run.sh daemon      # the quickstart daemon on this directory's sidekey.yaml: egress
#                      # injection for list_articles, a per-user token for query_metrics
#   run.sh upstreams   # the demo IdP (:8768) and HTTPS APIs (:8767) those two call
# $PYTHON: an interpreter with sidekey[mcp] (default: the repo's .venv, else python3).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
qs="$root/examples/quickstart"
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
export SIDEKEY_SOCKET="${SIDEKEY_SOCKET:-$qs/run/sidekey.sock}"
[ -d "$root/src/sidekey" ] && export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

mode="${1:-http}"; [ $# -gt 0 ] && shift
case "$mode" in stdio|http|token) server="${1:-content-api}"; [ $# -gt 0 ] && shift ;; esac
case "$mode" in
  daemon)
    # The quickstart's keys, demo secrets and store, then the demo CA, TLS certificate and
    # IdP client secret (put in the store, read from stdin: never on a command line).
    "$qs/run.sh" --setup-only
    if [ -x "$root/.venv/bin/sidekey" ]; then sidekey="$root/.venv/bin/sidekey"; else sidekey=sidekey; fi
    "$python" "$here/upstreams.py" --keys "$qs/keys" --init
    case "$("$sidekey" secrets list --config "$here/sidekey.yaml")" in
      *demo-idp/client-secret*) ;;
      *) "$sidekey" secrets put demo-idp/client-secret --config "$here/sidekey.yaml" \
           < "$qs/keys/demo-idp-client-secret" ;;
    esac
    "$sidekey" check-config --config "$here/sidekey.yaml"
    exec "$sidekey" serve --config "$here/sidekey.yaml" ;;
  upstreams)
    "$python" "$here/upstreams.py" --keys "$qs/keys" --init
    exec "$python" "$here/upstreams.py" --keys "$qs/keys" "$@" ;;
  stdio|http) exec "$python" "$here/server.py" --transport "$mode" --server "$server" "$@" ;;
  token)
    # What the identity provider would issue to the agent's OAuth client: the agent id
    # is the token's azp claim (the quickstart's demo issuer key signs it).
    exec "$python" - "$qs" "$server" "${1:-content-writer}" <<'PY'
import sys
from pathlib import Path

import yaml

from sidekey.devissuer import kid_of, mint_user_token

qs, server, agent = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
oauth = yaml.safe_load((qs / "mcp-server-registry.yaml").read_text())["servers"][server]["oauth2"]
print(mint_user_token(qs / "keys/demo-issuer.pem", kid=kid_of(qs / "keys/demo-issuer-jwks.json"),
                      issuer=oauth["issuer"], audience=oauth["audience"], subject="alice",
                      scopes=oauth["scopes"], extra={"azp": agent}))
PY
    ;;
  *) echo "usage: $0 [stdio|http|token|daemon|upstreams] [content-api|analytics-db] [...]" >&2; exit 2 ;;
esac

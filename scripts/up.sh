#!/usr/bin/env bash
# Installs what is needed, builds Hive, starts `hive up` (API server on the embedded store,
# this machine as a node, tenant "default") in the background on 127.0.0.1:7080, logs the CLI
# in, and creates a demo service. Run as root on Debian 12.
#   HIVE_DATA_DIR (/var/lib/hive)  HIVE_LISTEN (127.0.0.1:7080)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

DATA=${HIVE_DATA_DIR:-/var/lib/hive}
LISTEN=${HIVE_LISTEN:-127.0.0.1:7080}
PIDFILE=$DATA/hive-up.pid
LOG=$DATA/hive-up.log

echo "== building (release)"
cargo build --release --locked -p hive
install -m 0755 target/release/hive /usr/local/bin/hive

mkdir -p "$DATA"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "== hive up already running (pid $(cat "$PIDFILE")); restarting it on the new build"
  kill "$(cat "$PIDFILE")"
  for _ in $(seq 50); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.1; done
fi
echo "== starting hive up on $LISTEN (data in $DATA, log in $LOG)"
nohup hive up --data-dir "$DATA" --listen "$LISTEN" --login >"$LOG" 2>&1 &
echo $! >"$PIDFILE"
for _ in $(seq 100); do
  curl -fsS "http://$LISTEN/healthz" >/dev/null 2>&1 && grep -q "API at" "$LOG" && break
  kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { cat "$LOG"; echo "hive up exited" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "http://$LISTEN/healthz"

echo "== demo: a service in tenant default"
hive service get demo >/dev/null 2>&1 || \
  hive service create demo --image busybox --replicas 2 -p 8080:80 -- httpd -f -p 80
hive service ls
hive node ls
hive events
cat <<MSG

Hive is running (pid $(cat "$PIDFILE")), API at http://$LISTEN, OpenAPI at http://$LISTEN/api/v1/openapi.json.
The CLI is logged in as the platform admin (token in $DATA/admin.token). Try:
  hive tenant create acme && hive --tenant acme token create --role tenant-admin
  hive scale demo 3 && hive events -f
Stop it with: kill \$(cat $PIDFILE)
Services do not start containers yet: the agent's sync loop is the next part (docs/architecture.md).
MSG

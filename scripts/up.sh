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

echo "== demo image: busybox-static, built locally with umoci, pushed into Hive's registry"
IMG_DIR=$(mktemp -d)
trap 'rm -rf "$IMG_DIR"' EXIT
umoci init --layout "$IMG_DIR/oci" >/dev/null
umoci new --image "$IMG_DIR/oci:latest" >/dev/null
umoci config --image "$IMG_DIR/oci:latest" --config.cmd /bin/sh --architecture amd64 --os linux >/dev/null
umoci unpack --image "$IMG_DIR/oci:latest" "$IMG_DIR/bundle" >/dev/null
mkdir -p "$IMG_DIR/bundle/rootfs/bin"
cp /bin/busybox "$IMG_DIR/bundle/rootfs/bin/busybox"
chroot "$IMG_DIR/bundle/rootfs" /bin/busybox --install -s /bin
umoci repack --image "$IMG_DIR/oci:latest" "$IMG_DIR/bundle" >/dev/null
skopeo copy -q --dest-tls-verify=false --dest-creds "hive:$(cat "$DATA/admin.token")" \
  "oci:$IMG_DIR/oci:latest" "docker://$LISTEN/default/busybox:latest"

echo "== demo: a service in tenant default, running as real containers"
DEMO_IMAGE="$LISTEN/default/busybox:latest"
if hive service get demo -o json >/dev/null 2>&1 &&
  [ "$(hive service get demo -o json | jq -r .spec.template.image)" != "$DEMO_IMAGE" ]; then
  echo "== an older demo service runs another image; replacing it"
  hive service rm demo
fi
if hive service get demo -o json >/dev/null 2>&1 &&
  ! hive service get demo -o json | jq -e '.spec.template.args | tostring | contains("httpd")' >/dev/null; then
  echo "== an older demo service runs another command; replacing it"
  hive service rm demo
fi
hive service get demo >/dev/null 2>&1 || \
  hive service create demo --image "$DEMO_IMAGE" --replicas 2 --memory 64Mi -- \
    sh -c 'mkdir -p /www && echo "hello from $(hostname)" >/www/index.html && echo "serving on port 8080" && exec httpd -f -vv -p 8080 -h /www'
hive service get web >/dev/null 2>&1 || \
  hive service create web --image "$DEMO_IMAGE" --memory 64Mi -p 8080:80 -- \
    sh -c 'mkdir -p /www && echo "hello from $(hostname), published on the node" >/www/index.html && exec httpd -f -vv -p 80 -h /www'
if [ "$(hive service get demo -o json | jq .spec.replicas)" = 0 ]; then
  hive scale demo 2 >/dev/null   # scaled to nothing on an earlier run: bring the demo back
fi
for _ in $(seq 100); do
  [ "$(hive instance ls -o json | jq '[.[] | select(.status.phase == "running" and .status.ip != null)] | length')" -ge 2 ] && break
  sleep 0.2
done
hive service ls
hive instance ls
hive logs --tail 1 demo
echo "== the demo's replicas answer each other on the tenant network (port 8080)"
FIRST=$(hive instance ls -o json | jq -r '[.[] | select(.spec.service == "demo" and .status.phase == "running")][0].name')
for ip in $(hive instance ls -o json | jq -r '.[] | select(.spec.service == "demo" and .status.phase == "running") | .status.ip'); do
  echo "$FIRST -> $ip:8080: $(hive exec "$FIRST" wget -qO- "http://$ip:8080/")"
done
NODE_IP=$(hive node ls -o json | jq -r '.[0].status.underlay_ip')
echo "== service web publishes port 80 of its container on the node: http://$NODE_IP:8080/"
for _ in $(seq 50); do curl -fsS --max-time 2 "http://$NODE_IP:8080/" && break; sleep 0.2; done
echo "== and at 127.0.0.1:8080 on this machine"
curl -fsS --max-time 2 "http://127.0.0.1:8080/" || echo "(no answer at 127.0.0.1:8080)"
hive node ls
hive events
cat <<MSG

Hive is running (pid $(cat "$PIDFILE")), API at http://$LISTEN, OpenAPI at http://$LISTEN/api/v1/openapi.json.
The CLI is logged in as the platform admin (token in $DATA/admin.token). Try:
  hive logs -f demo
  hive run --name hello $DEMO_IMAGE sh -c 'echo hello; sleep 3600' && hive logs hello
  hive scale demo 3 && hive events -f
  hive exec -it demo sh
  hive network ls && hive network create back --subnet 10.89.0.0/24
  hive tenant create acme && hive --tenant acme token create --role tenant-admin
Stop it with: kill \$(cat $PIDFILE)   (containers keep running; start it again to adopt them)
Built: each tenant's private network (instances reach each other by address and service
name, across nodes), published ports (curl http://$NODE_IP:8080/ or http://127.0.0.1:8080/
reaches service web), security groups, bandwidth and packet-rate limits.
MSG

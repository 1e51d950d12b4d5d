#!/usr/bin/env bash
# A three-clinic federation on one machine, set up step by step the way
# docs/operator-guide.md sets up a real one: a federation CA, the aggregator's
# certificate with the DNS name clinics dial, each clinic's own key and certificate
# request, an admin certificate, the configuration files, the checks, and the services as
# separate processes. tests/test_operator_guide.py runs it, so the guide cannot rot.
#
#   bash docs/examples/localhost-federation.sh setup WORK DATA   # PKI, data, configs, checks
#   bash docs/examples/localhost-federation.sh start WORK        # aggregator + 3 agents
#   bash docs/examples/localhost-federation.sh stop WORK         # SIGTERM, wait
#
# DATA is a HAM10000-layout folder, class folders or an index CSV; on a real deployment
# each clinic points at its own folder, here `dermafed data partition` stands in for three
# sites. Ports come from AGG_PORT (7443), ADMIN_PORT (7445) and METRICS_PORT (9464).
set -euo pipefail

cmd=${1:?usage: $0 setup WORK DATA | start WORK | stop WORK}
WORK=$(realpath -m "${2:?WORK folder}")
FEDERATION=guide-fed
CLINICS="clinic-1 clinic-2 clinic-3"
AGG_PORT=${AGG_PORT:-7443}
ADMIN_PORT=${ADMIN_PORT:-7445}
METRICS_PORT=${METRICS_PORT:-9464}

setup() {
  local data
  data=$(realpath "${1:?DATA folder}")
  mkdir -p "$WORK" && cd "$WORK"

  # 1. The federation CA. On a real deployment this runs on an offline machine, with
  #    --encrypt; only ca/ca.crt and ca/crl.pem ever leave it.
  dermafed pki init --federation "$FEDERATION" --out ca

  # 2. The aggregator's certificate names the DNS name clinics dial (here: localhost).
  dermafed pki issue --role aggregator --name aggregator --dns localhost \
    --out tls/aggregator --ca ca

  # 3. Each clinic makes its own key and a request; only the request travels to the CA,
  #    and only the certificate and ca.crt travel back.
  for clinic in $CLINICS; do
    dermafed pki request --federation "$FEDERATION" --role clinic --name "$clinic" \
      --out "tls/$clinic"
    dermafed pki sign --ca ca --csr "tls/$clinic/$clinic.csr" --role clinic \
      --name "$clinic" --out "tls/$clinic"
  done

  # 4. The operator's admin certificate.
  dermafed pki issue --role admin --name operator --out tls/admin --ca ca

  # 5. Data: the aggregator's labelled held-out set (data/holdout.csv, lesions no clinic
  #    holds) and, standing in for three sites, one index file per clinic.
  dermafed data partition --clinics 3 --alpha 1 --holdout 0.2 "$data" data

  # 6. Configuration files.
  mkdir -p state logs
  cat > aggregator.toml <<EOF
federation = "$FEDERATION"
[server]
listen = "127.0.0.1:$AGG_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
[tls]
ca_cert = "tls/aggregator/ca.crt"
cert = "tls/aggregator/aggregator.crt"
key = "tls/aggregator/aggregator.key"
crl = "ca/crl.pem"
[storage]
state_dir = "state/aggregator"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
[rounds]
min_clinics = 2
start_when_connected = 3
max_rounds = 3
[plan]
batch_size = 32
[validation]
holdout = "data/holdout.csv"
EOF
  local i=0
  for clinic in $CLINICS; do
    i=$((i + 1))
    cat > "agent-$clinic.toml" <<EOF
federation = "$FEDERATION"
[aggregator]
address = "localhost:$AGG_PORT"
[tls]
ca_cert = "tls/$clinic/ca.crt"
cert = "tls/$clinic/$clinic.crt"
key = "tls/$clinic/$clinic.key"
[data]
path = "data/clinic-$i.csv"
[storage]
state_dir = "state/$clinic"
[privacy]
epsilon_max = 8.0
EOF
  done
  cat > admin.toml <<EOF
federation = "$FEDERATION"
[aggregator]
address = "localhost:$ADMIN_PORT"
[tls]
ca_cert = "tls/admin/ca.crt"
cert = "tls/admin/operator.crt"
key = "tls/admin/operator.key"
EOF

  # 7. Check each file as its daemon will read it (identity, key, federation).
  dermafed config check --role aggregator --config aggregator.toml
  for clinic in $CLINICS; do
    dermafed config check --role agent --config "agent-$clinic.toml"
  done
}

start() {
  cd "$WORK"
  dermafed aggregator serve --config aggregator.toml >logs/aggregator.log 2>&1 &
  echo $! >state/aggregator.pid
  for clinic in $CLINICS; do
    dermafed agent run --config "agent-$clinic.toml" >"logs/$clinic.log" 2>&1 &
    echo $! >"state/$clinic.pid"
  done
}

stop() {
  cd "$WORK"
  local pid
  for f in state/*.pid; do
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
  done
  for f in state/*.pid; do
    pid=$(cat "$f")
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    rm -f "$f"
  done
}

case "$cmd" in
  setup) setup "${3:-}" ;;
  start) start ;;
  stop) stop ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac

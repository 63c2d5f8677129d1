#!/usr/bin/env bash
# A private local Ray cluster to `ray job submit` to, and a stop that touches no other Ray instance.
#
#   jobs/local_cluster.sh start [NUM_CPUS]   start `ray start --head --block` in its own session;
#                                            prints the dashboard address to submit to
#   jobs/local_cluster.sh address            that address again
#   jobs/local_cluster.sh env                the exports a client of this cluster needs (token auth)
#   jobs/local_cluster.sh stop               SIGTERM to that `ray start` process only: it shuts down
#                                            the processes it started (GCS, raylet, dashboard, workers,
#                                            job drivers); then remove <temp-dir>/ray_current_cluster
#
# `ray stop` is never used: it ends every Ray process on the machine, other people's clusters and
# test instances included. State lives in $ADORE_RAY_DIR (default /tmp/adore-ray): tmp/ (Ray's
# --temp-dir), pid, address, ray.log. Ports: the dashboard takes 8265 when it is free, else a free
# one; GCS, dashboard agent and Ray client ports are free ones, so that two clusters can coexist.
# Token auth: the cluster uses its own token, $ADORE_RAY_DIR/auth_token (made on first start, mode
# 600), never ~/.ray: nothing here depends on the user's home directory. Clients of this cluster
# need RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<that file>; `jobs/local_cluster.sh env` prints
# both as shell exports (scripts/main.sh evaluates it).
set -euo pipefail

DIR=${ADORE_RAY_DIR:-/tmp/adore-ray}
PY=${PYTHON:-python}
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$DIR/auth_token}

make_token() {  # a fresh random token in $RAY_AUTH_TOKEN_PATH unless one is there already
  [[ -s "$RAY_AUTH_TOKEN_PATH" ]] && return 0
  mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
  (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
}

free_port() {  # $1: preferred port (optional)
  "$PY" - "${1:-0}" <<'EOF'
import socket, sys
want = int(sys.argv[1])
for port in ([want] if want else []) + [0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        print(s.getsockname()[1])
        break
    except OSError:
        continue
    finally:
        s.close()
EOF
}

alive() { [[ -f "$DIR/pid" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; }

start() {
  local cpus=${1:-2}
  if alive; then echo "already running: $(cat "$DIR/address")"; return 0; fi
  mkdir -p "$DIR/tmp"
  make_token
  local dash
  dash=$(free_port 8265)
  setsid ray start --head --block --num-cpus "$cpus" --temp-dir "$DIR/tmp" \
    --port "$(free_port)" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
    --include-dashboard true --disable-usage-stats >"$DIR/ray.log" 2>&1 < /dev/null &
  echo $! >"$DIR/pid"
  echo "http://127.0.0.1:$dash" >"$DIR/address"
  for _ in $(seq 120); do
    if ray job list --address "$(cat "$DIR/address")" >/dev/null 2>&1; then
      cat "$DIR/address"
      return 0
    fi
    alive || { echo "ray start failed; see $DIR/ray.log" >&2; tail -20 "$DIR/ray.log" >&2; return 1; }
    sleep 1
  done
  echo "the dashboard did not answer within 120 s; see $DIR/ray.log" >&2
  return 1
}

stop() {
  if ! alive; then echo "not running"; rm -f "$DIR/tmp/ray_current_cluster"; return 0; fi
  local pid
  pid=$(cat "$DIR/pid")
  kill -TERM "$pid"
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi  # its session only
  rm -f "$DIR/pid" "$DIR/tmp/ray_current_cluster"
  echo "stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  address) cat "$DIR/address" ;;
  env) echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(printf %q "$RAY_AUTH_TOKEN_PATH")" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac

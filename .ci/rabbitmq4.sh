#!/usr/bin/env bash
# RabbitMQ 4.0.5 beside the machine's RabbitMQ 3.10.8, for CI's RabbitMQ 4 legs (.ci/run).
# Debian 12 cannot run the Erlang/OTP 27 that 4.0.5 needs (it wants glibc 2.38), so the broker
# runs in a Debian 13 "trixie" root made by debootstrap from Debian's package registry (~1 min
# and ~370 MB the first time; kept afterwards).
#
#   .ci/rabbitmq4.sh up      make the root if missing, start the node, wait for it; already up: fine
#   .ci/rabbitmq4.sh down    stop the node
#   .ci/rabbitmq4.sh ctl ... rabbitmqctl against the node
#   .ci/rabbitmq4.sh root    make the root (and its mounts) only: the 4.0.5 cluster's nodes
#                            (python -m rabbitkeys.tools.rabbit_cluster --root) run in it too
#
# The node: rk4-5710@localhost; AMQP 5710, management 15710, prometheus 15711, distribution
# 25710; guest/guest from anywhere; plugins management, event_exchange, consistent_hash_exchange,
# prometheus; Khepri as its metadata store (enabled once after its first start: irreversible for
# its data directory; RabbitMQ 4.3 has nothing else); the features RabbitMQ 4.3 removes by default
# denied here too (transient non-exclusive queues, global QoS). Ports, root and node name are
# this project's own: they do not clash with a RabbitMQ 4 node a developer runs from
# /opt/rabbitmq4-trixie on 5700, nor with the 3.10 clusters of the tests (port base 5680: their
# prometheus ports are 15791-15793). Needs root.
#
# Settings (environment): RABBITKEYS_RABBITMQ4_ROOT (default /opt/rabbitkeys-rabbitmq4-trixie),
# RABBITKEYS_RABBITMQ4_PORT (AMQP; management, prometheus and distribution follow from it; a
# node of its own, e.g. for a benchmark), RABBITKEYS_RABBITMQ4_EXTRA_CONF (rabbitmq.conf lines
# added to that node's config when it starts, e.g. the memory watermark of the 100,000-key
# run: docs/benchmarks.md).
set -euo pipefail
ROOT=${RABBITKEYS_RABBITMQ4_ROOT:-/opt/rabbitkeys-rabbitmq4-trixie}
AMQP=${RABBITKEYS_RABBITMQ4_PORT:-5710}
MANAGEMENT=$((AMQP + 10000))
PROMETHEUS=$((AMQP + 10001))
DIST=$((AMQP + 20000))
NODE=rk4-$AMQP@localhost
DATA=/var/lib/rabbitmq/mnesia/$NODE # inside the root
LOGS=/var/log/rabbitmq
# rabbitmqctl's own distribution port: not the range (35672-35682) every other rabbitmqctl uses
CTL_ENV="RABBITMQ_CTL_DIST_PORT_MIN=$((AMQP + 30300)) RABBITMQ_CTL_DIST_PORT_MAX=$((AMQP + 30310))"

inroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq \
  LANG=C.UTF-8 LC_ALL=C.UTF-8 /bin/sh -c "$1"; }
as_rabbitmq() { inroot "runuser -u rabbitmq -- /bin/sh -c '$1'"; }
ctl() { as_rabbitmq "$CTL_ENV RABBITMQ_CONF_ENV_FILE=/etc/rabbitmq/rabbitmq-env-$AMQP.conf rabbitmqctl -n $NODE $*"; }

make_root() {
  if [ ! -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
    command -v debootstrap >/dev/null || {
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    }
    echo "making the Debian 13 root for RabbitMQ 4 in $ROOT (debootstrap, once)"
    rm -rf "$ROOT.partial"
    # the default mirror: Debian's package registry; into a side directory, so that an
    # interrupted run leaves no half root that looks whole
    debootstrap --variant=minbase --include=rabbitmq-server,procps trixie "$ROOT.partial" \
      >"/tmp/rabbitkeys-debootstrap.log" 2>&1 ||
      { tail -20 /tmp/rabbitkeys-debootstrap.log >&2; exit 1; }
    rm -rf "$ROOT" && mv "$ROOT.partial" "$ROOT"
    # the package started nothing (no init in a chroot), but leave no default node config
    rm -f "$ROOT/etc/rabbitmq/rabbitmq-env.conf"
  fi
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
  mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"
}

# pids of this node's VM, from outside the root: the beam.smp started with RABBITMQ_NODENAME=$NODE
node_pids() {
  local file pid
  for file in $(grep -lzx "RABBITMQ_NODENAME=$NODE" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${file#/proc/} && pid=${pid%/environ}
    case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in *beam.smp) echo "$pid" ;; esac
  done
}
answers() { curl -fsS -m 5 -u guest:guest "http://127.0.0.1:$MANAGEMENT/api/overview" >/dev/null 2>&1; }

write_config() {
  cat >"$ROOT/etc/rabbitmq/rabbitmq-$AMQP.conf" <<CONF
listeners.tcp.default = $AMQP
management.tcp.port = $MANAGEMENT
prometheus.tcp.port = $PROMETHEUS
loopback_users = none
deprecated_features.permit.global_qos = false
deprecated_features.permit.transient_nonexcl_queues = false
${RABBITKEYS_RABBITMQ4_EXTRA_CONF:-}
CONF
  cat >"$ROOT/etc/rabbitmq/rabbitmq-env-$AMQP.conf" <<ENV
NODENAME=$NODE
USE_LONGNAME=false
DIST_PORT=$DIST
CONFIG_FILE=/etc/rabbitmq/rabbitmq-$AMQP.conf
ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins-$AMQP
ENV
  echo "[rabbitmq_management,rabbitmq_event_exchange,rabbitmq_consistent_hash_exchange,rabbitmq_prometheus]." \
    >"$ROOT/etc/rabbitmq/enabled_plugins-$AMQP"
  inroot "mkdir -p /var/lib/rabbitmq/mnesia $LOGS &&
    chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq"
}

launch() {
  # the machine's broker needed 20,000 open files for many queues (one per key); so may this
  # (raised as root, up to the hard limit where 65536 is refused; setpriv, not runuser, whose
  # PAM session sets the soft limit back to 1024)
  inroot "ulimit -n 65536 2>/dev/null || ulimit -n \$(ulimit -Hn)
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env $CTL_ENV \
    RABBITMQ_CONF_ENV_FILE=/etc/rabbitmq/rabbitmq-env-$AMQP.conf RABBITMQ_NODENAME=$NODE \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached"
  for _ in $(seq 1 120); do
    answers && return 0
    [ -n "$(node_pids)" ] || sleep 2 # -detached returns before the VM shows; then give up
    [ -n "$(node_pids)" ] || return 1
    sleep 1
  done
  return 1
}

stop_node() {
  [ -n "$(node_pids)" ] || return 0
  ctl shutdown >/dev/null 2>&1 || true
  for _ in $(seq 1 20); do [ -n "$(node_pids)" ] || return 0; sleep 0.5; done
  echo "$NODE did not stop: SIGKILL" >&2
  node_pids | xargs -r kill -9
  sleep 1
}

khepri_on() {
  ctl -q list_feature_flags name state --formatter json 2>/dev/null |
    tr -d ' \n' | grep -q '"name":"khepri_db","state":"enabled"'
}

up() {
  make_root
  if answers; then
    echo "RabbitMQ 4 ($NODE) already up: amqp://guest:guest@localhost:$AMQP/"
  else
    # a VM that runs but does not answer is a leftover of a killed run (or hung): replaced
    stop_node
    write_config
    if ! launch; then
      # a data directory a killed node left unusable: the node starts again on a fresh one
      # (the tests keep nothing in it between sessions)
      echo "RabbitMQ 4 did not start on its data; starting it on a fresh data directory:" >&2
      tail -15 "$ROOT$LOGS/$NODE.log" >&2 2>/dev/null || true
      stop_node
      rm -rf "$ROOT$DATA" "$ROOT$DATA-plugins-expand" "$ROOT$DATA-feature_flags"
      launch || {
        tail -30 "$ROOT$LOGS/$NODE.log" >&2 2>/dev/null || true
        echo "RabbitMQ 4 did not start: see $ROOT$LOGS" >&2
        exit 1
      }
    fi
    echo "RabbitMQ 4 ($NODE) up: amqp://guest:guest@localhost:$AMQP/"
  fi
  if ! khepri_on; then
    echo "enabling Khepri (feature flag khepri_db) on $NODE"
    ctl enable_feature_flag --opt-in khepri_db >/dev/null
    khepri_on || { echo "khepri_db did not become enabled" >&2; exit 1; }
  fi
}

case "${1:-}" in
  up) up ;;
  down) if [ -d "$ROOT/usr/lib/rabbitmq" ]; then stop_node; fi ;;
  ctl) shift; make_root; ctl "$@" ;;
  root) make_root ;;
  *) echo "usage: $0 up|down|ctl ARGS|root" >&2; exit 2 ;;
esac

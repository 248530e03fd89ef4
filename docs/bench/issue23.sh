#!/usr/bin/env bash
# Issue 23: RabbitMQ 4.0.5 with Mnesia and with Khepri (and 3.10.8), durable and transient
# messages. Runs alternate brokers (A, B, C, A, B, C, ...) in one go, so that a shared machine's
# load falls on all of them alike; each run makes a vhost of its own and deletes it.
#
#   [ROUNDS="1 2 3"] docs/bench/issue23.sh probe|churn|durable OUTDIR
#
# Brokers: 4.0.5 Mnesia on 5700 (management 15700), 4.0.5 Khepri on 5710 (15710, the CI node of
# .ci/rabbitmq4.sh), 3.10.8 on 5672 (15672); guest/guest. Summarised in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
phase=$1 out=$2
mkdir -p "$out"
declare -A AMQP=([m]=5700 [k]=5710 [o]=5672) MGMT=([m]=15700 [k]=15710 [o]=15672)
env_for() { echo "RABBITKEYS_AMQP_URL=amqp://guest:guest@localhost:${AMQP[$1]}/" \
  "RABBITKEYS_MANAGEMENT_URL=http://guest:guest@localhost:${MGMT[$1]}/"; }
for round in ${ROUNDS:-1 2 3}; do
  case $phase in
  probe) # what a new key costs the broker, no rabbitkeys: 2,000 durable keys over 16 lanes
    for b in m k o; do
      timeout 180 python docs/probes/new_key_cost.py 2000 \
        --amqp-url "amqp://guest:guest@localhost:${AMQP[$b]}/" \
        --management-url "http://localhost:${MGMT[$b]}" >"$out/probe_${b}_$round.txt" 2>&1
    done ;;
  churn) # rabbitkeys' churn: 1,000 new keys as fast as confirmed, then 200 more at 50/s
    for b in m k o; do
      env $(env_for $b) timeout 240 rabbitkeys bench --strategies rabbitkeys --workloads churn \
        --churn-messages 1000 --paced-messages 2000 --rate 50 >"$out/churn_${b}_$round.txt" 2>&1
    done ;;
  durable) # bursts: 400 keys x 10 (after one warm-up job per key), durable against transient
    for b in m o; do for d in true false; do
      t=() && [ $d = false ] && t=(--transient)
      env $(env_for $b) RABBITKEYS_DURABLE=$d timeout 240 rabbitkeys bench --strategies rabbitkeys \
        --workloads bursts --messages 4000 --paced-messages 200 "${t[@]}" \
        >"$out/durable_${b}_${d}_$round.txt" 2>&1
    done; done ;;
  esac
done

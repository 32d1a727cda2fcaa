#!/usr/bin/env bash
# Runs the trainer as N local CPU processes that form one JAX job (gloo collectives), for testing
# multi-host code on one machine:
#
#   launch/local_multihost.sh N --config=configs/tiny_cpu.py --workdir=/tmp/mh [--config.x=y ...]
#
# DEVICES_PER_PROCESS (default 1) simulated devices per process; PORT (default random) for the
# coordinator; PYTHON (default python3) the interpreter. Exits non-zero if any process fails.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [train flags...]" >&2
  exit 2
fi
n=$1
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES_PER_PROCESS:-1}
python=${PYTHON:-python3}
pids=()
# shellcheck disable=SC2329  # called by the trap below
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "$python" -m llama4_jax.train --coordinator_address="localhost:${port}" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || rc=$?
done
exit "$rc"

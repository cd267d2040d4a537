#!/usr/bin/env bash
# N training processes on this machine (CPU, gloo collectives): the multi-controller code path of a
# pod, for testing. Every process runs the same command; process 0 logs and writes summaries.
#
#   bash launch/local_multiprocess.sh 2 2 --config configs/ta_moe.py --config.mesh.data=2 --config.mesh.expert=2
#     (2 processes x 2 CPU devices each; the remaining arguments go to python -m unijax.train)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS TRAIN_ARGS...}
NDEV=${2:?usage: local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS TRAIN_ARGS...}
shift 2
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${NDEV}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="${NPROC}" JAX_PROCESS_ID="${i}" \
    python -m unijax.train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status

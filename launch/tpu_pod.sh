#!/usr/bin/env bash
# Every worker of a TPU VM pod runs the same training command through the cloud CLI's ssh-to-all-
# workers; JAX detects the pod from the TPU VM environment (TPU_WORKER_HOSTNAMES), so no addresses
# are passed. The repository and its environment must exist on every worker (same path), and
# workdir / init_from on a filesystem every worker mounts (local paths; object-store URLs are not supported yet).
#
#   TPU=my-v5p-128 ZONE=us-east5-a bash launch/tpu_pod.sh --config configs/stage2.py:janus_pro_7b \
#       --config.init_from=/mnt/shared/upcycled_7b --config.mesh.data=8 --config.mesh.fsdp=8 \
#       --config.workdir=/mnt/shared/runs/stage2_7b
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
REPO_DIR=${REPO_DIR:-\$HOME/unijax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd ${REPO_DIR} && UNIJAX_DISTRIBUTED=1 python -m unijax.train${ARGS}"

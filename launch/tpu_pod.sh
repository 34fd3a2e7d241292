#!/usr/bin/env bash
# Run one jharm command on every worker of an existing TPU VM (pod slice).
# Creates nothing: the TPU VM, its disks and a checkout of jharm at the same
# path on every worker must already exist (and workdir should be shared
# storage, e.g. a gs:// bucket via gcsfuse, or a per-run NFS mount).
#
# Usage: launch/tpu_pod.sh NAME ZONE [--project=P] -- jharm train --config=... --workdir=...
#
# Each worker runs the same command; config.distributed.enabled=True makes
# jax.distributed.initialize() discover the pod topology (no arguments on TPU).
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE [--project=PROJECT] -- COMMAND..." >&2
  exit 2
fi
name=$1 zone=$2
shift 2
extra=()
while [[ $# -gt 0 && $1 != "--" ]]; do extra+=("$1"); shift; done
if [[ $# -eq 0 ]]; then
  echo "$0: missing '--' before the command" >&2
  exit 2
fi
shift
repo=${JHARM_REMOTE_DIR:-'~/jharm'}
venv=${JHARM_REMOTE_VENV:-"$repo/.venv"}
cmd=$(printf '%q ' "$@")
# --config.distributed.enabled=True is appended so every worker joins the pod.
remote="cd $repo && source $venv/bin/activate && $cmd --config.distributed.enabled=True"
echo "[tpu_pod] $name ($zone), all workers: $remote" >&2
exec gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${extra[@]}" --worker=all --command="$remote"

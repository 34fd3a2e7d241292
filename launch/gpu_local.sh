#!/usr/bin/env bash
# Run jharm on this machine's GPUs.
#
# Usage: launch/gpu_local.sh [-g GPUS] -- jharm train --config=... --workdir=...
#   -g GPUS   comma-separated GPU ids (default: all visible GPUs)
#
# One process drives all local GPUs (JAX is single-controller per host), so a
# multi-GPU run needs no distributed set-up: the mesh spans the visible GPUs
# (e.g. --config.mesh.data=-1 or --config.mesh.fsdp=-1). Multi-node GPU jobs
# use config.distributed (see launch/README.md).
set -euo pipefail

gpus=""
while getopts "g:" opt; do
  case $opt in
    g) gpus=$OPTARG ;;
    *) echo "usage: $0 [-g GPUS] -- COMMAND..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ ${1:-} == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [-g GPUS] -- COMMAND..." >&2
  exit 2
fi
if [[ -n $gpus ]]; then
  export CUDA_VISIBLE_DEVICES=$gpus
fi
# Let XLA take most of the GPU memory up front, as usual for training; keep a
# margin for cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
echo "[gpu_local] CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all}: $*" >&2
exec "$@"

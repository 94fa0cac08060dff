#!/usr/bin/env bash
# Train nativetok_jax on one or several GPU machines, on every GPU of each.
#
# Install first (from the repository root), the tested versions with the CUDA build of jax:
#   python3 -m venv .venv && .venv/bin/pip install -e '.[cuda12]' -c requirements.txt
#   (PYTHON=.venv/bin/python, or activate the venv, for the commands below)
#
# One machine: a single process drives all of its GPUs, nothing else to set.
#   CONFIG=configs/nativetok.py:32 WORKDIR=/data/runs/nt32 launch/multi_gpu.sh
#
# Several machines, started by hand: run the same command on every node, changing only NODE_RANK.
# One process per node drives all of that node's GPUs. COORDINATOR is host:port of node 0,
# reachable from all nodes (any free port).
#   NUM_NODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12345 WORKDIR=/shared/nt32 launch/multi_gpu.sh
#   NUM_NODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:12345 WORKDIR=/shared/nt32 launch/multi_gpu.sh
#
# Under SLURM, jax.distributed finds the other processes from SLURM's environment. Either layout
# uses every GPU:
#   one task per GPU (recommended; each process drives the GPU of its SLURM_LOCALID):
#     srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 env WORKDIR=/shared/nt32 launch/multi_gpu.sh
#   one task per node (the process drives all the node's GPUs):
#     srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 env WORKDIR=/shared/nt32 launch/multi_gpu.sh
# jax's SLURM detection alone would give every process only the GPU numbered SLURM_LOCALID, so a
# one-task-per-node job would train on one GPU per node: this script tells jax the GPUs each
# task owns (JAX_LOCAL_DEVICE_IDS) from the GPUs it sees and the tasks per node, and stops with
# one line when they do not divide evenly. `--gpus-per-task=1` (one visible GPU per task) works too.
#
# Extra arguments are passed to nativetok_jax.main. bfloat16 compute is recommended on GPUs
# with tensor cores (parameters stay float32):
#   launch/multi_gpu.sh --config.model.dtype=bfloat16 --config.train.batch_size=512
#
# Environment: CONFIG [configs/nativetok.py:32] (relative to the repository root), WORKDIR (required),
# NUM_NODES / NODE_RANK / COORDINATOR for a manual multi-node start, PYTHON [python],
# XLA_PYTHON_CLIENT_MEM_FRACTION [0.9].
#
# With several nodes WORKDIR must be a shared file system (or a gs:// path): all processes
# write their part of each checkpoint there. Rerunning the same command resumes training.

set -euo pipefail

CONFIG="${CONFIG:-configs/nativetok.py:32}"
WORKDIR="${WORKDIR:?set WORKDIR to the run directory (shared by all nodes when there are several)}"
PYTHON="${PYTHON:-python}"

# Let XLA preallocate most, but not all, of each GPU's memory; the rest is left for
# cuDNN/NCCL workspaces. Override by exporting a different value.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# Keep a relative local WORKDIR relative to where the script was called from, then run from the
# repository root, where CONFIG's default (configs/...) resolves.
if [[ "$WORKDIR" != /* && "$WORKDIR" != *://* ]]; then
  WORKDIR="$PWD/$WORKDIR"
fi
cd "$(dirname "$0")/.."

# The number of GPUs this process can see: CUDA_VISIBLE_DEVICES when set (SLURM sets it for
# --gpus-per-node / --gpus-per-task), else what nvidia-smi lists.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi --list-gpus | wc -l
  else
    echo 0
  fi
}

# Under SLURM: the local device ids this task drives, as jax.distributed.initialize wants them.
slurm_local_device_ids() {
  local gpus nodes tasks_per_node local_id per_task first
  gpus="$(visible_gpus)"
  nodes="${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}"
  tasks_per_node=$((SLURM_NTASKS / nodes))
  local_id="${SLURM_LOCALID:?SLURM_LOCALID is not set: start the script with srun}"
  if ((gpus == 1)); then
    echo 0  # --gpus-per-task=1: the one visible GPU, whatever SLURM_LOCALID is
    return
  fi
  if ((gpus < 1 || gpus % tasks_per_node != 0)); then
    echo "error: $tasks_per_node SLURM tasks per node cannot share $gpus visible GPUs evenly;" \
      "use --ntasks-per-node=1 or --ntasks-per-node=$gpus" >&2
    return 1
  fi
  per_task=$((gpus / tasks_per_node))
  first=$((local_id * per_task))
  seq -s, "$first" $((first + per_task - 1))
}

args=(--config="$CONFIG" --workdir="$WORKDIR")

if [[ -n "${NUM_NODES:-}" && "${NUM_NODES}" -gt 1 ]]; then
  # Explicit multi-node start: NUM_NODES wins over SLURM when both are set.
  : "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1) on every node}"
  : "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
  args+=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" --process_id="$NODE_RANK")
  # Every visible GPU: inside a SLURM allocation jax would otherwise take only SLURM_LOCALID's.
  gpus="$(visible_gpus)"
  if ((gpus > 0)); then
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
    export JAX_LOCAL_DEVICE_IDS
  fi
elif [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_NTASKS:-}" ]]; then
  # jax.distributed.initialize() reads the coordinator, process count and rank from SLURM's
  # environment, and the local devices from JAX_LOCAL_DEVICE_IDS.
  JAX_LOCAL_DEVICE_IDS="$(slurm_local_device_ids)"
  export JAX_LOCAL_DEVICE_IDS
  args+=(--multihost)
fi
# Otherwise: single node, one process for all local GPUs, no distributed setup needed.

exec "$PYTHON" -m nativetok_jax.main "${args[@]}" "$@"

#!/usr/bin/env bash
# Train nativetok_jax on one or several GPU machines.
#
# Install first (from the repository root):
#   pip install -e . 'jax[cuda12]==0.10.2'
#
# One machine: a single process drives all of its GPUs, nothing else to set.
#   CONFIG=configs/nativetok.py:32 WORKDIR=/data/runs/nt32 launch/multi_gpu.sh
#
# Several machines, started by hand: run the same command on every node, changing only NODE_RANK.
# COORDINATOR is host:port of node 0, reachable from all nodes (any free port).
#   NUM_NODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12345 WORKDIR=/shared/nt32 launch/multi_gpu.sh
#   NUM_NODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:12345 WORKDIR=/shared/nt32 launch/multi_gpu.sh
#
# Under SLURM (one task per node), jax finds the other nodes itself:
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     env WORKDIR=/shared/nt32 launch/multi_gpu.sh
#
# Extra arguments are passed to nativetok_jax.main. bfloat16 compute is recommended on GPUs
# with tensor cores (parameters stay float32):
#   launch/multi_gpu.sh --config.model.dtype=bfloat16 --config.train.batch_size=512
#
# Environment: CONFIG [configs/nativetok.py:32] (relative to the repository root), WORKDIR (required),
# NUM_NODES / NODE_RANK / COORDINATOR for a manual multi-node start, XLA_PYTHON_CLIENT_MEM_FRACTION [0.9].
#
# With several nodes WORKDIR must be a shared file system (or a gs:// path): all processes
# write their part of each checkpoint there. Rerunning the same command resumes training.

set -euo pipefail

CONFIG="${CONFIG:-configs/nativetok.py:32}"
WORKDIR="${WORKDIR:?set WORKDIR to the run directory (shared by all nodes when there are several)}"

# Let XLA preallocate most, but not all, of each GPU's memory; the rest is left for
# cuDNN/NCCL workspaces. Override by exporting a different value.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# Keep a relative local WORKDIR relative to where the script was called from, then run from the
# repository root, where CONFIG's default (configs/...) resolves.
if [[ "$WORKDIR" != /* && "$WORKDIR" != *://* ]]; then
  WORKDIR="$PWD/$WORKDIR"
fi
cd "$(dirname "$0")/.."

args=(--config="$CONFIG" --workdir="$WORKDIR")

if [[ -n "${NUM_NODES:-}" && "${NUM_NODES}" -gt 1 ]]; then
  # Explicit multi-node start: NUM_NODES wins over SLURM when both are set.
  : "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1) on every node}"
  : "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
  args+=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" --process_id="$NODE_RANK")
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # jax.distributed.initialize() reads the node list and ranks from SLURM's environment.
  args+=(--multihost)
fi
# Otherwise: single node, one process for all local GPUs, no distributed setup needed.

exec python -m nativetok_jax.main "${args[@]}" "$@"

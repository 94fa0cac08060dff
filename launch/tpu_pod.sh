#!/usr/bin/env bash
# Train nativetok_jax on a Cloud TPU VM pod slice (several hosts, one process per host).
#
# Usage (run from anywhere inside a checkout of this repository, with gcloud authenticated):
#
#   launch/tpu_pod.sh create              # create the TPU VM slice
#   launch/tpu_pod.sh setup               # copy this checkout (git HEAD) to every worker, install it
#   launch/tpu_pod.sh train [FLAGS...]    # start training on all workers at once
#   launch/tpu_pod.sh delete              # delete the slice (stops billing)
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME          name of the slice                     [nativetok-pod]
#   ZONE              Cloud zone                            [us-west4-a]
#   ACCELERATOR_TYPE  slice type                            [v5litepod-16]
#   RUNTIME_VERSION   TPU VM software version               [v2-alpha-tpuv5-lite]
#   PROJECT           Cloud project (gcloud default if empty)
#   CONFIG            training config                       [configs/nativetok.py:32]
#   WORKDIR           checkpoints, logs, images             [required for train]
#   REMOTE_DIR        where the code lives on the workers   [~/nativetok_jax]
#
# WORKDIR should be a gs:// path (e.g. gs://my-bucket/nativetok32): every worker writes its
# shard of each checkpoint there and reads the same checkpoints when resuming, so it must be
# storage that all hosts share. The TPU VM's service account needs write access to the bucket.
#
# Extra arguments to `train` are passed to nativetok_jax.main, e.g.
#
#   CONFIG=configs/nativetok.py:64 WORKDIR=gs://my-bucket/nt64 launch/tpu_pod.sh train \
#       --config.train.batch_size=512 --config.mesh.fsdp=8 \
#       --config.data.source=tfds --config.data.tfds_name=imagenet2012 \
#       --config.data.tfds_data_dir=gs://my-bucket/tensorflow_datasets
#
# Running `train` again with the same WORKDIR resumes from the newest checkpoint. `train` stays
# attached to the workers and the run stops if the ssh sessions drop, so start it from tmux/screen.
# Note: the code is copied from git HEAD, so commit local changes before `setup`.

set -euo pipefail

TPU_NAME="${TPU_NAME:-nativetok-pod}"
ZONE="${ZONE:-us-west4-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/nativetok.py:32}"
WORKDIR="${WORKDIR:-}"
REMOTE_DIR="${REMOTE_DIR:-~/nativetok_jax}"
JAX_VERSION="0.10.2"

usage() {
  echo "usage: $0 {create|setup|train|delete} [extra flags for train]" >&2
  echo "see the comment at the top of $0 for the environment variables" >&2
  exit 2
}

# Flags shared by every `gcloud compute tpus tpu-vm` call.
common_flags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  common_flags+=(--project="$PROJECT")
fi

# Runs one shell command on every worker of the slice, in parallel.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common_flags[@]}" --worker=all --command="$1"
}

create() {
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${common_flags[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION"
}

setup() {
  local repo_root staging tarball
  repo_root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
  staging="$(mktemp -d)"
  tarball="$staging/nativetok_jax.tar.gz"
  # git archive ships exactly the committed tree: no virtualenvs, caches or local workdirs.
  git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":~/nativetok_jax.tar.gz \
    "${common_flags[@]}" --worker=all
  rm -rf "$staging"
  # Unpack into a fresh directory so files deleted since the last setup do not linger.
  on_all_workers "set -e
    rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR
    tar -xzf ~/nativetok_jax.tar.gz -C $REMOTE_DIR
    cd $REMOTE_DIR
    python3 -m pip install -q --upgrade pip
    python3 -m pip install -q -e . 'jax[tpu]==$JAX_VERSION'"
}

train() {
  if [[ -z "$WORKDIR" ]]; then
    echo "error: set WORKDIR (a gs:// path that all workers share)" >&2
    exit 2
  fi
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "warning: WORKDIR=$WORKDIR is not a gs:// path; each worker will write to its own disk" >&2
  fi
  # Quote the forwarded flags so they survive the trip through the remote shell.
  local extra=""
  if (($# > 0)); then
    extra="$(printf ' %q' "$@")"
  fi
  # --multihost lets jax.distributed.initialize() discover the other workers by itself;
  # every worker must run the same command at the same time, which --worker=all does.
  local flags
  flags="--multihost --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$extra"
  on_all_workers "cd $REMOTE_DIR && python3 -m nativetok_jax.main $flags"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common_flags[@]}" --quiet
}

(($# >= 1)) || usage
subcommand="$1"
shift
case "$subcommand" in
  create) create ;;
  setup) setup ;;
  train) train "$@" ;;
  delete) delete ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# Train nativetok_jax on a Cloud TPU VM pod slice (several hosts, one process per host).
#
# Usage (run from anywhere inside a checkout of this repository, with gcloud authenticated):
#
#   launch/tpu_pod.sh create              # create the TPU VM slice
#   launch/tpu_pod.sh setup               # copy this checkout (git HEAD) to every worker, install it in a venv
#   launch/tpu_pod.sh train [FLAGS...]    # start training on all workers at once, one log per worker
#   launch/tpu_pod.sh stop                # stop training on every worker, free the TPUs
#   launch/tpu_pod.sh delete              # delete the slice (stops billing)
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME          name of the slice                     [nativetok-pod]
#   ZONE              Cloud zone                            [us-west4-a]
#   ACCELERATOR_TYPE  slice type                            [v5litepod-16]
#   RUNTIME_VERSION   TPU VM software version               [v2-alpha-tpuv5-lite]
#   PROJECT           Cloud project (gcloud default if empty)
#   CONFIG            training config                       [configs/nativetok.py:32]
#   WORKDIR           checkpoints, logs, images: gs://...   [required for train]
#   REMOTE_DIR        where the code lives on the workers   [~/nativetok_jax]
#   NUM_WORKERS       hosts in the slice                    [read from gcloud describe]
#   LOG_DIR           per-worker logs on this machine       [./tpu_logs/TPU_NAME-YYYYmmdd-HHMMSS]
#   PREFLIGHT         compile first, here (1) or not (0)    [1]
#   TOPOLOGY          the slice's topology for it           [from ACCELERATOR_TYPE: v5litepod-16 -> v5e:4x4]
#   PYTHON            the local Python with this package and libtpu   [python3]
#
# Pre-flight: `create` and `train` first compile CONFIG's train step (with train's --config.*
# flags) for the slice's topology on THIS machine (`python -m nativetok_jax.bench compile
# --require_fit`; libtpu compiles for TPUs without one: pip install -e '.[tpu]' -c requirements.txt)
# and refuse, in one line and before any TPU VM is touched, a config that does not fit in the
# chips' HBM. It takes minutes for a paper-scale config; PREFLIGHT=0 skips it.
#
# `setup` creates a virtual environment on every worker (REMOTE_DIR/.venv; the image's system
# Python stays untouched) and installs the package with its [tpu] and [gcs] extras at the tested
# versions of requirements.txt. Run it again after committing changes: the code is copied from
# git HEAD into a fresh directory.
#
# WORKDIR must be a gs:// path (e.g. gs://my-bucket/nativetok32): every worker writes its shard
# of each checkpoint there and reads the same checkpoints when resuming, so it must be storage
# that all hosts share. The TPU VM's service account needs write access to the bucket.
#
# Extra arguments to `train` are passed to nativetok_jax.main, e.g.
#
#   CONFIG=configs/nativetok.py:64 WORKDIR=gs://my-bucket/nt64 launch/tpu_pod.sh train \
#       --config.train.batch_size=512 --config.mesh.fsdp=8 \
#       --config.data.source=tfds --config.data.tfds_name=imagenet2012 \
#       --config.data.tfds_data_dir=gs://my-bucket/tensorflow_datasets
#
# Before starting, `train` frees each worker's TPU: it ends processes still holding the TPU
# devices (a crashed or interrupted earlier run) and removes libtpu's stale lock file, which
# otherwise make the new run fail with "TPU in use". It then runs one ssh session per worker, each
# logging to LOG_DIR/worker-N.log; when any worker fails, the others are stopped at once (a pod
# whose one host died would otherwise hang in its next collective) and the failed worker's log
# tail is printed. Running `train` again with the same WORKDIR resumes from the newest checkpoint.
# `train` stays attached to the workers, so start it from tmux/screen.

set -euo pipefail

TPU_NAME="${TPU_NAME:-nativetok-pod}"
ZONE="${ZONE:-us-west4-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/nativetok.py:32}"
WORKDIR="${WORKDIR:-}"
REMOTE_DIR="${REMOTE_DIR:-~/nativetok_jax}"
NUM_WORKERS="${NUM_WORKERS:-}"
LOG_DIR="${LOG_DIR:-$PWD/tpu_logs/$TPU_NAME-$(date +%Y%m%d-%H%M%S)}"
PREFLIGHT="${PREFLIGHT:-1}"
TOPOLOGY="${TOPOLOGY:-}"
PYTHON="${PYTHON:-python3}"

usage() {
  echo "usage: $0 {create|setup|train|stop|delete} [extra flags for train]" >&2
  echo "see the comment at the top of $0 for the environment variables" >&2
  exit 2
}

# Flags shared by every `gcloud compute tpus tpu-vm` call.
common_flags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  common_flags+=(--project="$PROJECT")
fi

# Runs one shell command on one worker (a number) or on all of them ("all", in parallel).
on_worker() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common_flags[@]}" --worker="$1" --command="$2"
}

# Ends whatever still holds this worker's TPU (an earlier run that crashed or was cut off) and
# removes libtpu's lock file; safe when nothing is running.
FREE_TPU='pids="$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u || true)"
if [ -n "$pids" ]; then echo "ending processes holding the TPU: $pids"; sudo kill -9 $pids || true; fi
sudo rm -f /tmp/libtpu_lockfile'

# Compiles CONFIG's train step (train's --config.FIELD=VALUE flags applied) for the slice's
# topology here, and stops the script when it does not fit (the compile command's one line).
preflight() {
  [[ "$PREFLIGHT" == 1 ]] || return 0
  local repo_root arg sets=() where=(--accelerator_type "$ACCELERATOR_TYPE")
  repo_root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
  for arg in "$@"; do
    case "$arg" in --config.*=*) sets+=(--set "${arg#--config.}") ;; esac
  done
  if [[ -n "$TOPOLOGY" ]]; then
    where=(--topology "$TOPOLOGY")
  fi
  mkdir -p "$LOG_DIR"
  echo "pre-flight: compiling $CONFIG for $ACCELERATOR_TYPE on this machine (PREFLIGHT=0 skips)" >&2
  if ! (cd "$repo_root" && "$PYTHON" -m nativetok_jax.bench compile --configs "$CONFIG" "${where[@]}" \
      --require_fit --out "$LOG_DIR/preflight.json" ${sets[@]+"${sets[@]}"} >"$LOG_DIR/preflight.log"); then
    exit 1
  fi
  tail -n 2 "$LOG_DIR/preflight.log" >&2
}

create() {
  preflight
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
  # A fresh directory (files deleted since the last setup do not linger) with its own venv.
  on_worker all "set -e
    rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR
    tar -xzf ~/nativetok_jax.tar.gz -C $REMOTE_DIR
    cd $REMOTE_DIR
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[tpu,gcs]' -c requirements.txt"
}

# The number of hosts in the slice: one network endpoint each.
worker_count() {
  if [[ -n "$NUM_WORKERS" ]]; then
    echo "$NUM_WORKERS"
    return
  fi
  local endpoints
  endpoints="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${common_flags[@]}" \
    --format='value(networkEndpoints[].ipAddress)')"
  tr ';' '\n' <<<"$endpoints" | grep -c .
}

stop() {
  on_worker all "$FREE_TPU"
}

train() {
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "error: WORKDIR must be a gs:// path that all workers share (got '${WORKDIR}')" >&2
    exit 2
  fi
  preflight "$@"
  local count extra="" flags remote worker failed="" status
  count="$(worker_count)"
  # Quote the forwarded flags so they survive the trip through the remote shell.
  if (($# > 0)); then
    extra="$(printf ' %q' "$@")"
  fi
  # --multihost lets jax.distributed.initialize() discover the other workers by itself;
  # every worker must run the same command at the same time.
  flags="--multihost --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$extra"
  remote="$FREE_TPU
cd $REMOTE_DIR && exec .venv/bin/python -m nativetok_jax.main $flags"
  mkdir -p "$LOG_DIR"
  echo "training on $count workers of $TPU_NAME; logs in $LOG_DIR/worker-N.log" >&2
  local pids=()
  for ((worker = 0; worker < count; worker++)); do
    # gcloud itself in the background (not a function's subshell), so that `kill` reaches it.
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common_flags[@]}" --worker="$worker" --command="$remote" \
      >"$LOG_DIR/worker-$worker.log" 2>&1 &
    pids+=("$!")
  done
  # Poll (portable to the bash 3.2 of macOS, which has no `wait -n`): the first worker to fail
  # stops the others; the run succeeds when all finish cleanly.
  local running=$count
  while ((running > 0)) && [[ -z "$failed" ]]; do
    sleep 1
    running=0
    for ((worker = 0; worker < count; worker++)); do
      [[ -n "${pids[worker]}" ]] || continue
      if kill -0 "${pids[worker]}" 2>/dev/null; then
        running=$((running + 1))
        continue
      fi
      status=0
      wait "${pids[worker]}" || status=$?
      pids[worker]=""
      if ((status != 0)); then
        failed="$worker"
        echo "error: worker $worker failed (exit $status); stopping the other workers. Its log ends:" >&2
        tail -n 20 "$LOG_DIR/worker-$worker.log" >&2
        break
      fi
    done
  done
  if [[ -n "$failed" ]]; then
    for pid in "${pids[@]}"; do
      [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    done
    stop >"$LOG_DIR/stop.log" 2>&1 || echo "warning: could not reach every worker to stop it; see $LOG_DIR/stop.log" >&2
    wait || true
    echo "error: training stopped because worker $failed failed; logs in $LOG_DIR" >&2
    exit 1
  fi
  echo "training finished on all $count workers; logs in $LOG_DIR" >&2
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
  stop) stop ;;
  delete) delete ;;
  *) usage ;;
esac

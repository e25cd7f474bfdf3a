#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods): one process per TPU VM host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/stage1.py --workdir gs://bucket/runs/s1 [--config.x=y ...]
#   PROJECT=my-proj REPO_DIR=anim_jax launch/tpu_pod.sh my-v5p-64 us-east5-a --config configs/stage2.py --workdir gs://b/s2
#
# Runs `anim-jax train ARGS` on all workers at once (gcloud ... ssh --worker=all). Nothing else is
# needed for the cluster: anim_jax.train.distributed.maybe_initialize_distributed() sees a TPU VM
# and lets jax.distributed find the slice's workers through the VM metadata server.
# --workdir must be visible from every worker (a gs:// bucket, or a shared file system): each
# worker writes the checkpoint shards it holds. Preemption/maintenance SIGTERMs reach every worker;
# they agree on a step, save and exit with code 75, and a rerun of this command resumes from that
# checkpoint (a queued-resource wrapper should rerun on 75; 0 means finished, 3 diverged).
#
# Environment:
#   PROJECT    gcloud project (default: gcloud's configured one)
#   REPO_DIR   checkout of this repository on the workers, relative to $HOME or absolute
#              (default anim_jax); its virtual environment in $REPO_DIR/${VENV:-.venv}.
#              Set up every worker once, e.g.:
#              gcloud compute tpus tpu-vm ssh TPU --zone Z --worker=all --command \
#                "git clone URL anim_jax && cd anim_jax && python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]'"
#   LIBTPU_INIT_ARGS  XLA TPU flags forwarded to the workers when set (e.g. the async collective
#              fusion flags that overlap FSDP all-gathers with compute).
#   ANIM_JAX_CMD      command to run instead of "anim-jax" (e.g. "python -m anim_jax.cli").
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [anim-jax train arguments...]" >&2
  exit 2
fi
tpu="$1" zone="$2"
shift 2

remote_env="JAX_PLATFORMS=tpu"
if [[ -n "${LIBTPU_INIT_ARGS:-}" ]]; then
  remote_env+=" LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS")"
fi
train_args=$(printf ' %q' "$@")
remote="cd ${REPO_DIR:-anim_jax} && source ${VENV:-.venv}/bin/activate && env $remote_env ${ANIM_JAX_CMD:-anim-jax} train$train_args"

gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
if [[ -n "${PROJECT:-}" ]]; then gcloud_args+=(--project "$PROJECT"); fi
exec gcloud "${gcloud_args[@]}"

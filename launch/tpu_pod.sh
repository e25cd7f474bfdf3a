#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods): one process per TPU VM host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/stage1.py --workdir gs://bucket/runs/s1 [--config.x=y ...]
#   PROJECT=my-proj REPO_DIR=anim_jax launch/tpu_pod.sh my-v5p-64 us-east5-a --config configs/stage2.py --workdir gs://b/s2
#
# Runs `anim-jax train ARGS` on all workers at once (gcloud ... ssh --worker=all). Nothing else is
# needed for the cluster: anim_jax.train.distributed.maybe_initialize_distributed() sees a TPU VM
# and lets jax.distributed find the slice's workers through the VM metadata server.
# Workers share no disk, so data, work directory and weights live in a Cloud Storage bucket; every
# anim-jax path may be gs://. The flow end to end (BUCKET in the slice's region):
#   anim-jax prepare gs://BUCKET/videos -o gs://BUCKET/data/ubc          # once, on any machine
#   launch/tpu_pod.sh TPU ZONE --config configs/stage1.py --workdir gs://BUCKET/runs/s1 \
#       --config.data.dataset=gs://BUCKET/data/ubc --config.init.weights_dir=gs://BUCKET/weights/sd15_init
#   launch/tpu_pod.sh TPU ZONE --config configs/stage2.py --workdir gs://BUCKET/runs/s2 \
#       --config.data.dataset=gs://BUCKET/data/ubc --config.init.weights_dir=gs://BUCKET/runs/s1/export
#   anim-jax animate --weights gs://BUCKET/runs/s2/export --reference ref.png --pose pose.mp4 --out gs://BUCKET/out.mp4
# Each worker reads its own share of the dataset's ArrayRecord shards straight from the bucket and
# writes the checkpoint shards it holds (Orbax, through TensorStore); process 0 alone writes the
# config copy, logs, validation videos and the export. Credentials are the VMs' service account
# (Application Default Credentials): it needs read/write access to the bucket; nothing is stored.
# Preemption/maintenance SIGTERMs reach every worker; they agree on a step, save and exit with code
# 75, and a rerun of this same command resumes from that checkpoint in the bucket (only checkpoints
# with Orbax's commit marker count; a queued-resource wrapper should rerun on 75; 0 means finished,
# 3 diverged).
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

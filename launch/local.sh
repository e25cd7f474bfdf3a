#!/usr/bin/env bash
# Train on this machine: one process (default), or N processes on localhost forming one JAX
# cluster (one per GPU, or N CPU processes to rehearse a multi-host run).
#
#   launch/local.sh --config configs/stage1.py --workdir runs/s1 [--config.optimizer.lr=2e-5 ...]
#   launch/local.sh -n 2 --per-gpu --config configs/stage2.py --workdir runs/s2
#   launch/local.sh -n 2 --cpu-devices 4 --config configs/stage1.py:tiny --workdir /tmp/s1
#
# Leading launcher options (the remaining arguments go to `anim-jax train` unchanged):
#   -n N             number of processes (default 1). With N > 1 every process gets
#                    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i,
#                    read by anim_jax.train.distributed.maybe_initialize_distributed().
#   --port P         coordinator port (default 12355); the coordinator binds to 127.0.0.1 only.
#   --per-gpu        process i drives only local GPU i (JAX_LOCAL_DEVICE_IDS=i).
#   --cpu-devices K  CPU only, K fake devices per process (XLA_FLAGS, JAX_PLATFORMS=cpu); processes
#                    exchange collectives through gloo.
# Environment: ANIM_JAX_CMD (default "anim-jax"), VENV (default .venv, activated when present),
# LOG_DIR (default $TMPDIR or /tmp). Process 0 prints to the terminal, process i > 0 to
# $LOG_DIR/anim_jax_proc<i>.log. Ctrl-C (SIGINT) reaches
# every process: each finishes its current step, saves a checkpoint and exits with code 75
# (rerun the same command to resume); 0 means finished, 3 diverged.
set -euo pipefail

num=1 port=12355 per_gpu=0 cpu_devices=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) num="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [[ -f "$VENV/bin/activate" ]]; then source "$VENV/bin/activate"; fi
read -r -a launcher <<< "${ANIM_JAX_CMD:-anim-jax}"
cmd=("${launcher[@]}" train "$@")

if [[ "$cpu_devices" -gt 0 ]]; then
  export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
  export XLA_FLAGS="--xla_force_host_platform_device_count=$cpu_devices ${XLA_FLAGS:-}"
fi
if [[ "$num" -eq 1 ]]; then
  exec "${cmd[@]}"
fi

export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$port"
export JAX_NUM_PROCESSES="$num"
log_dir="${LOG_DIR:-${TMPDIR:-/tmp}}"
pids=()
trap 'kill -INT "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = num - 1; i >= 0; i--)); do
  local_ids=""
  if [[ "$per_gpu" == 1 ]]; then local_ids="$i"; fi
  if [[ "$i" -gt 0 ]]; then
    JAX_PROCESS_ID=$i JAX_LOCAL_DEVICE_IDS="$local_ids" "${cmd[@]}" > "$log_dir/anim_jax_proc$i.log" 2>&1 &
  else
    JAX_PROCESS_ID=0 JAX_LOCAL_DEVICE_IDS="$local_ids" "${cmd[@]}" &
  fi
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  rc=0; wait "$p" || rc=$?
  while kill -0 "$p" 2>/dev/null; do rc=0; wait "$p" || rc=$?; done  # woken by the trap: wait on
  if [[ "$rc" -ne 0 ]]; then status=$rc; fi
done
exit "$status"

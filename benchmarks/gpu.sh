#!/usr/bin/env bash
# Every GPU measurement of issue 19 in one run of under 8 minutes, results to $OUT.
#
#   bash benchmarks/gpu.sh              # on the GPU machine (SD1.5 size, bf16 / Moore in fp16)
#   bash benchmarks/gpu.sh --reduced    # rehearsal of every part on a CPU at reduced size
#   PARTS="moore train1" bash benchmarks/gpu.sh   # only the parts named
#
# Parts, in order of importance; each runs under `timeout` and is skipped when less time is left than it
# needs, so the whole run ends inside the budget and a slow part cannot starve the summary:
#   1. ours     anim_jax inference, attention "auto" (cuDNN for long keys in bf16): 24 frames 512x768,
#               25 DDIM steps, guidance 3.5 (benchmarks/animate.py): compile, video and loop time, peak
#               GPU memory, MFU (FLOPs per step counted before on a CPU host: STEP_TFLOP below).
#   2. moore    Moore-AnimateAnyone's Pose2VideoPipeline, same work, fp16, its defaults otherwise (SDPA
#               attention, context windows one at a time), random SD1.5-size weights
#               (benchmarks/moore_side_by_side.py --worker moore).
#   3. train1   stage-1 train step at 768x768, batch 4, and
#   4. train2   stage-2 train step at 512x512 x 24 frames, batch 1 (benchmarks/train.py --full; FLOPs
#               from benchmarks/gpu_train_counts.jsonl, counted on a CPU host).
#   5. pose     the whole DWPose extractor, batch 32, fp32 and bf16 (benchmarks/pose_extractor.py;
#               issue 13's >= 200 frames/s), and the two networks alone (benchmarks/pose.py --jax-only).
#   6. ours_alt the alternative attention policy, cuDNN for every bf16 attention, if time is left.
#
# Needs (GPU run): the GPU image's python3 with jax[cuda], flax, optax, torch; and, carried as ignored
# paths, $CARRY/moore (a Moore-AnimateAnyone checkout: src/ and configs/inference/) and
# $CARRY/wheels (diffusers 0.24.0, transformers 4.30.2, huggingface_hub 0.25.2: pure-Python wheels,
# installed into a private folder for the Moore process only). benchmarks/gpu_prepare.sh makes
# $CARRY from a local checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
REDUCED=0
[[ "${1:-}" == "--reduced" ]] && REDUCED=1
OUT=${OUT:-$PWD/gpu_out}
CARRY=${CARRY:-.gpu_carry}
BUDGET_S=${BUDGET_S:-420}
PY=${PYTHON:-python3}
# One denoising step (both branches, all windows) at SD1.5 size, 512x768, 24 frames: counted on a CPU
# host by `python benchmarks/animate.py --full` (XLA cost analysis; benchmarks/RESULTS.md).
STEP_TFLOP=${STEP_TFLOP:-90.49}
# $OUT gets three files (the device tool brings back at most 8): gpu_results.json, gpu_results.md and
# logs.tar.gz with every part's log and JSON; the parts write into $OUT/work first.
W=$OUT/work
mkdir -p "$W"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
deadline=$((SECONDS + BUDGET_S))

status_file=$W/parts.tsv
: >"$status_file"
part() {  # part NAME NEEDS_S LIMIT_S command...
  local name=$1 needs=$2 limit=$3
  shift 3
  if [[ -n "${PARTS:-}" && " $PARTS " != *" $name "* ]]; then
    return  # PARTS="moore train1": run only those
  fi
  local left=$((deadline - SECONDS))
  if ((left < needs)); then
    echo "== $name: skipped ($left s left, needs $needs)"
    printf '%s\tskipped\t0\n' "$name" >>"$status_file"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$W/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$status_file"
  echo "   rc $rc in $((SECONDS - t0)) s"
  tail -n 3 "$W/$name.log"
}

# Packages the GPU image lacks (ml_collections, grain, array_record, tensorboardX...), carried as wheels
# in .whl/ (benchmarks/gpu_prepare.sh); appended, so the image's own win.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "${TMPDIR:-/tmp}/anim_site" .whl/*.whl \
    >"$W/anim_pip.log" 2>&1 || echo "pip install of .whl failed (see anim_pip.log)"
  export PYTHONPATH=$PYTHONPATH:${TMPDIR:-/tmp}/anim_site
fi

# Moore's pinned pure-Python packages, for the Moore process only
site=${TMPDIR:-/tmp}/moore_site
rm -rf "$site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$CARRY"/wheels/*.whl \
  >"$W/moore_pip.log" 2>&1 || echo "pip install of the Moore wheels failed (see moore_pip.log)"

if ((REDUCED)); then
  size=(--width 64 --height 64 --frames 24 --steps 4)
  part ours 60 300 "$PY" benchmarks/animate.py "${size[@]}" --repeats 1 --attention auto --step-tflop 0.0035 \
    --json "$W/ours.json"
  part moore 30 200 env PYTHONPATH="$site:$PYTHONPATH" "$PY" benchmarks/moore_side_by_side.py --worker moore --moore "$CARRY/moore" --random tiny \
    --device cpu --dtype float32 "${size[@]}" --guidance 3.5 --threads 2 --json-out "$W/moore.json"
  part train1 60 300 "$PY" benchmarks/train.py --stage 1 --steps 2 --json "$W/train.jsonl"
  part train2 60 300 "$PY" benchmarks/train.py --stage 2 --steps 2 --json "$W/train.jsonl"
  part pose 30 300 "$PY" benchmarks/pose_extractor.py --batch 2 --frames 4 --json "$W/pose_extractor.json"
  part ours_alt 60 300 "$PY" benchmarks/animate.py "${size[@]}" --repeats 1 --attention xla --step-tflop 0.0035 \
    --json "$W/ours_alt.json"
else
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|flax|optax|orbax-checkpoint|torch|numpy|grain) ' >"$W/versions.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$W/gpu.txt" 2>&1
  size=(--width 512 --height 768 --frames 24 --steps 25)
  # the sampling loop's optimised GPU HLO comes back in logs.tar.gz (benchmarks/hlo_step.py --analyse reads it)
  part ours 150 300 env XLA_FLAGS="--xla_dump_to=$W/xla_dump --xla_dump_hlo_module_re=.*(run|sampl|denois).*" \
    "$PY" benchmarks/animate.py --full "${size[@]}" --repeats 2 --attention auto \
    --step-tflop "$STEP_TFLOP" --json "$W/ours.json"
  find "$W/xla_dump" -type f ! -name '*after_optimizations.txt' -delete 2>/dev/null
  part moore 60 150 env PYTHONPATH="$site:$PYTHONPATH" "$PY" benchmarks/moore_side_by_side.py --worker moore \
    --moore "$CARRY/moore" --random sd15 --device cuda --dtype float16 "${size[@]}" --guidance 3.5 --threads 16 \
    --json-out "$W/moore.json"
  part pose 40 90 "$PY" benchmarks/pose_extractor.py --batch 32 --frames 256 --json "$W/pose_extractor.json"
  # FLOPs per training step, counted on a CPU host (python benchmarks/train.py --full --count-only --json ...)
  counts() {  # --counts FILE where FILE has this stage's line (else train.py counts, or reports no MFU)
    grep -q "\"stage\": $1," benchmarks/gpu_train_counts.jsonl 2>/dev/null &&
      echo --counts benchmarks/gpu_train_counts.jsonl
  }
  # shellcheck disable=SC2046
  part train1 100 150 "$PY" benchmarks/train.py --full --stage 1 --steps 5 $(counts 1) --json "$W/train.jsonl"
  # shellcheck disable=SC2046
  part train2 100 150 "$PY" benchmarks/train.py --full --stage 2 --steps 5 $(counts 2) --json "$W/train.jsonl"
  part pose_bf16 40 70 "$PY" benchmarks/pose_extractor.py --batch 32 --frames 256 --dtype bfloat16 \
    --json "$W/pose_extractor_bf16.json"
  part pose_nets 30 60 "$PY" benchmarks/pose.py --jax-only --device gpu --batch 32 --rounds 5
  part ours_alt 200 240 "$PY" benchmarks/animate.py --full "${size[@]}" --repeats 2 --attention cudnn \
    --step-tflop "$STEP_TFLOP" --json "$W/ours_alt.json"
fi

"$PY" benchmarks/gpu_summary.py "$W" "$OUT/gpu_results.json" | tee "$OUT/gpu_results.md"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" work && rm -rf "$W"
echo "total ${SECONDS} s"

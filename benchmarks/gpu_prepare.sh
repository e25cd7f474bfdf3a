#!/usr/bin/env bash
# Prepares what benchmarks/gpu.sh carries to the GPU machine, on a CPU host with pip:
#   bash benchmarks/gpu_prepare.sh PATH/TO/Moore-AnimateAnyone
# makes .gpu_carry/moore (src/ and configs/inference/ of the checkout, nothing else) and
# .gpu_carry/wheels (the pure-Python wheels Moore's pipeline pins and the GPU image lacks), and lists
# .gpu_carry in .git/info/exclude so it is never committed. Then run, with the device tool:
#   command: bash benchmarks/gpu.sh      carry: [".gpu_carry"]
set -euo pipefail
cd "$(dirname "$0")/.."
moore=${1:?usage: gpu_prepare.sh PATH/TO/Moore-AnimateAnyone}
if [[ ! -f "$moore/src/pipelines/pipeline_pose2vid_long.py" ]]; then
  echo "error: $moore is not a Moore-AnimateAnyone checkout (no src/pipelines/pipeline_pose2vid_long.py)" >&2
  exit 2
fi
rm -rf .gpu_carry.part
mkdir -p .gpu_carry.part/moore/configs .gpu_carry.part/wheels
cp -r "$moore/src" .gpu_carry.part/moore/
cp -r "$moore/configs/inference" .gpu_carry.part/moore/configs/
find .gpu_carry.part/moore -name '*.mp4' -delete -o -name '*.png' -delete
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .gpu_carry.part/wheels \
  diffusers==0.24.0 transformers==4.30.2 huggingface_hub==0.25.2
rm -rf .gpu_carry && mv .gpu_carry.part .gpu_carry
grep -qx '/.gpu_carry/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null ||
  echo '/.gpu_carry/' >>"$(git rev-parse --git-path info/exclude)"
du -sh .gpu_carry

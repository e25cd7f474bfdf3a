"""Collects the parts of benchmarks/gpu.sh into one JSON and one Markdown table.

    python benchmarks/gpu_summary.py WORK_DIR OUT.json      # the table goes to stdout

Targets checked (issue 19): the whole 24-frame 512x768 video with 25 steps and guidance <= 4.5 s,
peak GPU memory <= 10 GB, >= 5x faster than Moore's pipeline on the same GPU, both training stages
>= 50% MFU. A part that did not run or failed shows as such; nothing is filled in.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys


def _load(path: pathlib.Path):
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text:
        return None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: gpu_summary.py WORK_DIR OUT.json", file=sys.stderr)
        return 2
    work, out = pathlib.Path(argv[0]), pathlib.Path(argv[1])
    parts = {}
    if (work / "parts.tsv").exists():
        for line in (work / "parts.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")
            parts[name] = dict(rc=rc, seconds=int(secs))
    ours, alt, moore = _load(work / "ours.json"), _load(work / "ours_alt.json"), _load(work / "moore.json")
    train = _load(work / "train.jsonl") or []
    gpu = (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").exists() else None
    pose = [r for r in (_load(work / f"pose_extractor{s}.json") for s in ("", "_bf16")) if r]
    res = dict(parts=parts, gpu=gpu, ours=ours, ours_alt=alt, moore=moore, train=train, pose_extractor=pose)
    checks = {}
    if ours:
        checks["video <= 4.5 s"] = ours["video_s"] <= 4.5
        if ours.get("peak_memory_gib") is not None:
            checks["peak GPU memory <= 10 GB"] = ours["peak_memory_gib"] * 2**30 <= 10e9
    if ours and moore:
        res["moore_over_ours"] = moore["seconds"] / ours["video_s"]
        checks[">= 5x faster than Moore"] = res["moore_over_ours"] >= 5
    for r in train:
        checks[f"stage {r['stage']} MFU >= 50%"] = r.get("mfu", 0) >= 0.5
    for r in pose:  # issue 13: the whole extractor at batch >= 32
        checks[f"pose extractor ({r['dtype']}) >= 200 frames/s"] = r["frames_per_s"] >= 200
    res["targets"] = checks
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)

    print(f"GPU: {gpu}\n")
    print("| part | exit | seconds |\n|---|---|---|")
    for name, p in parts.items():
        print(f"| {name} | {p['rc']} | {p['seconds']} |")
    size = lambda r: f"{r['width']}x{r['height']}, {r['frames']} frames, {r['steps']} steps"  # noqa: E731
    print("\n| inference (guidance 3.5) | size | first call (s) | video (s) | loop (s) "
          "| peak GPU memory (GiB) | MFU |\n|---|---|---|---|---|---|---|")
    for label, r in (("anim_jax, auto attention", ours), ("anim_jax, cuDNN everywhere", alt)):
        if r:
            mem = r.get("peak_memory_gib")
            print(f"| {label} ({r['dtype']}) | {size(r)} | {r['first_call_s']} | {r['video_s']} | {r['loop_s']} | "
                  f"{mem if mem is not None else '-'} | {r.get('mfu', '-')} |")
        else:
            print(f"| {label} | not run | | | | | |")
    if moore:
        gib = moore.get("peak_gpu_gib")
        print(f"| Moore Pose2VideoPipeline ({moore['dtype']}, torch {moore['torch']}) | {size(moore)} | "
              f"{moore['first_call_s']:.1f} (1 step) | {moore['seconds']:.2f} | - | "
              f"{'-' if gib is None else f'{gib:.2f}'} | - |")
    else:
        print("| Moore Pose2VideoPipeline | not run | | | | | |")
    if "moore_over_ours" in res:
        print(f"\nMoore / anim_jax (whole video): {res['moore_over_ours']:.2f}x")
    if train:
        print("\n| training stage | size | global batch | step (s) | model TFLOP/step | MFU | MFU (3x trained + frozen) "
              "| peak memory (GiB) |\n|---|---|---|---|---|---|---|---|")
        for r in train:
            size = "x".join(str(x) for x in r["resolution"])
            mfu = lambda k: f"{r[k]:.1%}" if r.get(k) is not None else "-"  # noqa: E731
            print(f"| {r['stage']} | {size} | {r['global_batch']} | {r['step_s']:.3f} | "
                  f"{(r.get('model_flops') or float('nan')) / 1e12:.2f} | {mfu('mfu')} | {mfu('mfu_convention')} | "
                  f"{r.get('peak_memory_gib') or '-'} |")
    if pose:
        print("\n| DWPose extractor (whole) | frames | batch | first call (s) | frames/s | device peak (MiB) |"
              "\n|---|---|---|---|---|---|")
        for r in pose:
            print(f"| {r['dtype']} | {r['frames']} x {r['size'][0]}x{r['size'][1]} | {r['batch']} | "
                  f"{r['first_call_s']} | {r['frames_per_s']} | {r['device_peak_mib']} |")
    print("\ntargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

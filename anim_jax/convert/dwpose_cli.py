"""``anim-jax convert-pose``: DWPose's ONNX files -> a converted DWPose directory.

jax and the networks are imported only when the command runs, so ``anim-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse


def add_convert_pose_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-pose",
        help="DWPose's yolox_l.onnx + dw-ll_ucoco_384.onnx -> converted DWPose directory for `anim-jax pose`",
        description=(
            "Convert DWPose's person detector (YOLOX) and whole-body pose network (RTMPose) from their ONNX "
            "files. The graphs are read with the onnx package (nothing in them is executed; onnxruntime is not "
            "needed), the architectures' sizes are inferred from the weights' shapes, every layer is matched "
            "strictly and BatchNorms are folded. OUT appears only when complete."
        ),
    )
    p.add_argument("--detector", required=True, metavar="PATH", help="YOLOX ONNX file (DWPose: yolox_l.onnx)")
    p.add_argument("--pose", required=True, metavar="PATH", help="RTMPose ONNX file (DWPose: dw-ll_ucoco_384.onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="converted directory to create (e.g. weights/dwpose)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help="check and summarise, write nothing")
    p.set_defaults(func=run_convert_pose)
    return p


def run_convert_pose(args: argparse.Namespace) -> int:
    from anim_jax.convert.cli import usage_error
    from anim_jax.convert.dwpose import convert_dwpose
    from anim_jax.convert.readers import CheckpointError

    try:
        report = convert_dwpose(args.detector, args.pose, args.out, overwrite=args.overwrite, dry_run=args.dry_run)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        return usage_error("convert-pose", e)
    d, p = report.detector, report.pose
    print(f"detector: YOLOX base {d.base_channels} channels, depths {list(d.depths)}, {d.num_classes} classes, "
          f"{report.detector_params / 1e6:.1f} M parameters")
    print(f"pose:     RTMPose stages {list(p.stage_channels)}, {p.num_keypoints} keypoints, input {p.input_size[0]}x"
          f"{p.input_size[1]}, SimCC ratio {p.simcc_split_ratio:g}, {report.pose_params / 1e6:.1f} M parameters")
    print(f"{report.folded_batchnorms} BatchNorm nodes folded; "
          + ("dry run, nothing written" if args.dry_run else f"written to {report.out}") + f" in {report.seconds:.1f} s")
    return 0

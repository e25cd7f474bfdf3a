"""``anim-jax convert`` and ``anim-jax export``.

``anim_jax.cli`` wires them in::

    add_convert_parser(subparsers)   # -> args.func = run_convert
    add_export_parser(subparsers)    # -> args.func = run_export

jax and the models are imported only when a command runs, so ``anim-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

_DTYPES = ("float32", "float16", "bfloat16", "keep")


def usage_error(command: str, exc: BaseException) -> int:
    """A bad input file or argument, reported as one line (``anim-jax COMMAND: error: ...``, the
    form ``anim_jax.cli`` gives every usage error); returns its exit code."""
    from anim_jax.cli import EXIT_USAGE

    print(f"anim-jax {command}: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
    return EXIT_USAGE


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="PyTorch checkpoints (Moore-AnimateAnyone, MusePose, AnimateDiff) -> converted-weights directory",
        description=(
            "Convert PyTorch checkpoints into one converted-weights directory for `anim-jax animate` and "
            "training. Moore-AnimateAnyone / MusePose: --moore DIR (denoising_unet.pth, reference_unet.pth, "
            "pose_guider.pth, motion_module.pth) with --sd-unet-config, --vae and --image-encoder. AnimateDiff: "
            "--denoiser SD15/unet --motion-module mm_sd_v15_v2.ckpt (or a diffusers MotionAdapter). The model "
            "configuration is read from config.json and the checkpoints' shapes; every key is checked strictly. "
            "OUT appears only when complete."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="converted-weights directory to create")
    src = p.add_argument_group("inputs")
    src.add_argument("--moore", metavar="DIR", help="Moore-AnimateAnyone / MusePose weights folder (the four .pth files)")
    src.add_argument("--denoiser", metavar="PATH",
                     help="denoising_unet.pth, or 2-D UNet weights (file or diffusers unet folder); overrides --moore")
    src.add_argument("--reference-net", metavar="PATH", help="reference_unet.pth (overrides --moore)")
    src.add_argument("--pose-guider", metavar="PATH", help="pose_guider.pth (overrides --moore)")
    src.add_argument("--motion-module", metavar="PATH",
                     help="motion_module.pth, AnimateDiff mm_sd_v15(_v2).ckpt, or a diffusers MotionAdapter "
                          "folder/.safetensors (overrides --moore)")
    src.add_argument("--sd-unet-config", metavar="PATH",
                     help="Stable Diffusion 1.5 unet/config.json (or its folder); needed for the two UNets "
                          "unless --denoiser/--reference-net is a diffusers folder with a config.json")
    src.add_argument("--vae", metavar="DIR", help="diffusers AutoencoderKL folder (sd-vae-ft-mse)")
    src.add_argument("--image-encoder", metavar="DIR",
                     help="transformers CLIPVisionModelWithProjection folder (sd-image-variations image_encoder)")
    opt = p.add_argument_group("options")
    opt.add_argument("--motion-heads", type=int, metavar="N",
                     help="attention heads of the motion modules (not inferable from shapes; default: a "
                          "MotionAdapter's config.json, else 8 as in AnimateDiff and Moore)")
    opt.add_argument("--motion-max-len", type=int, metavar="N",
                     help="position-encoding length, for motion checkpoints without pos_encoder.pe buffers "
                          "(default: from the buffers, else 32)")
    opt.add_argument("--motion-norm-groups", type=int, metavar="N",
                     help="GroupNorm groups of the motion modules (not inferable; default 32)")
    opt.add_argument("--prefer-denoiser-file", action="store_true",
                     help="a motion key in both the denoiser and the motion-module file with different values: "
                          "take the denoiser file's (what Moore's loading does) instead of failing")
    opt.add_argument("--dtype", choices=_DTYPES, default="float32",
                     help="stored parameter dtype (default float32; keep: as in the checkpoints)")
    opt.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once the new one is complete)")
    opt.add_argument("--dry-run", action="store_true", help="check and summarise, write nothing")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    from anim_jax.convert import moore
    from anim_jax.convert.readers import CheckpointError

    try:
        inputs = moore.moore_inputs(
            args.moore,
            denoiser=args.denoiser,
            reference_net=args.reference_net,
            pose_guider=args.pose_guider,
            motion_module=args.motion_module,
            unet_config=args.sd_unet_config,
            vae=args.vae,
            image_encoder=args.image_encoder,
        )
        report = moore.convert(
            inputs,
            args.out,
            dtype=args.dtype,
            motion_heads=args.motion_heads,
            motion_max_len=args.motion_max_len,
            motion_norm_groups=args.motion_norm_groups,
            prefer_denoiser_file=args.prefer_denoiser_file,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            progress=not args.no_progress,
        )
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        return usage_error("convert", e)
    print(moore.format_report(report))
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="converted-weights directory -> Moore-AnimateAnyone's four .pth files",
        description=(
            "Write denoising_unet.pth, motion_module.pth, reference_unet.pth and pose_guider.pth in "
            "Moore-AnimateAnyone's format (torch.save zip pickles; torch is not needed) from a "
            "converted-weights directory, e.g. after training. The round trip through `convert` is exact."
        ),
    )
    p.add_argument("--weights", required=True, metavar="DIR", help="converted-weights directory")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the .pth files")
    p.add_argument("--dtype", choices=_DTYPES, default="keep",
                   help="tensor dtype in the files (default keep: as stored, float32 after a default convert)")
    p.add_argument("--overwrite", action="store_true", help="replace existing .pth files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    from anim_jax.convert import moore
    from anim_jax.convert.readers import CheckpointError

    try:
        report = moore.export_moore(args.weights, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                    progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        return usage_error("export", e)
    for file, n in report.files.items():
        print(f"{report.out}/{file}: {n} tensors")
    for note in report.notes:
        print(note)
    print(f"done in {report.seconds:.1f} s")
    return 0

"""``anim-jax convert-metric``: the LPIPS and I3D (FVD) networks' PyTorch weights -> converted-weights
directories that ``anim-jax evaluate --lpips-weights / --fvd-weights`` read."""

from __future__ import annotations

import argparse
import sys


def add_convert_metric_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-metric",
        help="LPIPS / I3D (FVD) PyTorch weights -> converted-weights directory for `anim-jax evaluate`",
        description="Convert the networks behind LPIPS and FVD (read without torch, nothing in the files is "
        "executed; every key is checked). lpips: torchvision's VGG16 or AlexNet state dict (vgg16-397923af.pth, "
        "alexnet-owt-7be5be79.pth) plus the lpips package's v0.1 linear layers (weights/v0.1/vgg.pth, alex.pth). "
        "i3d: an InceptionI3d state dict (pytorch-i3d rgb_imagenet.pt, or TATS i3d_pretrained_400.pt).",
    )
    sub = p.add_subparsers(dest="network", metavar="NETWORK", required=True)
    lp = sub.add_parser("lpips", help="LPIPS: trunk + linear layers")
    lp.add_argument("--trunk", required=True, metavar="PATH", help="torchvision vgg16 / alexnet state dict")
    lp.add_argument("--linear", required=True, metavar="PATH", help="lpips weights/v0.1/<net>.pth")
    lp.add_argument("--net", choices=("vgg", "alex"), default="vgg",
                    help="trunk architecture (default vgg, the animation papers' choice; lpips' own default is alex)")
    lp.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    lp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    i3 = sub.add_parser("i3d", help="I3D for FVD")
    i3.add_argument("--weights", required=True, metavar="PATH", help="InceptionI3d state dict (.pt/.pth/.safetensors)")
    i3.add_argument("--out", required=True, metavar="DIR", help="directory to create")
    i3.add_argument("--bn-eps", type=float, default=1e-3,
                    help="BatchNorm epsilon (not stored in the file; 1e-3 as pytorch-i3d and DisCo; TATS declares 1e-5)")
    i3.add_argument("--logits-pool-frames", type=int, default=2,
                    help="frames of the final average pool (2 as pytorch-i3d; DisCo's copy uses 1)")
    p.set_defaults(func=run_convert_metric)
    return p


def run_convert_metric(args: argparse.Namespace) -> int:
    from anim_jax.convert.readers import CheckpointError

    try:
        if args.network == "lpips":
            from anim_jax.metrics.lpips import convert_lpips

            out = convert_lpips(args.trunk, args.linear, args.out, net=args.net, overwrite=args.overwrite)
            print(f"LPIPS ({args.net}) written to {out}")
        else:
            from anim_jax.metrics.fvd import convert_i3d

            cfg = convert_i3d(args.weights, args.out, bn_eps=args.bn_eps, logits_pool_frames=args.logits_pool_frames)
            print(f"I3D ({cfg.num_classes} classes) written to {args.out}")
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"anim-jax convert-metric: error: {e}", file=sys.stderr)
        return 2
    return 0

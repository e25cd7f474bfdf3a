"""Conversion speed and memory on a full-size Moore-AnimateAnyone set.

    python benchmarks/convert.py                    # fp32: the released 8.7 GB set
    python benchmarks/convert.py --dtype float16 --cold --export
    python benchmarks/convert.py --workdir /big/disk --keep   # reuse the generated files next time

It generates Moore's four files with exactly the released key set and shapes (the SD1.5 UNet keys
from diffusers' UNet2DConditionModel and the AnimateDiff-v2 motion keys from diffusers'
MotionAdapter, both instantiated on the meta device; renamed to the original format), random data
(``torch.randn``; the ``pos_encoder.pe`` buffers hold the sinusoid table, which the converter
checks), saved with ``torch.save`` like the originals:

    denoising_unet.pth 686 tensors, reference_unet.pth 682, motion_module.pth 588, pose_guider.pth 16

Then ``anim-jax convert`` runs in a child process: wall time (process start to exit, the fsync of
every output file included) and the child's peak RSS (``ru_maxrss``). ``--cold`` evicts the input
files from the page cache first (``posix_fadvise(DONTNEED)`` on those files only), so the inputs
are read from disk. ``--export`` also times ``anim-jax export`` of the result back to the four files.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _hardware import cpu_name  # noqa: E402  (benchmarks run as scripts: their folder is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anim_jax import atomic  # noqa: E402

SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip
HEAD_KEYS = ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")


def moore_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """{file: {key: shape}} of the released Moore-AnimateAnyone files."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in SD15_UNET_CONFIG.items() if not k.startswith("_")})
        adapter = MotionAdapter(motion_layers_per_block=2, motion_num_attention_heads=8, motion_max_seq_length=32,
                                use_motion_mid_block=True)  # fmt: skip
    unet_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    from anim_jax.convert import motion_keys

    motion = motion_keys.diffusers_to_original_keys({k: tuple(v.shape) for k, v in adapter.state_dict().items()})
    ch = (16, 32, 96, 256)
    pose = {"conv_in.weight": (ch[0], 3, 3, 3), "conv_in.bias": (ch[0],)}
    for i, (cin, cout) in enumerate(zip(ch[:-1], ch[1:])):
        pose[f"blocks.{2 * i}.weight"], pose[f"blocks.{2 * i}.bias"] = (cin, cin, 3, 3), (cin,)
        pose[f"blocks.{2 * i + 1}.weight"], pose[f"blocks.{2 * i + 1}.bias"] = (cout, cin, 3, 3), (cout,)
    pose["conv_out.weight"], pose["conv_out.bias"] = (320, ch[-1], 3, 3), (320,)
    return {
        "denoising_unet.pth": unet_shapes,
        "reference_unet.pth": {k: s for k, s in unet_shapes.items() if k not in HEAD_KEYS},
        "motion_module.pth": motion,
        "pose_guider.pth": pose,
    }


def generate(folder: str, dtype: str) -> None:
    import torch

    from anim_jax.models.motion import sinusoidal_position_table

    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    for name, shapes in moore_shapes().items():
        t0 = time.perf_counter()
        sd = collections.OrderedDict()
        for key, shape in shapes.items():
            if key.endswith("pos_encoder.pe"):
                sd[key] = torch.from_numpy(sinusoidal_position_table(shape[1], shape[2])[None]).to(torch_dtype)
            else:
                sd[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch_dtype)
        with atomic.atomic_file(os.path.join(folder, name)) as tmp:
            torch.save(sd, tmp)
        print(f"  generated {name}: {len(sd)} tensors, {os.path.getsize(os.path.join(folder, name)) / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        del sd


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(argv: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds (user + system), peak RSS GB of this child alone, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "anim_jax.cli", *argv], stdout=out, stderr=err,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{err.read()}")
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e9, out.read()


def verify(inputs: str, exported: str, names) -> None:
    """The round trip is exact: same keys, shapes and bytes (float16 inputs compared after their
    exact cast to the stored float32; the recomputed pe buffers equal float32 inputs bit for bit and
    float16 inputs up to their rounding)."""
    import numpy as np

    from anim_jax.convert.readers import open_checkpoint

    t0 = time.perf_counter()
    exact = rounded = 0
    for name in names:
        with open_checkpoint(os.path.join(inputs, name)) as a, open_checkpoint(os.path.join(exported, name)) as b:
            if set(a) != set(b):
                sys.exit(f"verify: {name}: key sets differ: {sorted(set(a) ^ set(b))[:5]}")
            for key in a:
                x, y = a[key], b[key]
                if key.endswith("pos_encoder.pe") and x.dtype != y.dtype:
                    # Recomputed in float32; a float16 input holds the table rounded.
                    if not np.allclose(x.astype(np.float32), y, rtol=0, atol=float(np.finfo(x.dtype).eps)):
                        sys.exit(f"verify: {name}: {key} differs beyond {x.dtype} rounding")
                    rounded += 1
                    continue
                if x.dtype != y.dtype and np.can_cast(x.dtype, y.dtype, "safe"):  # fp16 in, fp32 stored: exact
                    x = x.astype(y.dtype)
                if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                    sys.exit(f"verify: {name}: {key} differs")
                exact += 1
    extra = f", {rounded} pe buffers equal up to the input's rounding" if rounded else ""
    print(f"verify: the exported files equal the inputs: {exact} tensors bit for bit{extra} "
          f"({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the generated files")
    ap.add_argument("--workdir", default=None, help="where to generate and convert (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs (reused by the next run)")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before converting")
    ap.add_argument("--export", action="store_true", help="also time anim-jax export of the result")
    ap.add_argument("--verify", action="store_true",
                    help="with --export: check the exported files equal the inputs, tensor by tensor, bit for bit")
    ap.add_argument("--generate-into", default=None, help=argparse.SUPPRESS)  # internal: the generator child
    args = ap.parse_args()
    if args.generate_into:
        generate(args.generate_into, args.dtype)
        return

    work = args.workdir or tempfile.mkdtemp(prefix="anim-jax-convert-bench-")
    inputs = os.path.join(work, f"moore-{args.dtype}")
    out = os.path.join(work, "converted")
    exported = os.path.join(work, "exported")
    config = os.path.join(work, "unet_config.json")
    try:
        with open(config, "w") as f:
            json.dump(SD15_UNET_CONFIG, f)
        names = ("denoising_unet.pth", "reference_unet.pth", "motion_module.pth", "pose_guider.pth")
        if not all(os.path.isfile(os.path.join(inputs, n)) for n in names):
            print(f"generating the full-size Moore set ({args.dtype}) in {inputs}", flush=True)
            # In a child: a child's ru_maxrss includes its parent's RSS at fork, so this process stays small.
            subprocess.run([sys.executable, os.path.abspath(__file__), "--generate-into", inputs, "--dtype", args.dtype],
                           check=True)
        files = [os.path.join(inputs, n) for n in names]
        sizes = {os.path.basename(p): os.path.getsize(p) for p in files}
        if args.cold:
            evict(files)
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        wall, cpu, peak, stdout = run_child(["convert", "--moore", inputs, "--sd-unet-config", config, "--out", out,
                                        "--no-progress"])
        written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
        total = sum(sizes.values())
        print(stdout)
        print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_name()} x "
              f"{os.cpu_count()}; load average before: {load:.1f}, after: {os.getloadavg()[0]:.1f}")
        print(f"convert: inputs {total / 1e9:.2f} GB ({args.dtype}; largest {max(sizes.values()) / 1e9:.2f} GB), "
              f"output {written / 1e9:.2f} GB, {'cold' if args.cold else 'warm'} page cache: {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU (user + system), "
              f"{total / wall / 1e9:.2f} GB/s in, peak RSS {peak:.2f} GB "
              f"({peak / (max(sizes.values()) / 1e9):.2f} x the largest input)")
        if args.export:
            shutil.rmtree(exported, ignore_errors=True)
            wall, cpu, peak, _ = run_child(["export", "--weights", out, "--out", exported, "--no-progress"])
            size = sum(os.path.getsize(os.path.join(exported, n)) for n in os.listdir(exported))
            print(f"export: {size / 1e9:.2f} GB written in {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.2f} GB")
            if args.verify:
                verify(inputs, exported, names)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(exported, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(inputs, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

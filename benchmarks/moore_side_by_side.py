"""anim_jax beside Moore-AnimateAnyone's own ``Pose2VideoPipeline`` on the CPU, same weights, same work.

    python benchmarks/moore_side_by_side.py --moore PATH/TO/Moore-AnimateAnyone --moore-venv PATH/TO/venv \\
        --sizes 64x64,256x256 --frames 24,96 --threads 1,2 --repeats 3

Fetches nothing. ``--moore`` is a checkout of MooreThreads/Moore-AnimateAnyone (measured at a914ef3);
``--moore-venv`` a virtual environment with its pinned dependencies (diffusers 0.24.0, transformers
4.30.2, einops 0.4.1, pyyaml, huggingface_hub < 0.26 and a CPU torch). torchvision is not
needed: only ``src/models`` and ``src/pipelines`` are imported, and neither imports it.

What it does:

1. In the Moore venv, builds a tiny random model set with Moore's own classes (its
   ``UNet2DConditionModel``, ``UNet3DConditionModel.from_pretrained_2d`` with
   ``configs/inference/inference_v2.yaml``'s motion-module settings, ``PoseGuider``; diffusers'
   ``AutoencoderKL``; transformers' ``CLIPVisionModelWithProjection``) and saves it the way Moore's
   weights are distributed: the four ``.pth`` files, an SD-style ``unet/config.json``, a VAE folder and
   an image-encoder folder. Parameters that are all zero after construction (motion-module ``proj_out``,
   the pose guider's ``conv_out``, norm biases) are drawn at random too, so every layer does real work;
   the denoiser's 2-D weights are the reference net's plus noise, so the two nets differ.
2. ``anim-jax convert`` turns them into a converted-weights directory (both sides run the same weights).
3. For every row (size x frames) and thread count, runs Moore's pipeline and ours in fresh processes,
   alternating which goes first, ``--repeats`` times. Each process pins itself to N cores (and sets
   torch's / XLA's thread counts; with N > 1 we run as N one-thread CPU devices, the frames split over
   them, as ``anim-jax animate --cpu-devices N`` does; ``--our-devices 1``: one device with N XLA
   threads), makes one warm-up call (ours: the same call, which compiles; Moore's:
   one denoising step at the same size, which has nothing to compile), then times one whole call:
   reference encoding, ReferenceNet, pose guider, ``--steps`` DDIM steps with classifier-free guidance
   over 24-frame context windows, VAE decode. Peak RSS is the process's ``ru_maxrss`` (imports and, for
   us, compilation included).

Our first run of a row starts from an empty persistent compilation cache (``DIR/xla_cache/<row>``:
it compiles, like a first ``anim-jax animate`` of that size); our later runs find it filled (warm:
they load the compiled programs, like every later ``anim-jax animate``, which keeps the cache by
default). ``--no-compilation-cache``: every run compiles.

Reported per row: the median (and best) seconds of each timed call, Moore/anim_jax (> 1: we are
faster), peak RSS (Moore; ours cold / warm), and our first-call time cold / warm. ``--json`` writes
every run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parent.parent

# Tiny model set (the reduced size of benchmarks/animate.py, with Moore's motion-module settings).
UNET = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=2, block_out_channels=[32, 64, 64, 64],
    center_input_sample=False, cross_attention_dim=32, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=1, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=8, out_channels=4,
    sample_size=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
VAE = dict(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
           sample_size=64)
CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=224,
            patch_size=32, projection_dim=32)
POSE_GUIDER = dict(conditioning_embedding_channels=32, block_out_channels=(8, 8, 16, 16))
SEED = 0


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------- workers


def _pin(threads: int) -> None:
    """Before torch/jax load: this process and its thread pools use ``threads`` cores."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        fail(f"--threads {threads} but this process may use only {len(cpus)} cores")
    os.sched_setaffinity(0, cpus[:threads])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def _inputs(width: int, height: int, frames: int):
    import numpy as np

    rng = np.random.default_rng(SEED)
    ref = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return ref, poses


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inference_config(moore: str) -> dict:
    import yaml

    return yaml.safe_load((pathlib.Path(moore) / "configs/inference/inference_v2.yaml").read_text())


def _hide_new_tokenizers() -> None:
    # transformers 4.30 refuses to import beside a tokenizers newer than 0.13 (its version check runs
    # only when tokenizers is installed). The CLIP image encoder and processor need no tokenizer, so
    # where a newer one is installed (the GPU image), hide it from this worker process.
    try:
        import importlib.metadata as md

        if tuple(int(x) for x in md.version("tokenizers").split(".")[:2]) >= (0, 14):
            sys.modules["tokenizers"] = None
    except md.PackageNotFoundError:
        pass


def _moore_import(moore: str):
    sys.path.insert(0, moore)
    from src.models.pose_guider import PoseGuider
    from src.models.unet_2d_condition import UNet2DConditionModel
    from src.models.unet_3d import UNet3DConditionModel

    return PoseGuider, UNet2DConditionModel, UNet3DConditionModel


def worker_make_weights(moore: str, out: str) -> None:
    """Moore venv: the tiny set, saved as Moore distributes its weights."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    PoseGuider, UNet2D, UNet3D = _moore_import(moore)
    out = pathlib.Path(out)
    torch.manual_seed(SEED)

    def randomise(module):
        with torch.no_grad():
            for p in module.parameters():
                if not p.any():  # zero-initialised layers must do work too
                    p.normal_(0, 0.05)

    (out / "sd" / "unet").mkdir(parents=True)
    (out / "sd" / "unet" / "config.json").write_text(json.dumps(UNET, indent=1))
    ref_full = UNet2D.from_config(UNET)  # Moore's own 2-D UNet (conv_norm_out removed after build)
    randomise(ref_full)
    torch.save(ref_full.state_dict(), out / "sd" / "unet" / "diffusion_pytorch_model.bin")
    torch.save(ref_full.state_dict(), out / "reference_unet.pth")

    mm_kwargs = _inference_config(moore)["unet_additional_kwargs"]
    den = UNet3D.from_pretrained_2d(out / "sd", out / "missing.pth", subfolder="unet", unet_additional_kwargs=mm_kwargs)
    with torch.no_grad():  # a denoiser of its own, not a copy of the reference net
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    randomise(den)
    sd = den.state_dict()
    torch.save({k: v for k, v in sd.items() if "motion_modules" in k}, out / "motion_module.pth")
    torch.save({k: v for k, v in sd.items() if "motion_modules" not in k}, out / "denoising_unet.pth")

    guider = PoseGuider(**POSE_GUIDER)
    randomise(guider)
    torch.save(guider.state_dict(), out / "pose_guider.pth")
    vae = AutoencoderKL(**VAE)
    randomise(vae)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP))
    randomise(enc)
    enc.save_pretrained(out / "image_encoder", safe_serialization=True)


SD15_UNET = dict(
    UNET, attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
    layers_per_block=2, norm_num_groups=32, sample_size=64,
)
SD15_VAE = dict(VAE, block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=512)
SD15_CLIP = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                 image_size=224, patch_size=14, projection_dim=768)
SD15_POSE_GUIDER = dict(conditioning_embedding_channels=320, block_out_channels=(16, 32, 96, 256))


def _moore_models(moore: str, weights: str | None, random_size: str = "sd15"):
    """Moore's models as scripts/pose2vid.py builds them: from the tiny weights folder, or (weights
    None) with random values at ``random_size`` ("sd15" or "tiny"; timing does not depend on values)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    PoseGuider, UNet2D, UNet3D = _moore_import(moore)
    mm_kwargs = _inference_config(moore)["unet_additional_kwargs"]
    if weights is None:
        unet, vae, clip, guider = ((SD15_UNET, SD15_VAE, SD15_CLIP, SD15_POSE_GUIDER) if random_size == "sd15"
                                   else (UNET, VAE, CLIP, POSE_GUIDER))
        # UNet3DConditionModel.from_pretrained_2d's block-type swap, without a weights file
        cfg3d = dict(unet, _class_name="UNet3DConditionModel",
                     down_block_types=["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
                     up_block_types=["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3, mid_block_type="UNetMidBlock3DCrossAttn")
        return dict(vae=AutoencoderKL(**vae), reference_unet=UNet2D.from_config(unet),
                    denoising_unet=UNet3D.from_config(cfg3d, **mm_kwargs), pose_guider=PoseGuider(**guider),
                    image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**clip)))
    w = pathlib.Path(weights)
    vae = AutoencoderKL.from_pretrained(w / "vae")
    reference_unet = UNet2D.from_pretrained(w / "sd", subfolder="unet")
    denoising_unet = UNet3D.from_pretrained_2d(w / "sd", w / "motion_module.pth", subfolder="unet",
                                               unet_additional_kwargs=mm_kwargs)
    pose_guider = PoseGuider(**POSE_GUIDER)
    image_enc = CLIPVisionModelWithProjection.from_pretrained(w / "image_encoder")
    denoising_unet.load_state_dict(torch.load(w / "denoising_unet.pth", map_location="cpu"), strict=False)
    reference_unet.load_state_dict(torch.load(w / "reference_unet.pth", map_location="cpu"))
    pose_guider.load_state_dict(torch.load(w / "pose_guider.pth", map_location="cpu"))
    return dict(vae=vae, reference_unet=reference_unet, denoising_unet=denoising_unet, pose_guider=pose_guider,
                image_encoder=image_enc)


def worker_moore(moore: str, weights: str | None, width: int, height: int, frames: int, steps: int,
                 guidance: float, threads: int, device: str = "cpu", dtype: str = "float32",
                 random_size: str = "sd15") -> dict:
    import diffusers.utils.import_utils
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    # diffusers 0.24 imports an installed peft when it registers modules; a current peft (GPU images
    # carry one) cannot import with Moore's pinned transformers 4.30, and Moore uses no peft.
    diffusers.utils.import_utils._peft_available = False
    torch.set_num_threads(threads)
    models = _moore_models(moore, weights, random_size)
    from src.pipelines.pipeline_pose2vid_long import Pose2VideoPipeline

    scheduler = DDIMScheduler(**_inference_config(moore)["noise_scheduler_kwargs"])
    pipe = Pose2VideoPipeline(**models, scheduler=scheduler).to(device, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    ref, poses = _inputs(width, height, frames)
    ref_pil, pose_pils = Image.fromarray(ref), [Image.fromarray(p) for p in poses]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call(n_steps):
        with torch.no_grad():
            out = pipe(ref_pil, pose_pils, width, height, frames, n_steps, guidance,
                       generator=torch.manual_seed(42)).videos
        sync()
        return out

    t0 = time.perf_counter()
    call(1)
    first = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    video = call(steps)
    seconds = time.perf_counter() - t0
    assert tuple(video.shape) == (1, 3, frames, height, width), video.shape
    res = dict(seconds=seconds, first_call_s=first, peak_rss_mib=_peak_rss_mib(), torch=torch.__version__,
               device=device, dtype=dtype)
    if device.startswith("cuda"):
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name()
    return res


def worker_ours(weights: str, width: int, height: int, frames: int, steps: int, guidance: float,
                attention: str, cpu_devices: int = 1) -> dict:
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp

    from anim_jax import parallel
    from anim_jax.models.attention_ops import AttentionConfig
    from anim_jax.pipeline import AnimatePipeline

    mesh = None
    if cpu_devices > 1:  # what `anim-jax animate --cpu-devices N` does
        parallel.use_cpu_devices(cpu_devices)
        mesh = parallel.make_mesh((cpu_devices,), ("data",))
    pipe = AnimatePipeline.from_pretrained(weights, dtype=jnp.float32, attention=AttentionConfig(attention), mesh=mesh)
    ref, poses = _inputs(width, height, frames)
    kw = dict(width=width, height=height, num_frames=frames, steps=steps, guidance_scale=guidance, seed=42)
    t0 = time.perf_counter()
    pipe(ref, poses, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe(ref, poses, **kw)
    seconds = time.perf_counter() - t0
    assert out.frames.shape == (frames, height, width, 3), out.frames.shape
    return dict(seconds=seconds, first_call_s=first, peak_rss_mib=_peak_rss_mib(), jax=jax.__version__)


# ----------------------------------------------------------------------------------- driver


def _run_worker(python: str, args: list[str], threads: int, log, env: dict | None = None) -> dict:
    cmd = [python, str(HERE), "--worker", *args, "--threads", str(threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else dict(os.environ, **env))
    if p.returncode != 0:
        log.write(p.stdout + p.stderr)
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        fail(f"worker {' '.join(args[:2])} failed (exit {p.returncode}): {tail}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def _venv_python(venv: str) -> str:
    p = pathlib.Path(venv)
    py = p if p.is_file() else p / "bin" / "python"
    if not py.exists():
        fail(f"--moore-venv {venv}: no bin/python there")
    return str(py)


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            fail(f"--sizes: expected WIDTHxHEIGHT[,...], got {item!r}")
        if w <= 0 or h <= 0 or w % 8 or h % 8:
            fail(f"--sizes: {item} must be positive multiples of 8")
        out.append((w, h))
    return out


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        fail(f"--{name}: expected comma-separated integers, got {text!r}")
    if any(v <= 0 for v in vals):
        fail(f"--{name}: values must be positive, got {text!r}")
    return vals


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker")
        ap.add_argument("side", choices=("make-weights", "moore", "ours"))
        for name in ("--moore", "--weights", "--out", "--attention"):
            ap.add_argument(name)
        ap.add_argument("--device", default="cpu")
        ap.add_argument("--dtype", default="float32")
        ap.add_argument("--random", default="sd15", choices=("sd15", "tiny"),
                        help="without --weights: random models of this size")
        for name in ("--width", "--height", "--frames", "--steps", "--threads", "--cpu-devices"):
            ap.add_argument(name, type=int, default=1)
        ap.add_argument("--guidance", type=float)
        ap.add_argument("--json-out", help="also write the result here")
        a = ap.parse_args(argv[1:])
        _pin(a.threads)
        if a.side != "ours":
            _hide_new_tokenizers()  # before anything imports transformers
        if a.side == "make-weights":
            worker_make_weights(a.moore, a.out)
            print(json.dumps({}))  # the driver reads every worker's last line
            return 0
        if a.side == "moore":
            res = worker_moore(a.moore, a.weights, a.width, a.height, a.frames, a.steps, a.guidance, a.threads,
                               a.device, a.dtype, a.random)
        else:
            res = worker_ours(a.weights, a.width, a.height, a.frames, a.steps, a.guidance, a.attention, a.cpu_devices)
        res.update(width=a.width, height=a.height, frames=a.frames, steps=a.steps, guidance=a.guidance)
        if a.json_out:
            pathlib.Path(a.json_out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moore", required=True, help="Moore-AnimateAnyone checkout")
    ap.add_argument("--moore-venv", required=True, help="virtual environment with Moore's pinned dependencies")
    ap.add_argument("--sizes", default="64x64,256x256", help="WIDTHxHEIGHT list (default 64x64,256x256)")
    ap.add_argument("--frames", default="24", help="frame counts (default 24)")
    ap.add_argument("--threads", default="1,2", help="threads per process (default 1,2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and row (default 3)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--attention", default="auto", choices=("xla", "chunked", "flash", "auto"),
                    help="our attention implementation (default auto)")
    ap.add_argument("--our-devices", default="threads", choices=("threads", "1"),
                    help="with N threads, we run as N one-thread CPU devices, the frames split over them "
                         "(threads: `anim-jax animate --cpu-devices N`, the default) or as one device with N "
                         "XLA threads (1: `anim-jax animate` without the option)")
    ap.add_argument("--work", help="keep the weights here (default: a temporary directory)")
    ap.add_argument("--no-compilation-cache", action="store_true",
                    help="no persistent compilation cache for us: every run compiles (the cold rows only)")
    ap.add_argument("--json", help="write every run here")
    args = ap.parse_args(argv)

    moore = pathlib.Path(args.moore).resolve()
    if not (moore / "src/pipelines/pipeline_pose2vid_long.py").is_file():
        fail(f"--moore {args.moore}: not a Moore-AnimateAnyone checkout (no src/pipelines/pipeline_pose2vid_long.py)")
    moore_py = _venv_python(args.moore_venv)
    sizes, frames, threads = _sizes(args.sizes), _ints(args.frames, "frames"), _ints(args.threads, "threads")
    if args.repeats < 1 or args.steps < 1:
        fail("--repeats and --steps must be >= 1")
    if args.json and not pathlib.Path(args.json).parent.resolve().is_dir():
        fail(f"--json {args.json}: its folder does not exist")

    tmp = None
    if args.work:
        work = pathlib.Path(args.work)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="moore_side_by_side_")
        work = pathlib.Path(tmp.name)
    moore_w, ours_w = work / "moore_weights", work / "converted"
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "workers.log", "a")
    if not moore_w.exists():
        print("building the tiny weights with Moore's classes ...", flush=True)
        part = work / "moore_weights.part"
        subprocess.run(["rm", "-rf", str(part)], check=True)
        _run_worker(moore_py, ["make-weights", "--moore", str(moore), "--out", str(part)], 1, log)
        part.rename(moore_w)
    if not ours_w.exists():
        print("anim-jax convert ...", flush=True)
        cmd = [sys.executable, "-m", "anim_jax.cli", "convert", "--moore", str(moore_w), "--out", str(ours_w),
               "--sd-unet-config", str(moore_w / "sd/unet/config.json"), "--vae", str(moore_w / "vae"),
               "--image-encoder", str(moore_w / "image_encoder"), "--no-progress"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if p.returncode:
            fail(f"anim-jax convert failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")

    runs, rows = [], []
    for w, h in sizes:
        for f in frames:
            for n in threads:
                common = ["--width", str(w), "--height", str(h), "--frames", str(f), "--steps", str(args.steps),
                          "--guidance", str(args.guidance)]
                sides = {
                    "moore": (moore_py, ["moore", "--moore", str(moore), "--weights", str(moore_w), *common]),
                    "ours": (sys.executable, ["ours", "--weights", str(ours_w), "--attention", args.attention,
                                              "--cpu-devices", str(n if args.our_devices == "threads" else 1), *common]),
                }
                got = {"moore": [], "ours": []}
                # Our first run of a row starts from an empty persistent compilation cache (cold: it
                # compiles, as a first `anim-jax animate` does); later runs find it filled (warm).
                cache = work / "xla_cache" / f"{w}x{h}_{f}_{n}"
                subprocess.run(["rm", "-rf", str(cache)], check=True)
                for r in range(args.repeats):
                    for side in (("moore", "ours") if r % 2 == 0 else ("ours", "moore")):
                        env = None
                        if side == "ours":
                            env = {"JAX_COMPILATION_CACHE_DIR": str(cache)} if not args.no_compilation_cache else {}
                        res = _run_worker(*sides[side], n, log, env)
                        res.update(side=side, width=w, height=h, frames=f, threads=n, repeat=r,
                                   load_avg=os.getloadavg()[0])
                        if side == "ours":
                            res["cache"] = "warm" if r and not args.no_compilation_cache else "cold"
                        got[side].append(res)
                        runs.append(res)
                        print(f"  {w}x{h} {f} frames {n} thread(s) {side} {res.get('cache', '')}: "
                              f"{res['seconds']:.2f} s (first call {res['first_call_s']:.1f} s), "
                              f"{res['peak_rss_mib']:.0f} MiB, load {res['load_avg']:.1f}", flush=True)
                med = {s: statistics.median(x["seconds"] for x in got[s]) for s in got}
                best = {s: min(x["seconds"] for x in got[s]) for s in got}
                by_cache = {c: [x for x in got["ours"] if x["cache"] == c] for c in ("cold", "warm")}
                worst = lambda xs, key: max((x[key] for x in xs), default=None)  # noqa: E731
                row = dict(size=f"{w}x{h}", frames=f, threads=n, our_devices=n if args.our_devices == "threads" else 1,
                           moore_s=med["moore"], ours_s=med["ours"],
                           ratio=med["moore"] / med["ours"], best_ratio=best["moore"] / best["ours"],
                           moore_rss_mib=worst(got["moore"], "peak_rss_mib"),
                           ours_rss_mib=worst(by_cache["cold"], "peak_rss_mib"),
                           ours_warm_rss_mib=worst(by_cache["warm"], "peak_rss_mib"),
                           ours_first_call_s=worst(by_cache["cold"], "first_call_s"),
                           ours_warm_first_call_s=worst(by_cache["warm"], "first_call_s"))
                rows.append(row)
                print(_table([row], header=False), flush=True)
    print()
    print(f"{args.steps} DDIM steps, guidance {args.guidance}, fp32, attention={args.attention}, "
          f"median (and best) of {args.repeats} interleaved runs of one whole call after a warm-up call; "
          "ratio > 1: anim_jax faster. Our first call: compiling from an empty persistent cache (cold) "
          "or loading from the cache the first run filled (warm); RSS likewise")
    print(_table(rows))
    if args.json:
        tmp_json = pathlib.Path(args.json + ".part")
        tmp_json.write_text(json.dumps(dict(rows=rows, runs=runs, args=vars(args)), indent=1))
        os.replace(tmp_json, args.json)
    log.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


def _table(rows, header=True) -> str:
    lines = []
    if header:
        lines += ["| size | frames | threads | our CPU devices | Moore (s) | anim_jax (s) | Moore/anim_jax (best) "
                  "| peak RSS Moore / anim_jax cold / warm (MiB) | anim_jax first call cold / warm (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['size']} | {r['frames']} | {r['threads']} | {r['our_devices']} | {r['moore_s']:.2f} | {r['ours_s']:.2f} | "
                     f"{r['ratio']:.2f} ({r['best_ratio']:.2f}) | {r['moore_rss_mib']:.0f} / "
                     f"{f(r['ours_rss_mib'], '.0f')} / {f(r['ours_warm_rss_mib'], '.0f')} | "
                     f"{f(r['ours_first_call_s'], '.1f')} / {f(r['ours_warm_first_call_s'], '.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
